"""``python -m pipeline bench quality``: test quality of the small-data methods on real held-out sets.

Two sets from ../shared/data, handed in as a user would (image files plus a manifest with a split
column), from random init (no pretrained weights on these machines):

- ``--set pneumonia``: PneumoniaMNIST (the balanced subset, its published train/val/test split,
  28 px or ``--size``, grayscale replicated to RGB), the medical preset without flips;
- ``--set eurosat``: EuroSAT RGB, ``--per-class K`` labelled images per class (a fifth of them the
  val split), tested on ``EUROSAT_TEST_PER_CLASS`` (200) other images of each of the 10 classes
  (2,000), the satellite preset, 64 px.

Rows, each adding to the one before (``ROWS``):

- ``single``: the params.yaml defaults before issue 12 (20 epochs, early stopping and checkpoint on
  val/loss, patience 6);
- ``long``: 40 epochs, checkpoint and early stopping on val/auroc, patience 15;
- ``mix``: + MixUp (alpha 0.2) and CutMix (alpha 1.0), half the mixed batches each;
- ``ema``: + an EMA of the weights (decay 0.995); binary sets add the ``threshold`` row (the Youden
  threshold chosen on the held-out predictions);
- ``last``: ``ema`` with ``train.checkpoint: last`` (all 40 epochs, the schedule's end ships): the
  params.yaml defaults since 2026-12-02;
- ``cv3``, ``cv5``: ``ema`` with ``data.folds: 3`` or ``5``: the fold models' ensemble on test (OOF
  scores beside); ``cv3_long``: ``long`` with 3 folds.

Each row prints one JSON line: test accuracy and AUROC with 95% bootstrap intervals (1000 resamples),
epochs, seconds. Not part of ``make test``; minutes per row on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from benchmarks import SHARED_DATA
from benchmarks.speed import PLAIN_RECIPE
from pipeline import augment, config
from pipeline.config import Params
from pipeline.data.ingest import ingest
from pipeline.data.pool import prepare_pool
from pipeline.data.pooled import load_pool
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.errors import PipelineError
from pipeline.evaluation.evaluate import evaluate
from pipeline.training import crossval
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Ensemble
from pipeline.training.oof import cv_metrics, oof_logits
from pipeline.training.resume import Resume

DATA = SHARED_DATA / "pneumoniamnist_balanced.npz"
EUROSAT = SHARED_DATA / "eurosat_rgb.tar"
EUROSAT_TEST_PER_CLASS = 200
CLASSES = ("normal", "pneumonia")
LONG = {"train.max_epochs": 40, "train.monitor": "val/auroc", "train.patience": 15}
MIX = {"augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 1.0, "augment.cutmix_switch_prob": 0.5}
EMA = {"train.ema_decay": 0.995}
ROWS: dict[str, dict[str, Any]] = {
    "single": {"train.max_epochs": 20, "train.monitor": "val/loss", "train.patience": 6},
    "long": LONG,
    "mix": LONG | MIX,
    "ema": LONG | MIX | EMA,
    "last": LONG | MIX | EMA | {"train.checkpoint": "last"},
    "cv3": LONG | MIX | EMA | {"data.folds": 3},
    "cv5": LONG | MIX | EMA | {"data.folds": 5},
    "cv3_long": LONG | {"data.folds": 3},
    # issue 26: ``last`` learning also from an unlabelled pool (``--pool``), FixMatch at the params.yaml settings
    "fixmatch": LONG | MIX | EMA | {"train.checkpoint": "last", "train.semi": "fixmatch"},
}


def write_pngs(npz: Path, root: Path, fraction: float | None = None, pool: Path | None = None) -> Path:
    """The arrays as PNG files and a manifest (path, label, split) keeping the published split. ``fraction``:
    only that share of the train split is labelled (drawn per class, draw 0); the rest of it is written to
    ``pool`` without a manifest (the unlabelled pool: its labels are never read)."""
    arrays = np.load(npz)
    rows = []
    labelled = np.ones(len(arrays["train_labels"]), bool)
    if fraction is not None:
        train_labels = arrays["train_labels"][:, 0]
        rng, labelled[:] = np.random.default_rng(0), False
        for label in np.unique(train_labels):
            members = rng.permutation(np.flatnonzero(train_labels == label))
            labelled[members[: max(1, round(fraction * len(members)))]] = True
    for split in ("train", "val", "test"):
        for i, (image, label) in enumerate(
            zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0], strict=True)
        ):
            name = f"{split}/{CLASSES[label]}_{i:04d}.png"
            if split == "train" and not labelled[i]:
                if pool is not None:
                    pool.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image).save(pool / f"{i:05d}.png")
                continue
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name)
            rows.append(f"{name},{CLASSES[label]},{split}")
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root


def eurosat_draw(
    archive: tarfile.TarFile, per_class: int, draw: int = 0, pool: bool = False, pool_size: int = 0
) -> Iterator[tuple[tarfile.TarInfo, str, str]]:
    """(member, class, split) of the bench's draw: ``per_class`` labelled tiles per class (a fifth of
    them val) and EUROSAT_TEST_PER_CLASS others for test; ``pool``: every other tile too, split "pool"
    (the unlabelled images of docs/prototypes/fixmatch.py), or with ``pool_size`` that many of them drawn at
    random, after the rest (the draw goes class by class: the first ``pool_size`` would be one or two classes)."""
    members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")]
    by_class: dict[str, list[tarfile.TarInfo]] = {}
    for member in sorted(members, key=lambda m: m.name):
        by_class.setdefault(Path(member.name).parent.name, []).append(member)
    rng = np.random.default_rng(draw)
    n_val = max(1, round(per_class / 5))
    others: list[
        tuple[tarfile.TarInfo, str, str]
    ] = []  # the pool's tiles, when ``pool_size`` of them are drawn
    for cls, files in sorted(by_class.items()):
        for j, k in enumerate(rng.permutation(len(files))):
            split = (
                "val" if j < n_val else "train" if j < per_class
                else "test" if j < per_class + EUROSAT_TEST_PER_CLASS else "pool"
            )  # fmt: skip
            if split == "pool" and not pool:
                break
            if split == "pool" and pool_size:
                others.append((files[k], cls, split))
                continue
            yield files[k], cls, split
    chosen = np.random.default_rng(draw).permutation(len(others))[:pool_size]
    yield from (others[i] for i in sorted(chosen))


def write_eurosat(
    tar: Path, root: Path, per_class: int, draw: int = 0, pool: Path | None = None, pool_size: int = 0
) -> Path:
    """``eurosat_draw``'s tiles extracted from the tar with a manifest (path, label, split); ``pool``: also
    ``pool_size`` (0: all) of the other tiles, drawn at random, there, without a manifest (labels never read)."""
    with tarfile.open(tar) as archive:
        drawn = list(eurosat_draw(archive, per_class, draw, pool=pool is not None, pool_size=pool_size))
        if pool is not None:
            pool.mkdir(parents=True, exist_ok=True)
            for member in (member for member, _, split in drawn if split == "pool"):
                stream = archive.extractfile(member)
                assert stream is not None, f"{member.name}: a regular file of the tar"
                (pool / Path(member.name).name).write_bytes(stream.read())
        return write_members(archive, [row for row in drawn if row[2] != "pool"], root)


def write_members(
    archive: tarfile.TarFile, members: Iterable[tuple[tarfile.TarInfo, str, str]], root: Path
) -> Path:
    """The tar's (member, class, split) extracted under ``root``/split with a manifest (path, label, split)."""
    rows = []
    for member, cls, split in members:
        name = f"{split}/{Path(member.name).name}"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        stream = archive.extractfile(member)
        assert stream is not None, f"{member.name}: a regular file of the tar"
        (root / name).write_bytes(stream.read())
        rows.append(f"{name},{cls},{split}")
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root


def base_params(size: int, epochs: int, seed: int, preset: str = "medical") -> config.Params:
    return config.parse(
        {
            "seed": seed,
            # The published split holds identical images across train and val (intake finds 3): warn, keep it.
            "data": {"image_size": size, "on_leakage": "warn"},
            "model": {"weights": "none"},
            # medical: no flips (laterality matters in radiographs); satellite: the preset's flips and turns.
            # The rows add to the recipe before issue 12, so each measures what it names.
            "augment": {"preset": preset, "transforms": [], **PLAIN_RECIPE["augment"]},
            "train": {"accelerator": "cpu", "max_epochs": epochs, **PLAIN_RECIPE["train"]},
            "evaluate": {"tta": [], "bootstrap": 1000},
        }
    )


def scored(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {
        f"{m}{suffix}": metrics[f"{split}/{m}{suffix}"]
        for m in ("accuracy", "auroc")
        for suffix in ("", "_ci_low", "_ci_high")
        if f"{split}/{m}{suffix}" in metrics
    }


def ingested(raw: Path, root: Path, data: config.Data) -> Prepared:
    """Ingest once per fold count (the fold column is ingest's)."""
    out = root / f"prepared-{data.folds}"
    if not out.exists():
        with contextlib.redirect_stdout(sys.stderr):
            ingest(raw, out, seed=0, data=data)
    return load_prepared(out)


def pooled(raw: Path, root: Path, data: config.Data) -> tuple[np.ndarray, dict]:
    """The unlabelled pool in ``raw`` as the pool stage prepares it against the labelled set (its duplicates
    of labelled images and anything sharing a group with val/test left out): (pixels, the pool's report)."""
    out = root / "pool"
    if not out.exists():
        with contextlib.redirect_stdout(sys.stderr):
            prepare_pool(raw, out, data=data, labelled=root / f"prepared-{data.folds}")
    loaded = load_pool(out)
    return loaded.images, loaded.report


def train_model(
    params: config.Params, prepared: Prepared, transform, out: Path, pool: np.ndarray | None = None
) -> tuple[Ensemble, Any, int, dict]:
    """(model, held-out logits and labels or None, epochs run, CV metrics): one fit, or k folds and their ensemble."""
    with contextlib.redirect_stdout(sys.stderr):  # per-epoch lines; stdout is for the JSON lines
        if not params.data.folds:
            result = fit(params, datamodule(params, prepared, transform, pool=pool), out_dir=out)
            return (
                Ensemble([result.best_model()]),
                None,
                result.epochs_run,
                {},
            )
        folds = crossval.fit_folds(params, prepared, transform, Resume(out, "bench"))
    members, oof = [r.best_model() for r in folds.results], folds.oof
    assert oof is not None, "cross-validation leaves out-of-fold predictions"
    held_out = (oof_logits(oof, prepared.classes), oof["label_index"].to_numpy())
    cv = cv_metrics(oof, prepared.classes, positive=1)
    return (
        Ensemble(members),
        held_out,
        max(r.epochs_run for r in folds.results),
        {k: v for k, v in cv.items() if k in ("cv/accuracy", "cv/auroc")},
    )


def run(
    data: Path,
    size: int,
    epochs: int,
    seeds: list[int],
    rows: list[str],
    per_class: int | None = None,
    extra: dict[str, Any] | None = None,
    pool_size: int | None = None,
    fraction: float | None = None,
) -> list[dict[str, Any]]:
    """``per_class`` set: EuroSAT (``data`` its tar) with that many labelled images per class; else
    PneumoniaMNIST (``data`` its npz), ``fraction`` of its train split labelled. ``pool_size`` (None: no
    pool; 0: every other image): the unlabelled pool the ``fixmatch`` row learns from, the EuroSAT tiles
    outside the draw or PneumoniaMNIST's unlabelled train images."""
    results = []
    eurosat = per_class is not None
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        pool_raw = Path(tmp) / "unlabelled" if pool_size is not None else None
        raw = (
            write_eurosat(data, Path(tmp) / "raw", per_class, pool=pool_raw, pool_size=pool_size or 0)
            if per_class is not None
            else write_pngs(data, Path(tmp) / "raw", fraction, pool=pool_raw)
        )
        if pool_raw is not None and not eurosat and pool_size:
            for extra_file in sorted(pool_raw.iterdir())[pool_size:]:
                extra_file.unlink()
        for seed in seeds:
            for name, overrides in ((n, ROWS[n]) for n in rows):
                base = base_params(size, epochs, seed, "satellite" if eurosat else "medical")
                params = config.with_overrides(base, overrides | (extra or {}))
                prepared = ingested(raw, Path(tmp), params.data)
                pool, pool_report = (
                    pooled(pool_raw, Path(tmp), params.data)
                    if pool_raw is not None and params.train.semi != "none"
                    else (None, {})
                )
                arrays = {
                    s: (
                        prepared.images[prepared.split(s)["cache_index"].to_numpy()],
                        prepared.split(s)["label_index"].to_numpy(),
                    )
                    for s in ("val", "test")
                }
                transform = augment.build(
                    params.augment.transforms, seed, preset=params.augment.preset, dtype=prepared.images.dtype
                )
                start = time.perf_counter()
                model, held_out, epochs_run, cv = train_model(
                    params, prepared, transform, Path(tmp) / f"{name}-{seed}", pool
                )
                seconds = time.perf_counter() - start
                variants = [(name, params.evaluate)]
                if name == "ema" and len(prepared.classes) == 2:
                    variants.append(("threshold", dataclasses.replace(params.evaluate, threshold="youden")))
                for row, settings in variants:
                    out = evaluate(
                        model,
                        *arrays["test"],
                        prepared.classes,
                        settings,
                        seed,
                        (),
                        val=arrays["val"],
                        held_out=held_out,
                    )
                    split = "test_threshold" if row == "threshold" else "test"
                    line = {
                        "bench": "quality",
                        "set": f"eurosat-{per_class}"
                        if eurosat
                        else "pneumonia"
                        if fraction is None
                        else f"pneumonia-{fraction:g}",
                        "n_train": len(prepared.split("train")),
                        **(
                            {"n_pool": len(pool), "pool_excluded": pool_report.get("excluded", {}).get("n")}
                            if pool is not None
                            else {}
                        ),
                        "row": row,
                        **({"extra": extra} if extra else {}),
                        "seed": seed,
                        "image_size": size,
                        "max_epochs": params.train.max_epochs,
                        "epochs_run": epochs_run,
                        "fit_s": round(seconds, 1),
                        **{k: round(v, 4) for k, v in scored(out.metrics, split).items()},
                        **cv,
                    }
                    if row == "threshold":  # AUROC does not depend on the cut: the ema row's
                        line |= {
                            "threshold": out.metrics["decision/threshold"],
                            **{
                                k: round(v, 4) for k, v in scored(out.metrics, "test").items() if "auroc" in k
                            },
                        }
                    print(json.dumps(line), flush=True)
                    results.append(line)
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", choices=["pneumonia", "eurosat"], default="pneumonia", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--pool",
        type=int,
        metavar="N",
        help="an unlabelled pool of N images (0: all) for the fixmatch row: EuroSAT's tiles outside the draw, "
        "PneumoniaMNIST's train images left unlabelled by --fraction",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        help="pneumonia: the share of its train split that is labelled (default: all)",
    )
    parser.add_argument("--data", type=Path, help=f"the set's file (default: {DATA} or {EUROSAT})")
    parser.add_argument("--per-class", type=int, default=50, help="eurosat: labelled images per class")
    parser.add_argument("--size", type=int, help="data.image_size (default: 28 pneumonia, 64 eurosat)")
    parser.add_argument("--epochs", type=int, default=20, help="train.max_epochs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: %(default)s)")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=["single", "ema", "mix"],
        help="rows to train (the threshold row comes with ema; default: all)",
    )
    parser.add_argument(
        "--extra",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="params overrides on top of every row (YAML values), e.g. train.max_epochs=100",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    """The rows on the chosen set; ``params`` play no part (each row states its own)."""
    extra = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.extra)}
    eurosat = args.set == "eurosat"
    args.data = args.data or (EUROSAT if eurosat else DATA)
    args.size = args.size or (64 if eurosat else 28)
    if not args.data.is_file():
        raise PipelineError(f"{args.data}: not found (the shared data sets live in ../shared/data)")
    if "fixmatch" in args.rows and args.pool is None:
        raise PipelineError("--rows fixmatch: give the unlabelled pool's size with --pool N (0: all)")
    run(
        args.data,
        args.size,
        args.epochs,
        args.seeds,
        args.rows,
        args.per_class if eurosat else None,
        extra,
        args.pool,
        None if eurosat else args.fraction,
    )
