"""bench active's simulation on tiny synthetic tables: the schedule, the val draw, one cache for the start and
the picks, the pool left to label, and a killed run resumed from its CSV and picks log."""

import numpy as np
import pandas as pd
import pytest

from benchmarks import active
from pipeline.data.pooled import Pool
from pipeline.data.prepared import Prepared


def test_the_schedule_starts_at_the_start_and_grows():
    assert active.parse_schedule("20,40,80", 20) == [20, 40, 80]
    for bad in ("40,80", "20,20", "20,10", "20,x", ""):
        with pytest.raises(active.BenchError, match="--schedule"):
            active.parse_schedule(bad, 20)


def test_val_is_a_fifth_of_each_class_at_least_one_and_stable_as_labels_grow():
    labels = ["a"] * 2 + ["b"] * 10 + ["c"]
    keys = active.image_keys([f"{i}.png" for i in range(len(labels))], seed=0)
    val = active.val_mask(labels, keys)
    assert val[:2].sum() == 1 and val[2:12].sum() == 2 and val[12:].sum() == 0  # a lone image trains
    more = labels + ["a"] * 3  # 5 of a: still one val, the same one unless a new key is smaller
    grown = active.val_mask(more, np.concatenate([keys, [2.0, 2.0, 2.0]]))
    assert grown[: len(labels)].tolist() == val.tolist() and not grown[len(labels) :].any()
    assert not np.array_equal(keys, active.image_keys([f"{i}.png" for i in range(len(labels))], seed=1))


def simulation() -> active.Simulation:
    """A start of 2 per class (1 val each) and 2 test images, a pool of 5 whose image i is all i + 10."""
    images = np.stack([np.full((4, 4, 3), v, np.uint8) for v in [1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14]])
    start = pd.DataFrame(
        {
            "path": [f"s{i}.png" for i in range(6)],
            "label": ["a", "a", "b", "b", "a", "b"],
            "label_index": [0, 0, 1, 1, 0, 1],
            "split": ["train", "val", "train", "val", "test", "test"],
            "cache_index": range(6),
            "sha256": "x",
        }
    )
    prepared = Prepared(start, images[:6], ("a", "b"), "", (0.0,) * 3, (1.0,) * 3, {})
    kept = pd.DataFrame(
        {
            "path": [f"/pool/p{i}.png" for i in range(5)],
            "sha256": "y",
            "dhash": "",
            "group": "",
            "status": "kept",
        }
    )
    pool = Pool("pool", kept.assign(reason="", cache_index=range(5)), images[6:], {}, "")
    oracle = {f"p{i}.png": "ab"[i % 2] for i in range(5)}
    return active.Simulation(prepared, pool, oracle, images, np.array([0, 1, 2, 2, 4]))


def test_a_round_trains_on_the_start_and_the_picks_with_their_oracle_labels_and_one_cache():
    sim = simulation()
    prepared = active.round_prepared(sim, np.array([1, 4]), seed=0)
    labelled = prepared.table[prepared.table["split"] != "test"]
    assert len(labelled) == 6 and prepared.split("test")["path"].tolist() == ["s4.png", "s5.png"]
    picked = labelled[labelled["path"].str.startswith("/pool/")].set_index("path")
    assert picked.loc["/pool/p1.png", "label"] == "b" and picked.loc["/pool/p4.png", "label_index"] == 0
    assert (
        sim.images[picked.loc["/pool/p4.png", "cache_index"]].max() == 14
    )  # the pool's rows after the start's
    assert labelled.groupby("label")["split"].apply(lambda s: (s == "val").sum()).tolist() == [1, 1]
    train = prepared.split("train")["cache_index"].to_numpy()
    assert np.isclose(
        prepared.mean[0], sim.images[train].mean() / 255
    )  # the round's train split's statistics
    pool = active.round_pool(sim, np.array([0, 2, 3]))
    assert pool.kept()["path"].tolist() == ["/pool/p0.png", "/pool/p2.png", "/pool/p3.png"]
    assert [int(pool.images[i].max()) for i in pool.kept()["cache_index"]] == [10, 12, 13]
    empty = active.round_prepared(sim, np.array([], dtype=np.int64), seed=0)
    assert empty.table["label_index"].dtype.kind == "i" and len(empty.split("train")) == 2


def test_a_killed_run_resumes_after_its_last_row_with_the_picks_it_had_made(tmp_path):
    rows, picks = tmp_path / "a.csv", tmp_path / "a_picks.csv"
    for rnd in (1, 2):
        active.append_row(rows, active.FIELDS, {"set": "s", "strategy": "auto", "seed": 0, "round": rnd})
    active.append_row(rows, active.FIELDS, {"set": "s", "strategy": "random", "seed": 0, "round": 1})
    for rnd, path in ((2, "a.png"), (3, "b.png"), (4, "c.png")):  # killed after round 4's picks, before row 3
        active.append_row(
            picks, active.PICK_FIELDS, {"set": "s", "strategy": "auto", "seed": 0, "round": rnd, "path": path}
        )
    active.append_row(
        picks, active.PICK_FIELDS, {"set": "s", "strategy": "random", "seed": 0, "round": 2, "path": "z.png"}
    )
    assert active.completed(rows, "s", "auto", 0) == [1, 2] and active.completed(rows, "s", "auto", 1) == []
    assert active.picked_before(picks, "s", "auto", 0, 3) == (["a.png", "b.png"], [2, 3])
    assert pd.read_csv(picks)["path"].tolist() == ["a.png", "b.png", "z.png"]  # round 4's: to be picked again


def test_the_figure_is_drawn_from_the_csv(tmp_path):
    rows = tmp_path / "a.csv"
    for strategy, seed, rnd in ((s, seed, r) for s in ("random", "auto") for seed in (0, 1) for r in (1, 2)):
        row = {"set": "s", "strategy": strategy, "seed": seed, "round": rnd, "labels": 20 * rnd}
        active.append_row(rows, active.FIELDS, row | {"accuracy": 0.5 + 0.1 * rnd, "lo": 0.4, "hi": 0.8})
    active.plot(rows, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000
