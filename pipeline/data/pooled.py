"""The pool stage's outputs, loaded back: what pretraining, FixMatch's loader and suggest read.

The pool stage (``pool.prepare_pool``) writes them; its decoding and leakage control are no part of what a
reader runs, as ingest's are no part of ``prepared``.

What ``paths.pool`` holds (``load_pool`` reads it back)::

    pool.csv     a row per file: path, sha256, dhash (64 hex digits; empty for a flat image), group,
                 status (kept | excluded | unreadable), reason, cache_index (row in images.npy; -1 unless kept)
    images.npy   the kept images only, (N, H, W, C) in the labelled cache's size, bands and dtype (a pool that
                 needs a wider dtype is rounded to it, with a warning), so that its rows and the labelled
                 cache's can share a batch
    report.json  counts, formats, what was left out and why (the data card's source)

With ``data.unlabelled: null`` the stage writes ``report.json`` (``pool: null``) and an empty ``pool.csv``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.cache import Rows
from pipeline.data.prepared import CACHE_NPY, REPORT_JSON, DataError, Prepared

POOL_CSV = "pool.csv"
KEPT, EXCLUDED, UNREADABLE = "kept", "excluded", "unreadable"
COLUMNS = ("path", "sha256", "dhash", "group", "status", "reason", "cache_index")


@dataclass(frozen=True)
class Pool:
    """The pool stage's output, loaded back: what a training loader reads (``images``: kept images only)."""

    name: str
    table: pd.DataFrame  # every file: path, sha256, dhash, group, status, reason, cache_index
    images: np.ndarray  # (N, H, W, C) kept images, memory-mapped; row i is kept()'s row with cache_index i
    report: dict
    digest: str  # of pool.csv: changes with any file or exclusion

    def kept(self) -> pd.DataFrame:
        return self.table[self.table["status"] == KEPT].sort_values("cache_index")

    def __len__(self) -> int:
        return len(self.images)


def pool_selected(out_dir: Path) -> bool:
    """Whether the pool stage's output in ``out_dir`` holds a pool (``data.unlabelled`` was set)."""
    try:
        return json.loads((out_dir / REPORT_JSON).read_text()).get("pool") is not None
    except (OSError, ValueError):
        return False


def load_pool(out_dir: Path) -> Pool:
    """Load what the pool stage wrote; the pixels are memory-mapped, not read."""
    csv = out_dir / POOL_CSV
    if not csv.is_file() or not (out_dir / REPORT_JSON).is_file():
        raise DataError(
            f"{csv}: not found; run the pool stage first (dvc repro pool), or, if a killed run left it "
            f"missing, restore the last committed one: dvc checkout {out_dir}"
        )
    report = json.loads((out_dir / REPORT_JSON).read_text())
    if report.get("pool") is None:
        raise DataError(
            f"{out_dir}: no unlabelled pool selected (data.unlabelled: null); take one in with "
            "python -m pipeline intake SRC --unlabelled, then dvc repro"
        )
    table = pd.read_csv(csv, dtype=str, keep_default_na=False).astype({"cache_index": "int64"})
    return Pool(
        name=report["pool"],
        table=table,
        images=np.load(out_dir / CACHE_NPY, mmap_mode="r"),
        report=report,
        digest=hashlib.sha256(csv.read_bytes()).hexdigest()[:12],
    )


def unlabelled_rows(prepared: Prepared, pool: Pool | None, splits: tuple[str, ...] = ("train",)) -> Rows:
    """The labelled cache's rows of ``splits`` (train: never val or test), then the pool's kept images: what
    self-supervised pretraining learns from, read per item (``UnlabelledDataset(unlabelled_rows(...))``)."""
    rows = prepared.table.loc[prepared.table["split"].isin(splits), "cache_index"].to_numpy()
    if pool is None:
        return Rows(prepared.images, rows)
    if pool.images.shape[1:] != prepared.images.shape[1:] or pool.images.dtype != prepared.images.dtype:
        raise DataError(
            f"pool {pool.name}: images {pool.images.shape[1:]} {pool.images.dtype}, the labelled cache's "
            f"{prepared.images.shape[1:]} {prepared.images.dtype}: rerun the pool stage (dvc repro pool)"
        )
    return Rows(prepared.images, rows, pool.images)
