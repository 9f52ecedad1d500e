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


def test_the_table_and_panel_list_only_doubted_labels_and_captions_clear_the_row_above():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rng = np.random.default_rng(1)
    n = 12
    labels = np.arange(n) % 2
    probs = np.full((n, 2), 0.5)
    probs[:8, 0] = np.where(labels[:8] == 0, 0.2, 0.8)  # 8 images the model would relabel
    probs[8:, 0] = np.where(labels[8:] == 0, 0.55, 0.45)  # 4 uncertain but agreeing: low score, same label
    probs[:, 1] = 1 - probs[:, 0]
    table = audit.label_issues(probs, labels, [f"{i}.png" for i in range(n)], ("normal_benign", "malignant"))
    assert (table["suggested"] == table["given"]).any()  # the CSV keeps the full ranking
    text = audit.report_section(table, "validation", csv_path="a.csv", panel=None, top=20)
    rows = [line for line in text.splitlines() if line.startswith("| ") and ".png" in line]
    assert len(rows) == 8 and all(line.split("|")[2] != line.split("|")[3] for line in rows)
    fig = audit.panel_figure(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8), table, top=8)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the images take their aspect-kept place at draw time
    renderer = canvas.get_renderer()
    shown = [ax for ax in fig.axes if ax.get_images()]
    assert len(shown) == 8
    for above, below in zip(shown[:4], shown[4:], strict=True):  # 4 a row
        image_bottom = above.get_images()[0].get_window_extent(renderer).y0
        assert below.title.get_window_extent(renderer).y1 < image_bottom  # display y grows upwards
