"""Groups read from the images themselves: a DICOM set's patients (or studies), for intake.

Slices of one patient must share a split, or the test set holds near copies of training images. A
set handed in without a ``group`` column gets one from each DICOM file's own ``data.dicom_group``
element (PatientID by default), written to the copy's ``manifest.csv`` as the hash the caller gives
(intake's salted ``group_hash``), never the ID itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from pipeline.data.listing import MANIFEST_CSV, scan

DICOM_SUFFIX = ".dcm"


def dicom_element(path: Path, keyword: str) -> str:
    """The element ``keyword`` (e.g. PatientID) of a DICOM file's header as text, '' when absent or unreadable.

    Only the header is read (``stop_before_pixels``); a file pydicom cannot parse is left for ingest to
    reject with its reason.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        value = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword]).get(keyword)
    except (InvalidDicomError, OSError, ValueError, TypeError):
        return ""
    return "" if value is None else str(value).strip()


def add_dicom_groups(folder: Path, keyword: str, hashed: Callable[[str], str]) -> int:
    """Give a set copied into ``folder`` a ``group`` column from its DICOM files' ``keyword``, hashed.

    Leaves the set as it is, returning 0, when it already has groups or no DICOM file holds the
    element; otherwise writes (or extends) ``folder/manifest.csv`` and returns the number of groups.
    Files without the element (or not DICOM) get no group: each then stands alone.
    """
    manifest = folder / MANIFEST_CSV
    if manifest.is_file():
        table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        paths = [folder / p for p in table["path"]]
    else:
        found, _ = scan(folder)
        paths = [Path(p) for p in found["path"]]
        table = pd.DataFrame(
            {"path": [p.relative_to(folder).as_posix() for p in paths], "label": found["label"]}
        )
    table, n_groups = dicom_groups(table, paths, keyword, hashed)
    if n_groups:
        table.to_csv(manifest, index=False)
    return n_groups


def dicom_groups(
    table: pd.DataFrame, files: list[Path], keyword: str, hashed: Callable[[str], str]
) -> tuple[pd.DataFrame, int]:
    """``table`` (a row per file of ``files``) with a ``group`` column from the DICOM files' ``keyword``, hashed,
    and the number of groups; ``table`` itself and 0 when it has groups already or no DICOM file holds it."""
    if any(c.strip().lower() == "group" and table[c].str.strip().ne("").any() for c in table.columns):
        return table, 0  # the user's own groups win
    ids = [dicom_element(p, keyword) if p.suffix.lower() == DICOM_SUFFIX else "" for p in files]
    if not any(ids):
        return table, 0
    table = table.drop(columns=[c for c in table.columns if c.strip().lower() == "group"])
    table["group"] = [hashed(v) if v else "" for v in ids]
    return table, len({v for v in ids if v})
