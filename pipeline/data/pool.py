"""The unlabelled pool: images nobody labelled, for self- and semi-supervised training, kept from leaking.

A pool is handed in with ``python -m pipeline intake SRC --unlabelled`` into ``paths.unlabelled/NAME`` and
selected by ``data.unlabelled``. It is stored as labelled sets are (``shards``' tar shards from
``shards.AUTO_MIN_FILES`` images on, else the files under their paths in the source), without labels: a
``manifest.csv`` (folder layout) or ``shards.csv`` (shard layout) lists ``path[,group]``, the group a salted
hash as in labelled sets (a CSV's group column, or each DICOM file's ``data.dicom_group``).

The pool stage (``prepare_pool``) decodes and conforms it exactly as ingest does the labelled set (same size,
channel policy, pixel budget, unreadable files skipped or fatal by ``data.on_bad_file``), then leaves out every
image that would let val or test images into training, or that adds nothing:

- an exact (sha256) or near (dHash within ``data.near_duplicate_bits``) duplicate of a labelled image, whichever
  its split (a copy of a train image is not new information; one of a val or test image is leakage);
- an image of a group (a DICOM patient) with labelled images in val or test (with ``data.folds``, in any split:
  each fold validates on part of train+val);
- an image linked to a val or test image through a chain of near duplicates or groups, as ingest keeps such a
  chain in one split.

What ``paths.pool`` holds, and its reader, are ``pooled``'s.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Data
from pipeline.data import readers, shards, sources, validation
from pipeline.data.cache import CacheWriter, cache_dtype, to_dtype
from pipeline.data.decoding import Settings, Validated
from pipeline.data.ingest import decode_into
from pipeline.data.layout import is_sharded
from pipeline.data.listing import MANIFEST_CSV
from pipeline.data.pooled import COLUMNS, EXCLUDED, KEPT, POOL_CSV, UNREADABLE
from pipeline.data.prepared import CACHE_NPY, REPORT_JSON, SPLITS_CSV, DataError, load_prepared
from pipeline.data.readers import IMAGE_SUFFIXES
from pipeline.data.size import RANDOM_INIT_CAP
from pipeline.fsutil import atomic_dir, write_json
from pipeline.pixels import unit_max, unit_range

log = logging.getLogger(__name__)

VALIDATED_DIR = "_unlabelled"  # paths.validated/_unlabelled/NAME: no labelled set's name starts with '_'
LISTED = 200  # files listed per kind in report.json


def validated_store(validated: Path, name: str) -> Path:
    """Where intake keeps the pool ``name``'s decodes for the pool stage to reuse (beside labelled sets')."""
    return validated / VALIDATED_DIR / name


def read_manifest(manifest: Path) -> tuple[pd.DataFrame, list[str]]:
    """A pool's ``path[,group]`` CSV (paths relative to its folder, and inside it): the image rows (group ''
    where none), and the paths of the non-image rows, which are ignored."""
    table = sources.read_csv(manifest, DataError)
    table.columns = [c.strip().lower() for c in table.columns]
    if "path" not in table.columns:
        raise DataError(f"{manifest}: no 'path' column (columns: {', '.join(table.columns)})")
    if unknown := sorted(set(table.columns) - {"path", "group"}):
        hint = (
            "; a pool takes no labels: hand a labelled set in without --unlabelled"
            if "label" in unknown
            else ""
        )
        raise DataError(f"{manifest}: columns must be path and optionally group (unknown: {unknown}){hint}")
    if table.empty:
        raise DataError(f"{manifest}: only a header row; list one image a line (path)")
    table = table.assign(**{c: table[c].str.strip() for c in table.columns})
    if "group" not in table:
        table["group"] = ""
    for i, path in enumerate(table["path"]):
        if not path:
            raise DataError(f"{manifest}, line {i + 2}: empty path")
    table["path"] = list(map(str, sources.listed(manifest, table["path"])))
    if repeated := sorted(set(table["path"][table["path"].duplicated()])):
        raise DataError(
            f"{manifest}: {len(repeated)} path(s) listed twice, e.g. {repeated[0]}; list each once"
        )
    is_image = table["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
    absent = [p for p in table["path"][is_image] if not Path(p).exists()]
    if absent:
        raise DataError(f"{manifest}: {len(absent)} listed files not found, e.g. {absent[:3]}")
    return table[is_image].reset_index(drop=True), list(table["path"][~is_image])


def scan_pool(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """A stored pool's image files (path as ``root``/path, group; where a shard holds each one's bytes in the
    shard layout) and the non-image files ignored."""
    if not root.is_dir():
        raise DataError(f"{root}: unlabelled pool folder not found")
    if is_sharded(root):
        table = shards.scan(root, labelled=False)
        table["group"] = table["group"].fillna("") if "group" in table else ""
        return table, []
    if (root / MANIFEST_CSV).is_file():
        table, ignored = read_manifest(sources.inside(root / MANIFEST_CSV, root))
    else:
        images, others = readers.image_files(root)
        table, ignored = pd.DataFrame({"path": list(map(str, images)), "group": ""}), list(map(str, others))
    if table.empty:
        raise DataError(f"{root}: no image files (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return table, ignored


def _hex(bits: np.ndarray | None) -> str:
    return "" if bits is None else np.packbits(bits).tobytes().hex()


def prepare_pool(
    raw_dir: Path,
    out_dir: Path,
    *,
    data: Data,
    labelled: Path | None,
    reuse: Path | None = None,
    keep: Path | None = None,
) -> dict:
    """Decode the pool in ``raw_dir`` into ``out_dir`` (replaced only on success), leaving out what duplicates or
    shares a val/test group with the prepared labelled set in ``labelled`` (None: nothing is compared, as in
    intake's validation pass); return the report. ``reuse``/``keep``: as ingest's (``decoding.Validated``).
    ``data.image_size`` auto: the labelled set's size (the pool trains beside it), without one the random-init cap.
    """
    if data.image_size == "auto":
        side = load_prepared(labelled).images.shape[1] if labelled is not None else RANDOM_INIT_CAP
        data = dataclasses.replace(data, image_size=int(side))
    files, ignored = scan_pool(raw_dir)
    with atomic_dir(out_dir) as staging:
        everything = staging / ".decoded.npy"
        with CacheWriter(everything, len(files)) as writer:
            decoded = decode_into(files, data, writer, reuse)
            if not decoded.rows:
                first = decoded.rejected[0]
                raise DataError(
                    f"{raw_dir}: none of its {len(files)} image files is readable, e.g. {first['path']}: "
                    f"{first['reason']}"
                )
            if len(decoded.bands) > 1:
                raise DataError(
                    f"{raw_dir}: images have different band counts {dict(decoded.bands)} (data.channels: keep); "
                    "hand in one band count, or set data.channels: rgb for gray/RGB images"
                )
            images = writer.finish()
        if decoded.reused:
            log.info(
                "pool: %d of %d images taken from intake's validation pass (%s)",
                decoded.reused,
                len(files),
                reuse,
            )
        table = _table(files, decoded)
        readable = table[table["status"] != UNREADABLE].index.to_numpy()  # cache row r: file readable[r]
        excluded: dict = {"n": 0, "by_split": {}, "by_kind": {}, "files": []}
        dtype = images.dtype
        if labelled is not None:
            reference = load_prepared(labelled)
            _check_bands(images, reference.images, raw_dir, data)
            dtype = reference.images.dtype
            hashes = decoded.dhashes if data.near_duplicate_bits is not None else []
            excluded = _exclude(table, readable, hashes, labelled, reference.images, data)
        if keep is not None:
            Validated.keep(keep, Settings.of(data), everything, decoded.kept)
        kept = table.index[table["status"] == KEPT].to_numpy()
        if not len(kept):
            raise DataError(
                f"{raw_dir}: every readable image of the pool duplicates a labelled image or shares a group "
                f"with val/test images (e.g. {excluded['files'][0]['path']}: {excluded['files'][0]['reason']}); "
                "hand in other images, or set data.unlabelled: null"
            )
        row_of = {int(f): r for r, f in enumerate(readable)}
        with CacheWriter(staging / CACHE_NPY, len(kept)) as out:
            for f in kept:
                out.append(as_dtype(np.asarray(images[row_of[int(f)]]), dtype))
            pixels = out.finish()
        images_dtype = images.dtype
        del images
        everything.unlink()
        table.loc[kept, "cache_index"] = np.arange(len(kept))
        table[list(COLUMNS)].to_csv(staging / POOL_CSV, index=False)
        report = _report(raw_dir, table, decoded, ignored, excluded, pixels, labelled, data)
        if cache_dtype({images_dtype, dtype}) != dtype:
            report["warnings"].append(
                f"pool images need {images_dtype}, the labelled cache is {dtype}: the pool is stored as {dtype} "
                "(values rounded), as the model sees the labelled images"
            )
            log.warning("%s", report["warnings"][-1])
        del pixels
        write_json(staging / REPORT_JSON, report)
    return report


def as_dtype(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """One image in ``dtype`` at the same place in [0, 1]: widened exactly (``to_dtype``), or narrowed to the
    nearest value (a 16-bit pool beside an 8-bit labelled set: stored as the model sees the labelled images)."""
    if cache_dtype({pixels.dtype, dtype}) == dtype:
        return to_dtype(pixels, dtype)
    return np.rint(unit_range(pixels) * unit_max(dtype)).astype(dtype)


def no_pool(out_dir: Path) -> None:
    """The pool stage's output when ``data.unlabelled`` is null: no images, an empty table, ``pool: null``."""
    with atomic_dir(out_dir) as staging:
        pd.DataFrame(columns=list(COLUMNS)).to_csv(staging / POOL_CSV, index=False)
        write_json(staging / REPORT_JSON, {"pool": None})


def _table(files: pd.DataFrame, decoded) -> pd.DataFrame:
    """A row per file: path, sha256, dhash, group, status (kept or unreadable so far), reason, cache_index."""
    table = pd.DataFrame(
        {"path": files["path"].to_numpy(), "sha256": decoded.sha256, "dhash": "", "group": files["group"]}
    )
    table["status"], table["reason"], table["cache_index"] = UNREADABLE, "", -1
    table.loc[decoded.rows, "status"] = KEPT
    if decoded.dhashes:
        table.loc[decoded.rows, "dhash"] = [_hex(h) for h in decoded.dhashes]
    reasons = {r["path"]: r["reason"] for r in decoded.rejected}
    table.loc[table["status"] == UNREADABLE, "reason"] = table["path"].map(reasons)
    return table.reset_index(drop=True)


def _check_bands(pool: np.ndarray, reference: np.ndarray, raw_dir: Path, data: Data) -> None:
    if pool.shape[1:] != reference.shape[1:]:
        raise DataError(
            f"{raw_dir}: pool images are {pool.shape[1:]} (height, width, bands) after conforming, the labelled "
            f"set's {reference.shape[1:]} (data.channels: {data.channels}); hand in a pool of the same kind of "
            "images, or rerun ingest (dvc repro ingest)"
        )


SPLIT_ORDER = {"test": 0, "val": 1, "train": 2}  # the split a reason names: the one that matters most
KINDS = (
    "identical to",
    "a near duplicate of",
    "in one group with",
    "linked through near duplicates or groups to",
)
KIND_NAMES = ("identical", "near", "group", "linked")  # report.json excluded.by_kind


def _exclude(
    table: pd.DataFrame,
    readable: np.ndarray,
    hashes: list[np.ndarray | None],
    labelled_dir: Path,
    labelled_images: np.ndarray,
    data: Data,
) -> dict:
    """Mark in ``table`` (status, reason) the readable pool files that duplicate labelled images or reach val/test
    ones through groups or chains of duplicates (module docstring); return the counts and the files listed.

    Indices 0..n-1 are the labelled images (splits.csv's rows), n.. the readable pool files. Each pool file keeps
    only its most telling match (a test image before val before train; identical before near, group, chain), so
    the work stays linear in the size of each set of identical files or group, however many share one."""
    labelled = pd.read_csv(labelled_dir / SPLITS_CSV, dtype=str, keep_default_na=False)  # groups as text
    n, split, paths = len(labelled), labelled["split"].tolist(), labelled["path"].tolist()
    pool = table.loc[readable]
    guarded = {"val", "test"} | (
        {"train"} if data.folds else set()
    )  # splits whose groups the pool may not touch
    links: list[tuple[int, int]] = []
    best: dict[
        int, tuple[int, int, int, int]
    ] = {}  # pool position -> (split order, kind, bits, labelled row)

    def match(j: int, kind: int, i: int, bits: int = 0) -> None:
        found = (SPLIT_ORDER.get(split[i], len(SPLIT_ORDER)), kind, bits, i)
        if j not in best or found < best[j]:
            best[j] = found

    def link_all(members: list[int], kind: int, allowed: set[str] | None = None) -> None:
        """Link ``members`` (one set of identical files, or one group) and match its pool files to its labelled
        file that matters most (of ``allowed`` splits, when given)."""
        links.extend((members[0], k) for k in members[1:])
        candidates = [i for i in members if i < n and (allowed is None or split[i] in allowed)]
        if candidates:
            top = min(candidates, key=lambda i: SPLIT_ORDER.get(split[i], len(SPLIT_ORDER)))
            for k in members:
                if k >= n:
                    match(k - n, kind, top)

    for members in validation.exact_groups(list(labelled["sha256"]) + list(pool["sha256"])):
        link_all(members, 0)
    if data.near_duplicate_bits is not None:
        # the labelled images' hashes from the cache rows ingest hashed (the same pixels, or widened losslessly)
        lab_hashes = [validation.dhash(np.asarray(labelled_images[int(r)])) for r in labelled["cache_index"]]
        every = lab_hashes + list(hashes)
        near = validation.near_groups(every, data.near_duplicate_bits)  # sets, not pairs: linear memory
        for members in pd.Series(np.arange(len(every))).groupby(near).indices.values():
            if len(members) < 2:
                continue
            links.extend((int(members[0]), int(k)) for k in members[1:])
            candidates = [int(i) for i in members if i < n]
            if candidates:
                top = min(candidates, key=lambda i: SPLIT_ORDER.get(split[i], len(SPLIT_ORDER)))
                for k in members[members >= n]:
                    a, b = every[top], every[k]
                    match(int(k) - n, 1, top, 0 if a is None or b is None else int(np.count_nonzero(a != b)))
    lab_groups = labelled["group"].tolist() if "group" in labelled else [""] * n
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(lab_groups + list(pool["group"])):
        if g:
            by_group[g].append(i)
    for members in by_group.values():
        link_all(members, 2, guarded)
    units = validation.components(n + len(pool), links)
    guarded_in_unit: dict[int, int] = {}
    for i in sorted(range(n), key=lambda i: SPLIT_ORDER.get(split[i], len(SPLIT_ORDER))):
        if split[i] in guarded:
            guarded_in_unit.setdefault(int(units[i]), i)
    for j in range(len(pool)):
        if (linked := guarded_in_unit.get(int(units[n + j]))) is not None:
            match(j, 3, linked)
    splits: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    files: list[dict] = []
    for j, row in enumerate(pool.index):
        if j not in best:
            continue
        _, kind, bits, i = best[j]
        how = KINDS[kind] + (f" ({bits} bits)" if kind == 1 else "")
        files.append(
            {"row": row, "path": pool.at[row, "path"], "reason": f"{how} {split[i]} image {paths[i]}"}
        )
        splits[split[i]] += 1
        kinds[KIND_NAMES[kind]] += 1
    rows = [f.pop("row") for f in files]
    table.loc[rows, "status"] = EXCLUDED
    table.loc[rows, "reason"] = [f["reason"] for f in files]
    return {
        "n": len(files),
        "by_split": {s: splits[s] for s in SPLIT_ORDER if splits[s]},
        "by_kind": dict(kinds),
        "files": files[:LISTED],
    }


def _report(
    raw_dir: Path,
    table: pd.DataFrame,
    decoded,
    ignored: list[str],
    excluded: dict,
    pixels: np.ndarray,
    labelled: Path | None,
    data: Data,
) -> dict:
    formats = pd.DataFrame(decoded.formats)
    kept = table[table["status"] == KEPT]
    return {
        "pool": raw_dir.name,
        "source": str(raw_dir),
        "n_files": len(table),
        "n_kept": len(kept),
        "image_size": data.image_size,
        "cache": {"dtype": str(pixels.dtype), "channels": int(pixels.shape[-1]), "policy": data.channels},
        "formats": {
            key: {str(k): int(v) for k, v in formats[key].value_counts().head(20).items()}
            for key in ("mode", "bits", "size")
        },
        "groups": int(kept.loc[kept["group"] != "", "group"].nunique()),
        "checked_against": None if labelled is None else str(labelled),
        "excluded": excluded,
        "exact_sets_within": len(validation.exact_groups(list(kept["sha256"]))),
        "rejected": decoded.rejected[:LISTED],
        "ignored_non_images": len(ignored),
        "non_images": ignored[:LISTED],
        "warnings": [],
    }
