"""``python -m pipeline bench transfer``: does transfer from the pipeline's own pretraining help, and how?

A ResNet-18 is pretrained by :func:`pipeline.training.fit.fit` on five EuroSAT classes, then adapted to the
other five with K labelled images per class (K in ``SHOTS``) and tested on ``TEST_PER_CLASS`` other
images of each: from scratch, linear probe, kNN, fine-tuning everything at one learning rate, the
small-data recipe (frozen warm-up + lower backbone lr; the default until 2026-12-02) and gradual
unfreezing, LP-FT; accuracy with a bootstrap 95% interval per row, averaged over ``SEEDS`` draws.

``--target pneumonia`` adapts the same EuroSAT backbone to PneumoniaMNIST instead (chest X-rays, 28 px
grayscale upsampled to the bench's size and replicated to RGB, the medical preset without flips): a large shift
of domain and sensor, standing in for the issue's second sensor (UC Merced), which these machines cannot
download. K images per class come from its published train and val splits, its published test split (468
images) tests.

Not part of ``make test`` (minutes on 2 cores). The data is the shared EuroSAT RGB tar
(``--eurosat``), extracted to a scratch folder (``--work``), never into the repository. On the 2-core
machine a pretraining epoch over all the images at 64 px (the defaults) costs minutes: ``--size``,
``--pretrain-per-class`` and ``--pretrain-epochs`` trade it down; the settings are printed with the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from benchmarks import SHARED_DATA
from benchmarks.quality import write_pngs
from benchmarks.speed import PLAIN_RECIPE, emit
from pipeline import augment, config
from pipeline.config import Params
from pipeline.data.ingest import ingest
from pipeline.data.listing import MANIFEST_CSV
from pipeline.data.prepared import SPLITS_CSV, Prepared, load_prepared
from pipeline.evaluation.predictions import predict_proba
from pipeline.runinfo import RUN_INFO, Preprocessing, RunInfo, WeightsInfo, model_sha256
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Classifier

EUROSAT = SHARED_DATA / "eurosat_rgb.tar"
PNEUMONIA = SHARED_DATA / "pneumoniamnist_balanced.npz"
PRESETS = {"eurosat": "satellite", "pneumonia": "medical"}  # the target's augmentation preset
PRETRAIN_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial")
TARGET_CLASSES = ("Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
SIZE = 64
PRETRAIN_PER_CLASS, PRETRAIN_EPOCHS = None, 10  # None: every image of the pretraining classes
SHOTS = (10, 20, 50)
VAL_PER_CLASS = 5  # labelled images held out of K for early stopping, on top of K (said in the table)
TEST_PER_CLASS = 250  # 1,250 test images, none of them among the labelled ones
POOL_PER_CLASS = 100  # the K training and VAL_PER_CLASS validation images are drawn from these
SEEDS = (0,)
ADAPT_EPOCHS = 12
# The small-data recipe as it was the default before issue 14's measurement (explicit: the defaults moved).
RECIPE = {"freeze_epochs": 2, "backbone_lr_mult": 0.1}


def extract(tar: Path, work: Path) -> Path:
    """The EuroSAT folder (``<Class>/<Class>_<n>.jpg``) under ``work``, extracted once."""
    root = work / "eurosat"
    if not (root / TARGET_CLASSES[-1]).is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as archive:
            archive.extractall(root, filter="data")
    return root


def files_of(root: Path, cls: str) -> list[Path]:
    return sorted((root / cls).glob("*.jpg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def link_set(folder: Path, rows: list[tuple[Path, str, str]]) -> Path:
    """A manifest folder (``path,label,split``) of hard links to the chosen files (copies across file
    systems): ingest's predefined split. Not symbolic links: ingest refuses a link that resolves outside
    the folder it reads (``pipeline.data.sources``), as it would for a user's set."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (src, label, split) in enumerate(rows):
        link = folder / f"{i:06d}{src.suffix}"
        if not link.exists():
            try:
                os.link(src, link)
            except OSError:  # another file system, or links not allowed there
                shutil.copyfile(src, link)
        records.append({"path": link.name, "label": label, "split": split})
    pd.DataFrame(records).to_csv(folder / MANIFEST_CSV, index=False)
    return folder


def bench_params(seed: int = 0, size: int = SIZE, preset: str = "satellite", **sections) -> config.Params:
    base = {
        "seed": seed,
        "data": {"image_size": size, "near_duplicate_bits": None, "on_leakage": "warn"},
        # The recipe the documented tables were measured with (docs/benchmarks.md).
        "augment": {"preset": preset, "transforms": [], **PLAIN_RECIPE["augment"]},
        "train": {"accelerator": "cpu", "batch_size": 64, "num_workers": 0, **PLAIN_RECIPE["train"]},
    }
    for name, values in sections.items():
        base[name] = base.get(name, {}) | values
    return config.parse(base)


def pretrain_rows(root: Path, per_class: int | None = PRETRAIN_PER_CLASS) -> list[tuple[Path, str, str]]:
    """``per_class`` images of each pretraining class (None: all), a tenth each for val and test."""
    rng = np.random.default_rng(0)
    rows = []
    for cls in PRETRAIN_CLASSES:
        files = files_of(root, cls)
        chosen = rng.permutation(len(files))[:per_class]
        n_val = n_test = len(chosen) // 10
        for j, k in enumerate(chosen):
            rows.append((files[k], cls, "val" if j < n_val else "test" if j < n_val + n_test else "train"))
    return rows


def pretrain(
    root: Path,
    work: Path,
    size: int = SIZE,
    per_class: int | None = PRETRAIN_PER_CLASS,
    epochs: int = PRETRAIN_EPOCHS,
) -> Path:
    """Fit from random init on the pretraining classes; a ``models/``-like folder (best.ckpt + run.json).

    A pretraining stopped early (killed for time) is taken up from its best checkpoint so far.
    """
    out = work / "pretrain"
    models = out / "models"
    if (models / RUN_INFO).is_file():
        return models
    params = bench_params(
        size=size,
        model={"weights": "none"},
        train={"max_epochs": epochs, "patience": 3, "lr": 2e-3, "freeze_epochs": 0},
    )
    best = out / "checkpoints" / "best.ckpt"
    seconds = None
    if not best.is_file():
        ingest(
            link_set(out / "raw", pretrain_rows(root, per_class)), out / "prepared", seed=0, data=params.data
        )
        pipeline = augment.build(params.augment.transforms, seed=0, preset=params.augment.preset)
        start = time.perf_counter()
        fit(
            params, datamodule(params, load_prepared(out / "prepared"), pipeline), out_dir=out / "checkpoints"
        )
        seconds = round(time.perf_counter() - start, 1)
    prepared = load_prepared(out / "prepared")
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(best, models / "best.ckpt")
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    # fit slims best.ckpt to the weights (pipeline.training.fit.slim_checkpoint): the score is in last.ckpt's callbacks
    callbacks = torch.load(best.with_name("last.ckpt"), map_location="cpu", weights_only=True)["callbacks"]
    score = next(
        v["best_model_score"]
        for k, v in callbacks.items()
        if k.startswith("ModelCheckpoint{'monitor': 'val/")
    )
    RunInfo(
        model_sha256=model_sha256([models / "best.ckpt"]),  # no MLflow run: the folder is read as a folder
        arch=params.model.arch,
        classes=prepared.classes,
        checkpoints=("best.ckpt",),
        monitor=params.train.monitor,
        best_score=float(score),
        epochs_run=int(checkpoint["epoch"]) + 1,
        weights=WeightsInfo(requested="none", source="random-init", pretrained=False),
        preprocessing=Preprocessing(size, params.data.channels, None, str(prepared.images.dtype)),
    ).write(models)
    model = Classifier.load_from_checkpoint(models / "best.ckpt", map_location="cpu")
    test = prepared.split("test")
    probs = predict_proba(model, np.asarray(prepared.images[test["cache_index"].to_numpy()]), 256)
    summary = {
        "classes": list(PRETRAIN_CLASSES),
        "images_per_class": per_class or "all",
        "image_size": size,
        "train_images": len(prepared.split("train")),
        "test_images": len(test),
        "best_epoch": int(checkpoint["epoch"]) + 1,
        "max_epochs": epochs,
        "seconds": seconds,
        **accuracy_ci(probs, test["label_index"].to_numpy()),
        "threads": torch.get_num_threads(),
    }
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
    emit("transfer_pretrain", **summary)
    return models


def accuracy_ci(probs: np.ndarray, labels: np.ndarray, resamples: int = 1000) -> dict[str, float]:
    """Accuracy with a 95% percentile bootstrap interval over the test images (seeded)."""
    correct = (probs.argmax(1) == labels).astype(float)
    rng = np.random.default_rng(0)
    means = correct[rng.integers(0, len(correct), (resamples, len(correct)))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"accuracy": round(correct.mean(), 4), "ci_low": round(low, 4), "ci_high": round(high, 4)}


def target_set(root: Path, work: Path, size: int = SIZE, target: str = "eurosat") -> Prepared:
    """The five target classes ingested once: TEST_PER_CLASS test images each, and a pool to draw K from;
    ``target`` pneumonia: PneumoniaMNIST, its published test split, its train and val splits the pool."""
    out = work / ("target" if target == "eurosat" else f"target-{target}")
    if not (out / "prepared" / SPLITS_CSV).is_file():
        raw = (
            write_pngs(PNEUMONIA, out / "raw")
            if target == "pneumonia"
            else link_set(out / "raw", target_rows(root))
        )
        ingest(raw, out / "prepared", seed=0, data=bench_params(size=size).data)
    return load_prepared(out / "prepared")


def target_rows(root: Path) -> list[tuple[Path, str, str]]:
    """EuroSAT's target classes: TEST_PER_CLASS test images and POOL_PER_CLASS others of each."""
    rng = np.random.default_rng(1)
    rows = []
    for cls in TARGET_CLASSES:
        files = files_of(root, cls)
        chosen = rng.permutation(len(files))[: TEST_PER_CLASS + POOL_PER_CLASS]
        # draw() deals the non-test images out per seed; ingest wants a val split in the manifest all the same
        split = ["test"] * TEST_PER_CLASS + ["val"] * VAL_PER_CLASS
        rows += [(files[k], cls, split[j] if j < len(split) else "train") for j, k in enumerate(chosen)]
    return rows


def draw(prepared: Prepared, shots: int, seed: int) -> Prepared:
    """``shots`` training and VAL_PER_CLASS validation images per class from the pool; the rest unused."""
    table = prepared.table.copy()
    rng = np.random.default_rng(100 + seed)
    pool = table.index[table["split"] != "test"]
    table.loc[pool, "split"] = "unused"
    for _, rows in table.loc[pool].groupby("label"):
        picked = rng.permutation(rows.index.to_numpy())
        table.loc[picked[:shots], "split"] = "train"
        table.loc[picked[shots : shots + VAL_PER_CLASS], "split"] = "val"
    return dataclasses.replace(prepared, table=table)


def methods(models: Path) -> dict[str, dict]:
    """Benchmark rows as params sections (on top of bench_params)."""
    w = {"weights": str(models)}
    return {
        "scratch": {"model": {"weights": "none"}, "train": {"freeze_epochs": 0}},
        "linear probe": {"model": w, "train": {"mode": "linear_probe"}},
        "kNN": {"model": w, "train": {"mode": "knn"}},
        "fine-tune all, one lr": {"model": w, "train": {"freeze_epochs": 0, "backbone_lr_mult": 1.0}},
        "recipe": {"model": w, "train": RECIPE},  # "default recipe" in results before 2026-12-02
        "gradual unfreezing": {"model": w, "train": RECIPE | {"unfreeze": "gradual"}},
        # The linear probe, then everything fine-tuned from its head at a tenth of the rate (Kumar et al. 2022).
        "LP-FT": {"model": w, "train": {"mode": "lp_ft", "freeze_epochs": 0, "lp_ft_lr_mult": 0.1}},
    }


def adapt(
    models: Path,
    target: Prepared,
    out: Path,
    only: set[str] | None = None,
    seeds: tuple[int, ...] = SEEDS,
    size: int = SIZE,
    preset: str = "satellite",
) -> None:
    """Every method at every K; one JSON line per (method, K, seed) appended to ``out``."""
    done = (
        {(r["method"], r["shots"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())}
        if out.is_file()
        else set()
    )
    test = target.split("test")
    images, labels = np.asarray(target.images[test["cache_index"].to_numpy()]), test["label_index"].to_numpy()
    for shots in SHOTS:
        for seed in seeds:
            prepared = draw(target, shots, seed)
            for name, sections in methods(models).items():
                if (name, shots, seed) in done or (only and name not in only):
                    continue
                train = {"max_epochs": ADAPT_EPOCHS, "batch_size": 16} | sections["train"]
                params = bench_params(
                    seed=seed, size=size, preset=preset, model=sections["model"], train=train
                )
                pipeline = augment.build(params.augment.transforms, seed=seed, preset=params.augment.preset)
                start = time.perf_counter()
                with tempfile.TemporaryDirectory(prefix="adapt-") as tmp:
                    result = fit(params, datamodule(params, prepared, pipeline), out_dir=Path(tmp))
                    model = result.best_model()
                seconds = round(time.perf_counter() - start, 1)
                row = {
                    "method": name,
                    "shots": shots,
                    "seed": seed,
                    "test_images": len(labels),
                    **accuracy_ci(predict_proba(model, images, 256), labels),
                    "epochs_run": result.epochs_run,
                    "pretrained": result.weights.pretrained,
                    "seconds": seconds,
                }
                emit("transfer", **row)
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")


def table(results: Path) -> str:
    """The docs/benchmarks.md table: accuracy [95% CI] per method and K (mean over seeds when several)."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    frame = pd.DataFrame(rows)
    lines = ["| method | " + " | ".join(f"K = {k}" for k in SHOTS) + " |", "|---" * (len(SHOTS) + 1) + "|"]
    for name in dict.fromkeys(frame["method"]):
        cells = []
        for k in SHOTS:
            got = frame[(frame["method"] == name) & (frame["shots"] == k)]
            cells.append(
                "—"
                if got.empty
                else f"{got['accuracy'].mean():.3f} [{got['ci_low'].mean():.3f}, "
                f"{got['ci_high'].mean():.3f}] ({len(got)} seed{'s' * (len(got) > 1)}, "
                f"{got['seconds'].mean():.0f} s)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eurosat", type=Path, default=EUROSAT)
    parser.add_argument(
        "--target",
        choices=list(PRESETS),
        default="eurosat",
        help="adapt to EuroSAT's other five classes or to PneumoniaMNIST (default: %(default)s)",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/transfer-bench"))
    parser.add_argument("--pretrain-only", action="store_true")
    parser.add_argument("--size", type=int, default=SIZE, help="data.image_size (default: %(default)s)")
    parser.add_argument(
        "--pretrain-per-class", type=int, help="images of each pretraining class (default: all of them)"
    )
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS, help="default: %(default)s")
    parser.add_argument("--only", nargs="*", help="methods to run (default: all)")
    parser.add_argument(
        "--seeds",
        nargs="*",
        type=int,
        default=list(SEEDS),
        help="draws of the K labelled images (default: %(default)s); rows already in results are kept",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    """Pretrain, adapt, print the table; ``params`` play no part (the bench states its own settings)."""
    root = extract(args.eurosat, args.work)
    models = pretrain(root, args.work, args.size, args.pretrain_per_class, args.pretrain_epochs)
    if args.pretrain_only:
        return
    results = args.work / ("results.jsonl" if args.target == "eurosat" else f"results-{args.target}.jsonl")
    adapt(
        models,
        target_set(root, args.work, args.size, args.target),
        results,
        set(args.only) if args.only else None,
        tuple(args.seeds),
        args.size,
        PRESETS[args.target],
    )
    print(table(results))
