"""Shared fixtures: tiny real image sets written to tmp_path (no downloads, no shared data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data.ingest import Prepared, ingest, load_prepared

CLASSES = ("alpha", "beta", "gamma")


def write_class_folders(root: Path, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """A folder per class of RGB PNGs; each class has its own dominant colour channel, plus noise."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3))
            img[..., k] += 120
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "raw" / "tiny")


@pytest.fixture
def tiny_params() -> config.Params:
    """Params for a real but tiny CPU fit."""
    return config.parse({
        "data": {"dataset": "tiny", "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
        "model": {"weights": "none"},
        "train": {"max_epochs": 2, "batch_size": 4, "accelerator": "cpu", "patience": 2},
        "tune": {"n_trials": 2, "max_epochs": 1},
    })


@pytest.fixture
def prepared(image_folder: Path, tmp_path: Path) -> Prepared:
    ingest(image_folder, tmp_path / "prepared", image_size=32, val_fraction=0.25, test_fraction=0.25,
           seed=0, on_bad_file="skip")
    return load_prepared(tmp_path / "prepared")
