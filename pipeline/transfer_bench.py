"""``python -m pipeline.bench transfer``: does transfer from the pipeline's own pretraining help, and how?

A ResNet-18 is pretrained by :func:`pipeline.fit.fit` on five EuroSAT classes, then adapted to the
other five with K labelled images per class (K in ``SHOTS``) and tested on ``TEST_PER_CLASS`` other
images of each: from scratch, linear probe, kNN, fine-tuning everything at one learning rate, the
default recipe (frozen warm-up + lower backbone lr) and gradual unfreezing; accuracy with a bootstrap
95% interval per row, averaged over ``SEEDS`` draws of the labelled images.

Not part of ``make test`` (minutes on 2 cores). The data is the shared EuroSAT RGB tar
(``--eurosat``), extracted to a scratch folder (``--work``), never into the repository. On the 2-core
machine the pretraining runs at ``SIZE`` px on ``PRETRAIN_PER_CLASS`` images per class (the issue asks
for all of them at 64 px, which costs minutes per epoch here); the settings are printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import augment, config
from pipeline.data.ingest import MANIFEST_CSV, ingest, load_prepared
from pipeline.fit import RUN_INFO, datamodule, fit

EUROSAT = Path("/work/shared/data/eurosat_rgb.tar")
PRETRAIN_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial")
TARGET_CLASSES = ("Pasture", "PermanentCrop", "Residential", "River", "SeaLake")
SIZE = 32
PRETRAIN_PER_CLASS, PRETRAIN_EPOCHS = 1000, 10
SHOTS = (10, 20, 50)
VAL_PER_CLASS = 5  # labelled images held out of K for early stopping, on top of K (said in the table)
TEST_PER_CLASS = 250  # 1,250 test images, none of them among the labelled ones
SEEDS = (0, 1)
ADAPT_EPOCHS = 15


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
    """A manifest folder (``path,label,split``) of symlinks to the chosen files: ingest's predefined split."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (src, label, split) in enumerate(rows):
        link = folder / f"{i:06d}{src.suffix}"
        if not link.exists():
            os.symlink(src, link)
        records.append({"path": link.name, "label": label, "split": split})
    pd.DataFrame(records).to_csv(folder / MANIFEST_CSV, index=False)
    return folder


def bench_params(**sections) -> config.Params:
    base = {"seed": 0, "data": {"image_size": SIZE, "near_duplicate_bits": None, "on_leakage": "warn"},
            "augment": {"preset": "satellite", "transforms": []},
            "train": {"accelerator": "cpu", "batch_size": 64, "num_workers": 0}}
    for name, values in sections.items():
        base[name] = base.get(name, {}) | values
    return config.parse(base)


def pretrain(root: Path, work: Path) -> tuple[Path, dict]:
    """Fit from random init on the pretraining classes; a ``models/``-like folder (best.ckpt + run.json)."""
    out = work / "pretrain"
    models = out / "models"
    if (models / RUN_INFO).is_file():
        return models, json.loads((out / "pretrain.json").read_text())
    rng = np.random.default_rng(0)
    rows = []
    for cls in PRETRAIN_CLASSES:
        files = files_of(root, cls)
        chosen = rng.permutation(len(files))[:PRETRAIN_PER_CLASS]
        n_val = n_test = PRETRAIN_PER_CLASS // 10
        for j, k in enumerate(chosen):
            rows.append((files[k], cls, "val" if j < n_val else "test" if j < n_val + n_test else "train"))
    params = bench_params(model={"weights": "none"},
                          train={"max_epochs": PRETRAIN_EPOCHS, "patience": 3, "lr": 2e-3, "freeze_epochs": 0})
    ingest(link_set(out / "raw", rows), out / "prepared", seed=0, data=params.data)
    prepared = load_prepared(out / "prepared")
    pipeline = augment.build(params.augment.transforms, seed=0, preset=params.augment.preset)
    start = time.perf_counter()
    result = fit(params, datamodule(params, prepared, pipeline), out_dir=out / "checkpoints")
    seconds = time.perf_counter() - start
    models.mkdir(parents=True, exist_ok=True)
    (models / "best.ckpt").write_bytes(result.best_checkpoint.read_bytes())
    (models / RUN_INFO).write_text(json.dumps({
        "run_id": None, "arch": params.model.arch, "classes": list(prepared.classes), "checkpoint": "best.ckpt",
        "monitor": params.train.monitor, "best_score": result.best_score, "epochs_run": result.epochs_run,
        "preprocessing": {"image_size": SIZE, "channels": "rgb", "dicom_window": None, "dtype": "uint8"}},
        indent=2))
    from pipeline.model import Classifier
    from pipeline.evaluation.predictions import predict_logits
    model = Classifier.load_from_checkpoint(models / "best.ckpt", map_location="cpu")
    test = prepared.split("test")
    logits = predict_logits(model, np.asarray(prepared.images[test["cache_index"].to_numpy()]), 256)
    acc = float((logits.argmax(1) == test["label_index"].to_numpy()).mean())
    summary = {"classes": list(PRETRAIN_CLASSES), "images_per_class": PRETRAIN_PER_CLASS, "image_size": SIZE,
               "train_images": int((prepared.table["split"] == "train").sum()), "test_images": len(test),
               "epochs_run": result.epochs_run, "max_epochs": PRETRAIN_EPOCHS, "test_accuracy": round(acc, 4),
               "seconds": round(seconds, 1), "threads": __import__("torch").get_num_threads()}
    (out / "pretrain.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"bench": "transfer_pretrain", **summary}), flush=True)
    return models, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench transfer", description=__doc__.split("\n")[0])
    parser.add_argument("--eurosat", type=Path, default=EUROSAT)
    parser.add_argument("--work", type=Path, default=Path("/tmp/transfer-bench"))
    parser.add_argument("--pretrain-only", action="store_true")
    args = parser.parse_args(argv)
    root = extract(args.eurosat, args.work)
    models, _ = pretrain(root, args.work)
    if args.pretrain_only:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
