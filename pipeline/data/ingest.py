"""Ingest: read a folder-per-class image set, validate it, split it, and cache the decoded pixels.

Training never decodes an image file: ingest writes every image, resized once, into one uint8
array (``images.npy``) that the data loaders memory-map. ``splits.csv`` maps each file to its row in
that array, its label and its split; ``report.json`` records what was found and what was rejected,
and the train split's per-channel mean and std (the normalization for random init and N-band data).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_dir, write_json

log = logging.getLogger(__name__)

SPLITS_CSV = "splits.csv"
REPORT_JSON = "report.json"
CACHE_NPY = "images.npy"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
SPLITS = ("train", "val", "test")
MIN_PER_CLASS = 3  # one image each for train, val and test


class DataError(PipelineError, ValueError):
    """A problem with the handed-in data that the user must fix; the message names the file or class."""


@dataclass(frozen=True)
class Prepared:
    """Ingest's outputs, loaded back: the split table, the pixel cache and the class names."""

    table: pd.DataFrame  # path, label, label_index, split, cache_index
    images: np.ndarray  # (N, H, W, C) uint8, memory-mapped
    classes: tuple[str, ...]
    digest: str  # of splits.csv: changes with any file, label or split assignment
    mean: tuple[float, ...]  # per channel, train split, [0, 1] units (report.json "normalization")
    std: tuple[float, ...]

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]


def scan(root: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """List (image file, class) pairs of a folder-per-class set, and the non-image files ignored."""
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected one subfolder of images per class)")
    files, ignored = [], []
    for class_dir in class_dirs:
        found = [p for p in sorted(class_dir.rglob("*")) if p.is_file() and not p.name.startswith(".")]
        images = [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        ignored += [str(p) for p in found if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            raise DataError(f"{class_dir}: class '{class_dir.name}' has no image files "
                            f"(accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
        files += [(p, class_dir.name) for p in images]
    return files, ignored


def decode(path: Path, size: int) -> np.ndarray:
    """Decode one image to (size, size, 3) uint8 RGB; higher bit depths are scaled, not clipped."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I", "I;16", "I;16B", "F"):
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
        rgb = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def channel_stats(images: np.ndarray, chunk: int = 256) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, H, W, C) pixels in [0, 1] units (integers divided by the dtype's max).

    Summed in chunks, so a large cache is never copied to float64 whole. A constant channel gets std 1:
    dividing by ~0 would turn any unseen deviation at test time into a huge input.
    """
    top = float(np.iinfo(images.dtype).max) if images.dtype.kind in "ui" else 1.0
    total, squares, n = np.zeros(images.shape[-1]), np.zeros(images.shape[-1]), 0
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].reshape(-1, images.shape[-1]).astype(np.float64) / top
        total, squares, n = total + x.sum(0), squares + (x * x).sum(0), n + len(x)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def assign_splits(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Stratified train/val/test assignment: each class is shuffled (seeded) and cut by the fractions."""
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test = max(1, round(len(idx) * test_fraction))
        n_val = max(1, round(len(idx) * val_fraction))
        splits[idx[:n_test]] = "test"
        splits[idx[n_test:n_test + n_val]] = "val"
        splits[idx[n_test + n_val:]] = "train"
    return splits


def ingest(raw_dir: Path, out_dir: Path, *, image_size: int, val_fraction: float, test_fraction: float,
           seed: int, on_bad_file: Literal["skip", "fail"]) -> dict:
    """Validate, split and cache ``raw_dir`` into ``out_dir`` (replaced only on success); return the report."""
    files, ignored = scan(raw_dir)
    pixels, rows, rejected = [], [], []
    for path, label in files:
        try:
            pixels.append(decode(path, image_size))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            reason = "empty file" if path.stat().st_size == 0 else f"{type(err).__name__}: {err}"
            if on_bad_file == "fail":
                raise DataError(f"{path}: unreadable image ({reason}); set data.on_bad_file: skip to skip it")
            log.warning("skipping unreadable image %s (%s)", path, reason)
            rejected.append({"path": str(path), "reason": reason})
            continue
        rows.append({"path": str(path), "label": label})

    table = pd.DataFrame(rows, columns=["path", "label"])
    counts = table["label"].value_counts()
    classes = tuple(sorted({label for _, label in files}))
    for name in classes:
        if counts.get(name, 0) < MIN_PER_CLASS:
            raise DataError(f"{raw_dir / name}: class '{name}' has {counts.get(name, 0)} readable images; "
                            f"at least {MIN_PER_CLASS} are needed (one each for train, val and test)")
    table["label_index"] = table["label"].map({c: i for i, c in enumerate(classes)})
    table["split"] = assign_splits(table["label"].to_numpy(), val_fraction, test_fraction, seed)
    table["cache_index"] = np.arange(len(table))
    cache = np.stack(pixels)
    mean, std = channel_stats(cache[(table["split"] == "train").to_numpy()])

    report = {
        "source": str(raw_dir),
        "classes": list(classes),
        "n_images": len(table),
        "image_size": image_size,
        "counts": {s: table[table["split"] == s]["label"].value_counts().reindex(classes, fill_value=0)
                   .astype(int).to_dict() for s in SPLITS},
        "rejected": rejected,
        "ignored_non_images": len(ignored),
        "normalization": {"split": "train", "units": "[0, 1]", "mean": mean, "std": std},
    }
    with atomic_dir(out_dir) as staging:
        np.save(staging / CACHE_NPY, cache)
        table.to_csv(staging / SPLITS_CSV, index=False)
        write_json(staging / REPORT_JSON, report)
    return report


def load_prepared(out_dir: Path) -> Prepared:
    """Load what ingest wrote; the pixel cache is memory-mapped, not read."""
    splits = out_dir / SPLITS_CSV
    if not splits.is_file():
        raise DataError(f"{splits}: not found; run the ingest stage first (dvc repro ingest)")
    table = pd.read_csv(splits)
    report = json.loads((out_dir / REPORT_JSON).read_text())
    if "normalization" not in report:
        raise DataError(f"{out_dir / REPORT_JSON}: no normalization statistics (written by an older ingest); "
                        "rerun the ingest stage")
    stats = report["normalization"]
    return Prepared(table=table, images=np.load(out_dir / CACHE_NPY, mmap_mode="r"), classes=tuple(report["classes"]),
                    digest=hashlib.sha256(splits.read_bytes()).hexdigest()[:12],
                    mean=tuple(stats["mean"]), std=tuple(stats["std"]))
