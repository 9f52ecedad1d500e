"""``python -m pipeline.bench quality``: test quality of the small-data regularizers and decisions on real X-rays.

PneumoniaMNIST (the balanced subset in ../shared/data, its published train/val/test split, 28 px,
grayscale replicated to RGB) handed in as PNG files with a manifest, as a user would; random init (no
pretrained weights on these machines). Rows, each adding to the one before:

- ``single``: today's params.yaml defaults (20 epochs, early stopping on val/loss, label smoothing 0.1),
  with the medical preset minus the demo's histology flips;
- ``mix``: + MixUp (alpha 0.2) and CutMix (alpha 1.0), half the mixed batches each;
- ``ema``: + an EMA of the weights (decay 0.995);
- ``threshold``: the ``ema`` model with the Youden threshold chosen on val predictions.

Each row prints one JSON line: test accuracy and AUROC with 95% bootstrap intervals (1000 resamples of
the 468 test images), epochs, seconds. Not part of ``make test``; minutes per row on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import augment, config, evaluation
from pipeline.data.ingest import ingest, load_prepared
from pipeline.fit import datamodule, fit
from pipeline.model import Classifier

DATA = Path("../shared/data/pneumoniamnist_balanced.npz")  # relative to the repository root, as the README says
CLASSES = ("normal", "pneumonia")
MIX = {"augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 1.0, "augment.cutmix_switch_prob": 0.5}
# Run in this order (the full recipe before the partial one, for when the machine is slow): rows print as they end.
ROWS: dict[str, dict[str, Any]] = {"single": {}, "ema": MIX | {"train.ema_decay": 0.995}, "mix": MIX}


def write_pngs(npz: Path, root: Path) -> Path:
    """The arrays as PNG files and a manifest (path, label, split) keeping the published split."""
    arrays = np.load(npz)
    rows = []
    for split in ("train", "val", "test"):
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0],
                                               strict=True)):
            name = f"{split}/{CLASSES[label]}_{i:04d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name)
            rows.append(f"{name},{CLASSES[label]},{split}")
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root


def base_params(size: int, epochs: int, seed: int) -> config.Params:
    return config.parse({
        "seed": seed,
        # The published split holds identical images across train and val (intake finds 3): warn, keep it.
        "data": {"image_size": size, "on_leakage": "warn"},
        "model": {"weights": "none"},
        "augment": {"preset": "medical", "transforms": []},  # no flips: laterality matters in radiographs
        "train": {"accelerator": "cpu", "max_epochs": epochs},
        "evaluate": {"tta": [], "bootstrap": 1000},
    })


def scored(metrics: dict[str, float], split: str) -> dict[str, float]:
    return {f"{m}{suffix}": metrics[f"{split}/{m}{suffix}"]
            for m in ("accuracy", "auroc") for suffix in ("", "_ci_low", "_ci_high")
            if f"{split}/{m}{suffix}" in metrics}


def run(npz: Path, size: int, epochs: int, seeds: list[int], rows: list[str]) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        raw = write_pngs(npz, Path(tmp) / "raw")
        with contextlib.redirect_stdout(sys.stderr):
            ingest(raw, Path(tmp) / "prepared", seed=0, data=base_params(size, epochs, 0).data)
        prepared = load_prepared(Path(tmp) / "prepared")
        arrays = {s: (prepared.images[prepared.split(s)["cache_index"].to_numpy()],
                      prepared.split(s)["label_index"].to_numpy()) for s in ("val", "test")}
        for seed in seeds:
            for name, overrides in ((n, ROWS[n]) for n in rows):
                params = config.with_overrides(base_params(size, epochs, seed), overrides)
                transform = augment.build(params.augment.transforms, seed, preset=params.augment.preset,
                                          dtype=prepared.images.dtype)
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):  # per-epoch lines; stdout is for the JSON lines
                    result = fit(params, datamodule(params, prepared, transform), out_dir=Path(tmp) / f"{name}-{seed}")
                seconds = time.perf_counter() - start
                model = Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu")
                rows = [(name, params.evaluate)]
                if name == "ema":
                    rows.append(("threshold", dataclasses.replace(params.evaluate, threshold="youden")))
                for row, settings in rows:
                    out = evaluation.evaluate(model, *arrays["test"], prepared.classes, settings, seed, (),
                                              val=arrays["val"])
                    split = "test_threshold" if row == "threshold" else "test"
                    line = {"bench": "quality", "row": row, "seed": seed, "image_size": size, "max_epochs": epochs,
                            "epochs_run": result.epochs_run, "fit_s": round(seconds, 1),
                            **{k: round(v, 4) for k, v in scored(out.metrics, split).items()}}
                    if row == "threshold":  # AUROC does not depend on the cut: the ema row's
                        line |= {"threshold": out.metrics["decision/threshold"],
                                 **{k: round(v, 4) for k, v in scored(out.metrics, "test").items() if "auroc" in k}}
                    print(json.dumps(line), flush=True)
                    results.append(line)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST npz (default: %(default)s)")
    parser.add_argument("--size", type=int, default=28, help="data.image_size (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=20, help="train.max_epochs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: %(default)s)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS),
                        help="rows to train (the threshold row comes with ema; default: all)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data}: not found (the shared data sets live in ../shared/data)")
    run(args.data, args.size, args.epochs, args.seeds, args.rows)
    return 0
