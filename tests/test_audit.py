"""The label audit: cleanlab puts planted label flips at the top of the ranking."""

import numpy as np

from pipeline.evaluation import audit


def test_planted_label_flips_rank_first_and_are_flagged():
    rng = np.random.default_rng(0)
    n, k = 60, 3
    truth = np.repeat(np.arange(k), n // k)
    probs = rng.dirichlet(np.ones(k), n) * 0.3
    probs[np.arange(n), truth] += 0.7  # a good held-out model: most mass on the true class
    given = truth.copy()
    flipped = rng.choice(n, 5, replace=False)
    given[flipped] = (truth[flipped] + 1) % k
    paths = [f"img_{i:02d}.png" for i in range(n)]
    table = audit.label_issues(probs, given, paths, ("a", "b", "c"))
    assert set(table["path"].head(5)) == {paths[i] for i in flipped}
    assert table["issue"].head(5).all() and table["score"].is_monotonic_increasing
    top = table.iloc[0]
    assert top["suggested"] == "abc"[truth[table.index[0]]] and top["given"] != top["suggested"]
    png = audit.panel_png(rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), table, top=4)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
