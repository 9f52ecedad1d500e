"""``python -m pipeline.bench quality``: test quality of the small-data regularizers and decisions on real X-rays.

PneumoniaMNIST (the balanced subset in ../shared/data, its published train/val/test split, 28 px,
grayscale replicated to RGB) handed in as PNG files with a manifest, as a user would; random init (no
pretrained weights on these machines). Rows, each adding to the one before:

- ``single``: today's params.yaml defaults (20 epochs, early stopping on val/loss, label smoothing 0.1),
  with the medical preset minus the demo's histology flips;
- ``mix``: + MixUp (alpha 0.2) and CutMix (alpha 1.0), half the mixed batches each;
- ``ema``: + an EMA of the weights (decay 0.995);
- ``threshold``: the ``ema`` model with the Youden threshold chosen on val predictions;
- ``long``: 40 epochs, checkpoint and early stopping on val/auroc (patience 15) instead of val/loss;
- ``cv3``, ``cv5``: ``long`` with ``data.folds: 3`` or ``5``: the fold models' ensemble tested (OOF scores beside).

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

from pipeline import augment, config, crossval, evaluation
from pipeline.data.ingest import ingest
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.fit import datamodule, fit
from pipeline.model import Classifier, Ensemble
from pipeline.resume import Resume

DATA = Path(
    "../shared/data/pneumoniamnist_balanced.npz"
)  # relative to the repository root, as the README says
CLASSES = ("normal", "pneumonia")
MIX = {"augment.mixup_alpha": 0.2, "augment.cutmix_alpha": 1.0, "augment.cutmix_switch_prob": 0.5}
# Run in this order (the full recipe before the partial one, for when the machine is slow): rows print as they end.
LONG = {"train.max_epochs": 40, "train.monitor": "val/auroc", "train.patience": 15}
ROWS: dict[str, dict[str, Any]] = {
    "single": {},
    "ema": MIX | {"train.ema_decay": 0.995},
    "mix": MIX,
    "long": LONG,
    "cv3": LONG | {"data.folds": 3},
    "cv5": LONG | {"data.folds": 5},
}


def write_pngs(npz: Path, root: Path) -> Path:
    """The arrays as PNG files and a manifest (path, label, split) keeping the published split."""
    arrays = np.load(npz)
    rows = []
    for split in ("train", "val", "test"):
        for i, (image, label) in enumerate(
            zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0], strict=True)
        ):
            name = f"{split}/{CLASSES[label]}_{i:04d}.png"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / name)
            rows.append(f"{name},{CLASSES[label]},{split}")
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return root


def base_params(size: int, epochs: int, seed: int) -> config.Params:
    return config.parse(
        {
            "seed": seed,
            # The published split holds identical images across train and val (intake finds 3): warn, keep it.
            "data": {"image_size": size, "on_leakage": "warn"},
            "model": {"weights": "none"},
            "augment": {"preset": "medical", "transforms": []},  # no flips: laterality matters in radiographs
            "train": {"accelerator": "cpu", "max_epochs": epochs},
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


def _prepared(raw: Path, root: Path, data: config.Data) -> Prepared:
    """Ingest once per fold count (the fold column is ingest's)."""
    out = root / f"prepared-{data.folds}"
    if not out.exists():
        with contextlib.redirect_stdout(sys.stderr):
            ingest(raw, out, seed=0, data=data)
    return load_prepared(out)


def _train(
    params: config.Params, prepared: Prepared, transform, out: Path
) -> tuple[Ensemble, Any, int, dict]:
    """(model, held-out logits and labels or None, epochs run, CV metrics): one fit, or k folds and their ensemble."""
    with contextlib.redirect_stdout(sys.stderr):  # per-epoch lines; stdout is for the JSON lines
        if not params.data.folds:
            result = fit(params, datamodule(params, prepared, transform), out_dir=out)
            return (
                Ensemble([Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu")]),
                None,
                result.epochs_run,
                {},
            )
        folds = crossval.fit_folds(params, prepared, transform, Resume(out, "bench"))
    members = [Classifier.load_from_checkpoint(r.best_checkpoint, map_location="cpu") for r in folds.results]
    held_out = (crossval.oof_logits(folds.oof, prepared.classes), folds.oof["label_index"].to_numpy())
    cv = crossval.cv_metrics(folds.oof, prepared.classes, positive=1)
    return (
        Ensemble(members),
        held_out,
        max(r.epochs_run for r in folds.results),
        {k: v for k, v in cv.items() if k in ("cv/accuracy", "cv/auroc")},
    )


def run(npz: Path, size: int, epochs: int, seeds: list[int], rows: list[str]) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        raw = write_pngs(npz, Path(tmp) / "raw")
        for seed in seeds:
            for name, overrides in ((n, ROWS[n]) for n in rows):
                params = config.with_overrides(base_params(size, epochs, seed), overrides)
                prepared = _prepared(raw, Path(tmp), params.data)
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
                model, held_out, epochs_run, cv = _train(
                    params, prepared, transform, Path(tmp) / f"{name}-{seed}"
                )
                seconds = time.perf_counter() - start
                rows = [(name, params.evaluate)]
                if name == "ema":
                    rows.append(("threshold", dataclasses.replace(params.evaluate, threshold="youden")))
                for row, settings in rows:
                    out = evaluation.evaluate(
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
                        "row": row,
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.bench quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST npz (default: %(default)s)")
    parser.add_argument("--size", type=int, default=28, help="data.image_size (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=20, help="train.max_epochs (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: %(default)s)")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=list(ROWS),
        default=["single", "ema", "mix"],
        help="rows to train (the threshold row comes with ema; default: all)",
    )
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"{args.data}: not found (the shared data sets live in ../shared/data)")
    run(args.data, args.size, args.epochs, args.seeds, args.rows)
    return 0
