"""Ingest's outputs, loaded back: the contract every stage after ingest reads.

``splits.csv`` maps each file to its row in the pixel cache ``images.npy``, its label, split and content
hash; ``report.json`` records what ingest found and the train split's per-channel mean and std. Ingest
(``pipeline.data.ingest``) writes them; everything else reads them through ``load_prepared``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError

SPLITS_CSV = "splits.csv"
REPORT_JSON = "report.json"
CACHE_NPY = "images.npy"


class DataError(PipelineError, ValueError):
    """A problem with the handed-in data that the user must fix; the message names the file or class."""


@dataclass(frozen=True)
class Prepared:
    """Ingest's outputs, loaded back: the split table, the pixel cache and the class names."""

    table: pd.DataFrame  # path, label, label_index, split, cache_index
    images: np.ndarray  # (N, H, W, C) uint8, uint16 or float32 in [0, 1], memory-mapped
    classes: tuple[str, ...]
    digest: str  # of splits.csv: changes with any file, label or split assignment
    mean: tuple[float, ...]  # per channel, train split, [0, 1] units (report.json "normalization")
    std: tuple[float, ...]
    report: dict  # report.json as ingest wrote it: counts, sizes, duplicates, leakage, warnings

    def split(self, name: str) -> pd.DataFrame:
        return self.table[self.table["split"] == name]


def load_prepared(out_dir: Path) -> Prepared:
    """Load what ingest wrote; the pixel cache is memory-mapped, not read."""
    splits = out_dir / SPLITS_CSV
    if not splits.is_file():
        raise DataError(
            f"{splits}: not found; run the ingest stage first (dvc repro ingest), or, if a killed "
            f"run left it missing, restore the last committed one: dvc checkout {out_dir}"
        )
    table = pd.read_csv(splits)
    report = json.loads((out_dir / REPORT_JSON).read_text())
    if "normalization" not in report:
        raise DataError(
            f"{out_dir / REPORT_JSON}: no normalization statistics (written by an older ingest); "
            "rerun the ingest stage"
        )
    stats = report["normalization"]
    return Prepared(
        table=table,
        images=np.load(out_dir / CACHE_NPY, mmap_mode="r"),
        classes=tuple(report["classes"]),
        digest=hashlib.sha256(splits.read_bytes()).hexdigest()[:12],
        mean=tuple(stats["mean"]),
        std=tuple(stats["std"]),
        report=report,
    )
