"""Model quality on real held-out sets, outside ``make test``: one JSON line per (set, recipe row, seed).

    python -m pipeline.quality pneumonia --size 28 --rows defaults,long,cv5 --seeds 0
    python -m pipeline.quality pneumonia --npz ../shared/data/pneumoniamnist_balanced.npz --size 64

The set is handed to the pipeline as a user would: PNG files with a ``manifest.csv`` (path, label,
split: the published split) written to a scratch folder, then ingest, the augment preset, the
pipeline's ``fit`` (or cross-validation and the fold ensemble) and the test split's metrics with
bootstrap 95% intervals, as the evaluate stage computes them. Random init: no pretrained weights here.
Rows are params overrides on top of ``params.yaml`` (``ROWS``); docs/benchmarks.md records the results.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline import augment, config, crossval
from pipeline.data.ingest import ingest, load_prepared
from pipeline.evaluation import split_metrics
from pipeline.evaluation.predictions import predict_proba
from pipeline.fit import datamodule, fit
from pipeline.model import Classifier, Ensemble
from pipeline.resume import Resume

DEFAULT_NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist_balanced.npz"
PNEUMONIA_CLASSES = ("normal", "pneumonia")

# Recipe rows: params overrides (params.yaml sections). "defaults" is params.yaml as it is, tuning off.
ROWS: dict[str, dict] = {
    "defaults": {},
    "long": {"train": {"max_epochs": 40, "monitor": "val/auroc", "patience": 15}},
    "cv5": {"train": {"max_epochs": 40, "monitor": "val/auroc", "patience": 15}, "data": {"folds": 5}},
    "cv3": {"train": {"max_epochs": 40, "monitor": "val/auroc", "patience": 15}, "data": {"folds": 3}},
}


def write_pneumonia(npz: Path, out: Path) -> Path:
    """The npz's published train/val/test split as PNG files and a manifest.csv (path,label,split)."""
    arrays = np.load(npz)
    rows = ["path,label,split"]
    for split in ("train", "val", "test"):
        for i, (image, label) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0])):
            name = f"{split}/{PNEUMONIA_CLASSES[label]}_{i:05d}.png"
            (out / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / name)
            rows.append(f"{name},{PNEUMONIA_CLASSES[label]},{split}")
    (out / "manifest.csv").write_text("\n".join(rows) + "\n")
    return out


def params_for(overrides: dict, size: int, seed: int) -> config.Params:
    import yaml

    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw |= {"seed": seed}
    # The published split holds 3 exact duplicates across train and val: kept, as published, with a warning.
    raw["data"] |= {"image_size": size, "channels": "rgb", "near_duplicate_bits": None, "on_leakage": "warn"}
    raw["model"] |= {"weights": "none"}
    raw["augment"] |= {"preset": "medical", "transforms": []}  # radiographs: no flips (docs/training.md)
    raw["tune"] |= {"enabled": False}
    for section, values in overrides.items():
        raw[section] = raw.get(section, {}) | values
    return config.parse(raw)


def run_row(raw: Path, scratch: Path, name: str, size: int, seed: int) -> dict:
    params = params_for(ROWS[name], size, seed)
    prepared_dir = scratch / f"prepared_{size}_{params.data.folds}"
    if not prepared_dir.exists():
        ingest(raw, prepared_dir, seed=seed, data=params.data)
    prepared = load_prepared(prepared_dir)
    transform = augment.build(params.augment.transforms, seed, preset=params.augment.preset,
                              dtype=prepared.images.dtype)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        if params.data.folds:
            folds = crossval.fit_folds(params, prepared, transform, Resume(Path(tmp) / "resume", "q"))
            model = Ensemble([Classifier.load_from_checkpoint(r.best_checkpoint, map_location="cpu")
                              for r in folds.results])
            extra = crossval.cv_metrics(folds.oof, prepared.classes, positive=1)
        else:
            result = fit(params, datamodule(params, prepared, transform), out_dir=Path(tmp))
            model = Ensemble([Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu")])
            extra = {}
        test = prepared.split("test")
        probs = predict_proba(model.eval(), prepared.images[test["cache_index"].to_numpy()], 256)
    metrics = split_metrics(probs, test["label_index"].to_numpy(), prepared.classes, "test", params.evaluate,
                            seed, positive=1)
    keep = {k: v for k, v in metrics.items() if k.split("/")[1].split("_ci")[0] in ("accuracy", "auroc")
            and k.count("/") == 1}
    return {"bench": "quality", "set": "pneumoniamnist_balanced", "size": size, "row": name, "seed": seed,
            "minutes": round((time.monotonic() - start) / 60, 1), "n_test": len(test), **keep,
            **{k: v for k, v in extra.items() if k in ("cv/accuracy", "cv/auroc")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.quality", description=__doc__.splitlines()[0])
    parser.add_argument("set", choices=["pneumonia"])
    parser.add_argument("--npz", type=Path, default=DEFAULT_NPZ)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--rows", default="defaults,long,cv5")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for the files (default: a temp dir)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        scratch = args.scratch or Path(tmp)
        raw = scratch / "raw"
        if not (raw / "manifest.csv").is_file():
            write_pneumonia(args.npz, raw)
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in args.rows.split(","):
                print(json.dumps(run_row(raw, scratch, name, args.size, seed)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
