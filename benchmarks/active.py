"""``python -m pipeline bench active``: how many labels does the suggest command save over random picks?

Simulated labelling, the true labels as the oracle (a pool image's label is read only once it is picked):

- ``--set eurosat``: EuroSAT RGB, 64 px, the satellite preset. Test: bench quality's 2,000 tiles (its default
  draw, ``--per-class 50``: 200 tiles per class). Start: 2 labelled tiles per class drawn by the seed from the
  other tiles; pool: ``--pool`` more of those, drawn by the seed.
- ``--set pneumonia``: PneumoniaMNIST (balanced), 28 px, the medical preset. Test: its published test split.
  Start: 10 per class from its train split, drawn by the seed; pool: ``--pool`` of the rest of that split.

The pool goes through the pool stage's work (``prepare_pool``: decoded as ingest does, duplicates of labelled
and test images left out), and after each round the pool images in a near-duplicate set with a newly labelled
one leave it, as the pool stage would leave them out at the next ``dvc repro``.

Rounds follow ``--schedule`` (labels in all, val included; the first is the start). Each round trains from
random init with bench quality's ``last`` recipe (the params.yaml defaults; ``--extra KEY=VALUE`` changes
it) for ``--epochs``, scores the test set (accuracy, and AUROC for two classes, with 95% bootstrap
intervals), then labels the difference to the next count by the strategy:

- ``random``: uniformly at random from the pool (the baseline: no diversity rule);
- ``auto``: ``pipeline.active.suggest.suggest``, the suggest command's work with the round's model as the
  shipped one: typicality on its features while a class has fewer than 10 train labels, then BALD on views of
  the training augmentation (the recipe has no TTA); a diverse batch.

Validation: the fit needs a val split, so it is taken from the labelled images and counted in the labels: a
fifth of each class's (at least one where a class has two or more), chosen by a fixed random key per image
(the seed's), drawn afresh each round. At the start that is 1 of the 2 tiles per class (EuroSAT) or 2 of 10.

``--out`` gets ``active_<set>.csv`` (a row per round, appended as it finishes; ``--resume`` skips the rounds
there and continues the rest from ``active_<set>_picks.csv``, each round's picks, written before its row),
and ``active_<set>.png`` (test accuracy against labels, the mean over seeds and the mean 95% interval per
strategy), redrawn after each row; ``--plot-only`` redraws it from the CSV. One JSON line per round on stdout.
The seed sets the start, the pool, the val keys and the training seed. Hours on a CPU: outside ``make test``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import shutil
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import yaml

from benchmarks import REPO
from benchmarks.quality import (
    DATA,
    EUROSAT,
    ROWS,
    base_params,
    eurosat_draw,
    scored,
    train_model,
    write_members,
    write_pngs,
)
from pipeline import augment, config
from pipeline.active import acquisition
from pipeline.active import suggest as work
from pipeline.config import Params
from pipeline.data.ingest import ingest
from pipeline.data.pool import prepare_pool
from pipeline.data.pooled import Pool, load_pool
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import evaluate
from pipeline.pixels import unit_range
from pipeline.training.model import Classifier, Ensemble

SETS = {  # start per class, image size, augmentation preset
    "eurosat": (2, 64, "satellite"),
    "pneumonia": (10, 28, "medical"),
}
QUALITY_PER_CLASS = 50  # bench quality's default draw: its test tiles are the 200 after these in each class
STRATEGIES = ("random", "auto")
COLORS = {"random": "C7", "auto": "C0"}
FIELDS = ("set", "strategy", "seed", "round", "labels", "accuracy", "lo", "hi", "auroc", "seconds")
PICK_FIELDS = ("set", "strategy", "seed", "round", "path", "label")
OUT = REPO / "docs" / "benchmarks" / "active"


class BenchError(PipelineError, ValueError):
    """A bench argument or file that cannot work; the message says which."""


# ---- the labelling simulation's pure parts (tested on tiny synthetic data) ----


def parse_schedule(text: str, start: int) -> list[int]:
    """Labels in all per round, increasing, the first the start's count."""
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--schedule {text}: give label counts separated by commas, e.g. 20,40,80") from None
    if not counts or counts[0] != start or any(b <= a for a, b in itertools.pairwise(counts)):
        raise BenchError(
            f"--schedule {text}: increasing label counts from the start's {start}, e.g. {start},40,80"
        )
    return counts


def val_mask(labels: Sequence[str], keys: np.ndarray) -> np.ndarray:
    """Which labelled images are val: per class, the ``round(n / 5)`` with the smallest keys (at least 1 where
    n >= 2, none where n = 1)."""
    names = np.asarray(labels)
    out = np.zeros(len(names), dtype=bool)
    for cls in np.unique(names):
        members = np.flatnonzero(names == cls)
        n_val = 0 if len(members) < 2 else max(1, round(len(members) / 5))
        out[members[np.argsort(keys[members], kind="stable")[:n_val]]] = True
    return out


def image_keys(paths: Sequence[str], seed: int) -> np.ndarray:
    """A fixed random key in [0, 1) per image from its file name and the seed: the same in every round and for
    every strategy."""
    return np.array(
        [np.random.default_rng([seed, zlib.crc32(Path(p).name.encode())]).random() for p in paths]
    )


def completed(csv_path: Path, name: str, strategy: str, seed: int) -> list[int]:
    """The rounds of (set, strategy, seed) already in the CSV, in order."""
    if not csv_path.is_file():
        return []
    rows = pd.read_csv(csv_path, dtype={"set": str, "strategy": str})
    mine = rows[(rows["set"] == name) & (rows["strategy"] == strategy) & (rows["seed"] == seed)]
    return sorted(mine["round"].astype(int).tolist())


def picked_before(
    picks_path: Path, name: str, strategy: str, seed: int, before: int
) -> tuple[list[str], list[int]]:
    """The file names (set, strategy, seed) labelled in rounds 2..``before`` (the pool images that round
    ``before`` trains on), in labelling order, and the round of each; later rounds' picks (a run killed
    between its picks and its row) are dropped from the file, to be picked again."""
    if not picks_path.is_file():
        return [], []
    picks = pd.read_csv(picks_path, dtype={"set": str, "strategy": str, "path": str, "label": str})
    mine = (picks["set"] == name) & (picks["strategy"] == strategy) & (picks["seed"] == seed)
    stale = mine & (picks["round"] > before)
    if stale.any():
        picks[~stale].to_csv(picks_path, index=False)
    return picks.loc[mine & ~stale, "path"].tolist(), picks.loc[mine & ~stale, "round"].astype(int).tolist()


def append_row(path: Path, fields: Sequence[str], row: dict) -> None:
    new = not path.is_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def plot(csv_path: Path, png: Path) -> None:
    """Test accuracy against labels: per strategy the mean over seeds and the mean 95% interval as a band,
    each seed's points faint; random's accuracy at its most labels as a dashed line (the target to reach)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = pd.read_csv(csv_path, dtype={"set": str, "strategy": str})
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy, group in rows.groupby("strategy", sort=True):
        color = COLORS.get(strategy, "C2")
        mean = group.groupby("labels")[["accuracy", "lo", "hi"]].mean()
        seeds = group["seed"].nunique()
        ax.plot(mean.index, mean["accuracy"], "o-", color=color, label=f"{strategy} ({seeds} seeds)")
        ax.fill_between(mean.index, mean["lo"], mean["hi"], color=color, alpha=0.2, linewidth=0)
        ax.scatter(group["labels"], group["accuracy"], color=color, s=8, alpha=0.4)
        if strategy == "random":
            ax.axhline(mean["accuracy"].iloc[-1], color=color, linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ticks = sorted(rows["labels"].unique())
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labels (train + val)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"active learning: {', '.join(sorted(rows['set'].unique()))}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


# ---- the data: a start, a pool through the pool stage, a test set ----


@dataclass(frozen=True)
class Simulation:
    """The start's labelled images and the test set (ingested), the pool (the pool stage's work) and the
    oracle; ``images``: the labelled cache's rows, then the pool's, so one array serves every round."""

    prepared: Prepared
    pool: Pool
    oracle: dict[str, str]  # pool file name -> its true label
    images: np.ndarray
    sets: np.ndarray  # near-duplicate set per pool image (work.duplicate_sets)


def _choose(labels: np.ndarray, per_class: int, pool: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, pool) indices into ``labels``: ``per_class`` of each class, then ``pool`` of the rest."""
    rng = np.random.default_rng(seed)
    start = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    )
    rest = np.setdiff1d(np.arange(len(labels)), start)
    return start, np.sort(rng.choice(rest, min(pool, len(rest)), replace=False))


def _eurosat(tar: Path, per_class: int, pool: int, seed: int, root: Path) -> pd.DataFrame:
    """The start, pool and test tiles extracted under ``root`` with a manifest (path, label, split: train for
    start and pool, test)."""
    with tarfile.open(tar) as archive:
        drawn = list(eurosat_draw(archive, QUALITY_PER_CLASS, draw=0, pool=True))
        test = [(m, c, "test") for m, c, s in drawn if s == "test"]
        others = [(m, c, "train") for m, c, s in drawn if s != "test"]
        start, chosen = _choose(np.array([c for _, c, _ in others]), per_class, pool, seed)
        write_members(archive, [others[i] for i in np.concatenate([start, chosen])] + test, root)
    return pd.read_csv(root / "manifest.csv")


def _pneumonia(npz: Path, per_class: int, pool: int, seed: int, root: Path) -> pd.DataFrame:
    """Its train and test splits as PNG files under ``root``, the published val split left out."""
    write_pngs(npz, root)
    table = pd.read_csv(root / "manifest.csv")
    train = table[table["split"] == "train"].reset_index(drop=True)
    start, chosen = _choose(train["label"].to_numpy(), per_class, pool, seed)
    return pd.concat([train.iloc[np.concatenate([start, chosen])], table[table["split"] == "test"]])


def simulation(name: str, data: Path, pool: int, seed: int, params: Params, root: Path) -> Simulation:
    """Files in, the start and test ingested, the pool prepared against them as the pool stage does."""
    per_class = SETS[name][0]
    files = root / "files"
    make = _eurosat if name == "eurosat" else _pneumonia
    table = make(data, per_class, pool, seed, files).reset_index(drop=True)
    is_test = (table["split"] == "test").to_numpy()
    # ``_choose``'s order: the start's rows first, then the pool's, then the test split's
    is_start = np.arange(len(table)) < per_class * table.loc[~is_test, "label"].nunique()
    labelled, unlabelled = root / "labelled", root / "unlabelled"
    start = table[is_start | is_test].copy()
    first = table[is_start]  # its split as each round draws it (round_prepared)
    val = val_mask(first["label"].tolist(), image_keys(first["path"].tolist(), seed))
    start.loc[is_start[is_start | is_test], "split"] = np.where(val, "val", "train")
    for folder, rows in ((labelled, start), (unlabelled, table[~is_start & ~is_test])):
        for path in rows["path"]:
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (files / path).rename(folder / path)
    start.to_csv(labelled / "manifest.csv", index=False)
    pooled = table[~is_start & ~is_test]
    pooled[["path"]].to_csv(unlabelled / "manifest.csv", index=False)
    with contextlib.redirect_stdout(sys.stderr):
        ingest(labelled, root / "prepared", seed=seed, data=params.data)
        prepare_pool(unlabelled, root / "pool", data=params.data, labelled=root / "prepared")
    prepared, kept = load_prepared(root / "prepared"), load_pool(root / "pool")
    shutil.rmtree(files, ignore_errors=True)
    images = np.concatenate([np.asarray(prepared.images), np.asarray(kept.images)])
    oracle = dict(zip(pooled["path"].map(lambda p: Path(p).name), pooled["label"], strict=True))
    return Simulation(
        prepared, kept, oracle, images, work.duplicate_sets(kept, params.data.near_duplicate_bits)
    )


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units: the train split's, as ingest records them."""
    unit = unit_range(images).reshape(-1, images.shape[-1]).astype(np.float64)
    return tuple(unit.mean(0).tolist()), tuple(unit.std(0).tolist())


def round_prepared(sim: Simulation, picked: np.ndarray, seed: int) -> Prepared:
    """The labelled set of a round as ingest would split it: the start and the ``picked`` pool rows (kept
    order) with their oracle labels, val re-drawn by ``val_mask``, and the test split; one cache for all."""
    start = sim.prepared.table
    kept = sim.pool.kept().iloc[picked]
    names = kept["path"].map(lambda p: Path(p).name)
    labels = names.map(sim.oracle)
    classes = list(sim.prepared.classes)
    added = pd.DataFrame(
        {
            "path": kept["path"].to_numpy(),
            "label": labels.to_numpy(),
            "label_index": [classes.index(c) for c in labels],
            "split": "train",
            "cache_index": len(sim.prepared.images) + kept["cache_index"].to_numpy(),
            "sha256": kept["sha256"].to_numpy(),
        }
    )
    table = pd.concat([start[start["split"] != "test"], added], ignore_index=True)
    val = val_mask(table["label"].tolist(), image_keys(table["path"].tolist(), seed))
    table["split"] = np.where(val, "val", "train")
    table = pd.concat([table, start[start["split"] == "test"]], ignore_index=True)
    table = table.astype({"label_index": "int64", "cache_index": "int64"})  # no picks yet: an empty frame's
    mean, std = _stats(sim.images[table.loc[table["split"] == "train", "cache_index"].to_numpy()])
    return Prepared(table, sim.images, sim.prepared.classes, "", mean, std, sim.prepared.report)


def round_pool(sim: Simulation, remaining: np.ndarray) -> Pool:
    """The pool left to label: the kept rows ``remaining`` (indices), renumbered over their own images."""
    table = sim.pool.kept().iloc[remaining].assign(cache_index=np.arange(len(remaining)))
    return Pool(sim.pool.name, table, sim.images[len(sim.prepared.images) :][remaining], sim.pool.report, "")


# ---- the rounds ----


def params_for(
    name: str, epochs: int, seed: int, augment_file: Path, extra: dict[str, Any] | None = None
) -> Params:
    """Bench quality's ``last`` row (the params.yaml recipe) at ``epochs``; the training augmentation is
    saved where suggest reads it (its draws when the recipe has no TTA)."""
    _, size, preset = SETS[name]
    base = base_params(size, epochs, seed, preset)
    overrides = ROWS["last"] | {"train.max_epochs": epochs, "paths.augment_pipeline": str(augment_file)}
    overrides |= extra or {}
    return config.with_overrides(base, overrides)


def next_picks(
    strategy: str,
    sim: Simulation,
    params: Params,
    prepared: Prepared,
    remaining: np.ndarray,
    budget: int,
    rnd: int,
    model: Ensemble,
) -> tuple[np.ndarray, str]:
    """Kept-pool indices to label next and what chose them."""
    if strategy == "random":
        order = acquisition.rank_random(len(remaining), params.seed * 1000 + rnd).order
        return remaining[order[:budget]], "random"
    suggestion, picks = work.suggest(
        params,
        budget,
        "auto",
        [cast(Classifier, m) for m in model.members],
        prepared,
        round_pool(sim, remaining),
    )
    return remaining[picks], suggestion.strategy


def train_and_score(params: Params, prepared: Prepared, transform, out: Path) -> tuple[Ensemble, dict, int]:
    """(model, test metrics with intervals, epochs run): one fit from random init, as bench quality's rows."""
    model, _, epochs_run, _ = train_model(params, prepared, transform, out)
    shutil.rmtree(out, ignore_errors=True)  # its checkpoints: the model is in memory
    test, val = (prepared.split(s) for s in ("test", "val"))
    arrays = {
        s: (prepared.images[t["cache_index"].to_numpy()], t["label_index"].to_numpy())
        for s, t in (("test", test), ("val", val))
    }
    scores = evaluate(
        model, *arrays["test"], prepared.classes, params.evaluate, params.seed, (), val=arrays["val"]
    )
    return model, scored(scores.metrics, "test"), epochs_run


def run_seed(
    name: str, strategy: str, seed: int, args: argparse.Namespace, sim: Simulation, scratch: Path
) -> None:
    csv_path, picks_path, png = (args.out / f"active_{name}{s}" for s in (".csv", "_picks.csv", ".png"))
    schedule = args.schedule
    done = completed(csv_path, name, strategy, seed) if args.resume else []
    if len(done) >= len(schedule):
        return
    first = len(done) + 1  # rounds are 1-based; a resumed run continues after the last row it wrote
    augment_file = scratch / "train_transforms.json"
    params = params_for(name, args.epochs, seed, augment_file, args.extra)
    kept_names = sim.pool.kept()["path"].map(lambda p: Path(p).name).tolist()
    index = {n: i for i, n in enumerate(kept_names)}
    paths, rounds = picked_before(picks_path, name, strategy, seed, first)
    if first > 1 and first not in rounds:  # a longer --schedule than the rows': the last round picks again
        first -= 1
    picked = [index[Path(p).name] for p in paths]
    remaining = np.setdiff1d(np.arange(len(kept_names)), np.flatnonzero(np.isin(sim.sets, sim.sets[picked])))
    for rnd in range(first, len(schedule) + 1):
        began, cpu = time.perf_counter(), time.process_time()
        prepared = round_prepared(sim, np.asarray(picked, dtype=np.int64), seed)
        transform = augment.build(
            params.augment.transforms, seed, preset=params.augment.preset, dtype=prepared.images.dtype
        )
        augment.save(transform, augment_file)
        model, metrics, epochs_run = train_and_score(params, prepared, transform, scratch / f"fit-{rnd}")
        fit_cpu = time.process_time() - cpu
        labels = len(prepared.table) - len(prepared.split("test"))
        chose = ""
        budget = min(schedule[rnd] - labels, len(remaining)) if rnd < len(schedule) else 0
        if budget > 0:
            new, chose = next_picks(strategy, sim, params, prepared, remaining, budget, rnd, model)
            key = {"set": name, "strategy": strategy, "seed": seed, "round": rnd + 1}
            for i in new:  # before the round's row: a resumed run finds what the next round trains on
                append_row(
                    picks_path, PICK_FIELDS, key | {"path": kept_names[i], "label": sim.oracle[kept_names[i]]}
                )
            picked += [int(i) for i in new]
            remaining = remaining[~np.isin(sim.sets[remaining], sim.sets[new])]
        row = {
            "set": name,
            "strategy": strategy,
            "seed": seed,
            "round": rnd,
            "labels": labels,
            "accuracy": round(metrics["accuracy"], 4),
            "lo": round(metrics["accuracy_ci_low"], 4),
            "hi": round(metrics["accuracy_ci_high"], 4),
            "auroc": round(metrics["auroc"], 4) if len(prepared.classes) == 2 else "",
            "seconds": round(time.perf_counter() - began, 1),
        }
        if rnd not in done:
            append_row(csv_path, FIELDS, row)
        print(
            json.dumps(
                {
                    "bench": "active",
                    **row,
                    "train": int((prepared.table["split"] == "train").sum()),
                    "epochs_run": epochs_run,
                    "next_by": chose,
                    "pool_left": len(remaining),
                    "threads": torch.get_num_threads(),
                    "fit_cpu_s": round(fit_cpu, 1),  # CPU seconds: fit and test scoring, then the picks
                    "pick_cpu_s": round(time.process_time() - cpu - fit_cpu, 1),
                }
            ),
            flush=True,
        )
        plot(csv_path, png)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", choices=list(SETS), default="eurosat", help="(default: %(default)s)")
    parser.add_argument("--data", type=Path, help=f"the set's file (default: {EUROSAT} or {DATA})")
    parser.add_argument(
        "--pool", type=int, default=5000, help="unlabelled pool images (default: %(default)s)"
    )
    parser.add_argument(
        "--schedule", default="20,40,80,160,300,500", help="labels in all per round (default: %(default)s)"
    )
    parser.add_argument("--epochs", type=int, default=40, help="train.max_epochs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="(default: %(default)s)")
    parser.add_argument(
        "--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), help="(default: %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="(default: docs/benchmarks/active)")
    parser.add_argument(
        "--extra",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="params overrides on top of the recipe (YAML values), e.g. 'evaluate.tta=[HorizontalFlip]'",
    )
    parser.add_argument("--resume", action="store_true", help="skip the rounds already in the CSV")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from the CSV and stop")


def main(params: Params, args: argparse.Namespace) -> None:
    """``params`` play no part: each round states its own (bench quality's ``last`` row)."""
    csv_path, png = args.out / f"active_{args.set}.csv", args.out / f"active_{args.set}.png"
    if args.plot_only:
        if not csv_path.is_file():
            raise BenchError(f"{csv_path}: not found; run bench active --set {args.set} first")
        plot(csv_path, png)
        print(f"bench active: {png}")
        return
    args.data = args.data or (EUROSAT if args.set == "eurosat" else DATA)
    if not args.data.is_file():
        raise BenchError(
            f"{args.data}: not found (the shared data sets live in ../shared/data; or give --data)"
        )
    per_class = SETS[args.set][0]
    args.extra = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.extra)}
    n_classes = 10 if args.set == "eurosat" else 2
    args.schedule = parse_schedule(args.schedule, per_class * n_classes)
    picks_path = args.out / f"active_{args.set}_picks.csv"
    for there in (csv_path, picks_path):
        if not args.resume and there.is_file():
            raise BenchError(f"{there}: already there; add --resume to continue it, or move it away")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="bench-active-") as tmp:
            sim = None
            for strategy in args.strategies:
                if args.resume and len(completed(csv_path, args.set, strategy, seed)) >= len(args.schedule):
                    continue
                if sim is None:  # the start, pool and test of this seed: shared by the strategies
                    data_params = params_for(
                        args.set, args.epochs, seed, Path(tmp) / "unused.json", args.extra
                    )
                    sim = simulation(args.set, args.data, args.pool, seed, data_params, Path(tmp) / "data")
                run_seed(args.set, strategy, seed, args, sim, Path(tmp))
