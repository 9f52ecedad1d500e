"""A labelled set's image files as a table: a folder per class, or a manifest (``path,label[,split][,group]``).

What ingest decodes and what the size stage samples: listing files reads no pixels. Files are listed under
``sources``' link policy: nothing outside the set's folder is read.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.data import sources
from pipeline.data.prepared import DataError
from pipeline.data.readers import IMAGE_SUFFIXES, image_files
from pipeline.data.splits import SPLITS

MANIFEST_CSV = "manifest.csv"


def class_folders(root: Path) -> list[Path]:
    """The non-hidden subfolders of ``root``, sorted; a link among them must stay inside ``root``."""
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    return [p for p in entries if sources.inside(p, root).is_dir()]


def scan(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """The set's image files as a table (path, label[, split][, group]), and the non-image files ignored.

    Files are listed under ``sources``' link policy: nothing outside ``root`` is read.
    """
    if not root.is_dir():
        raise DataError(f"{root}: data set folder not found")
    if (root / MANIFEST_CSV).is_file():
        return read_manifest(sources.inside(root / MANIFEST_CSV, root))
    class_dirs = class_folders(root)
    if not class_dirs:
        raise DataError(
            f"{root}: no class folders (expected one subfolder of images per class, or {MANIFEST_CSV})"
        )
    rows: list[dict[str, str]] = []
    ignored: list[str] = []
    for class_dir in class_dirs:
        images, others = image_files(class_dir, root)
        ignored += map(str, others)
        if not images:
            raise DataError(
                f"{class_dir}: class '{class_dir.name}' has no image files "
                f"(accepted: {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        rows += [{"path": str(p), "label": class_dir.name} for p in images]
    return pd.DataFrame(rows, columns=["path", "label"]), ignored


def read_manifest(manifest: Path) -> tuple[pd.DataFrame, list[str]]:
    """``path,label[,split][,group]`` rows; paths relative to the manifest's folder, and inside it.

    Returns the image rows and the paths of the non-image rows, which are ignored (and listed in the report).
    """
    table = sources.read_csv(manifest, DataError)
    table.columns = [c.strip().lower() for c in table.columns]
    missing = {"path", "label"} - set(table.columns)
    unknown = set(table.columns) - {"path", "label", "split", "group"}
    if missing or unknown:
        raise DataError(
            f"{manifest}: columns must be path,label and optionally split,group "
            f"(missing: {sorted(missing)}, unknown: {sorted(unknown)})"
        )
    if table.empty:
        raise DataError(f"{manifest}: only a header row; list one image a line (path,label)")
    for column in table.columns:
        table[column] = table[column].str.strip()
    for i, row in table.iterrows():  # line i + 2: the header is line 1
        if not row["path"] or not row["label"]:
            raise DataError(f"{manifest}, line {i + 2}: empty path or label")
        if "split" in table and row["split"] not in SPLITS:
            raise DataError(
                f"{manifest}, line {i + 2}: split '{row['split']}' is not one of {', '.join(SPLITS)}"
            )
    table["path"] = list(map(str, sources.listed(manifest, table["path"])))
    is_image = table["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
    absent = [
        p for p in table["path"][is_image] if not Path(p).exists()
    ]  # a FIFO exists: its reader skips it
    if absent:
        raise DataError(f"{manifest}: {len(absent)} listed files not found, e.g. {absent[:3]}")
    return table[is_image].reset_index(drop=True), list(table["path"][~is_image])
