"""Ingest: read an image set, validate it, split it, and cache the decoded pixels.

A set is a folder per class, or a folder with ``manifest.csv`` (``path,label`` and optional ``split``
and ``group``; paths relative to the folder), or intake's shard layout (tar shards and their manifest
``shards.csv``: ``pipeline.data.shards``), the layouts ``intake`` writes. Training never decodes an
image file: ingest writes every image, resized once, into one array (``images.npy``) that the data
loaders memory-map. Its dtype is the widest the set needs (uint8, uint16 for 16-bit files, float32 in
[0, 1] for DICOM and float data) and its channels follow ``data.channels``. Ingest streams: each image
goes to that file as it is decoded (``cache.CacheWriter``); only small per-image facts (format, content
hash, a 256-bit dHash) stay in memory. ``splits.csv`` maps each file to its row in that array, its label,
split and content hash; ``report.json`` records what was found, what was rejected, duplicates, warnings,
and the train split's per-channel mean and std.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Data
from pipeline.data import decoding, rounds, shards, size, sizing, sources, splits, validation
from pipeline.data.cache import CacheWriter
from pipeline.data.layout import is_sharded
from pipeline.data.listing import scan
from pipeline.data.prepared import CACHE_NPY, REPORT_JSON, SPLITS_CSV, DataError
from pipeline.data.progress import progress
from pipeline.fsutil import atomic_dir, write_json

log = logging.getLogger(__name__)

SPLITS = splits.SPLITS
MIN_PER_CLASS = 3  # one image each for train, val and test


def read_exclusions(csv: Path) -> list[str]:
    """The ``path`` column of ``data.exclude``'s CSV (other columns, such as the label audit's, are ignored)."""
    if not csv.is_file():
        raise DataError(f"{csv} (data.exclude): not found")
    return sources.path_column(csv, DataError, " (data.exclude)")


def exclude(
    files: pd.DataFrame, listed: list[str], raw_dir: Path, warnings: list[str]
) -> tuple[pd.DataFrame, list[str]]:
    """``files`` without the ``listed`` paths, and the paths dropped. A listed path is absolute, relative to
    the working directory (as splits.csv and the label audit write them) or relative to the data set folder."""
    wanted = {q for p in listed for q in (Path(p).resolve(), (raw_dir / p).resolve())}
    resolved = files["path"].map(lambda p: Path(p).resolve())
    drop = resolved.isin(wanted).to_numpy()
    found = set(resolved[drop])
    unknown = [p for p in listed if Path(p).resolve() not in found and (raw_dir / p).resolve() not in found]
    if unknown:
        warnings.append(
            f"{len(unknown)} path(s) listed in data.exclude are not in the data set, e.g. "
            f"{', '.join(unknown[:3])}"
        )
    return files[~drop].reset_index(drop=True), list(files["path"][drop])


@dataclass
class DecodedSet:
    """What the decoding pass keeps in memory: small facts per image; the pixels went to the cache file."""

    rows: list[int] = dataclasses.field(default_factory=list)
    formats: list[dict] = dataclasses.field(default_factory=list)
    rejected: list[dict] = dataclasses.field(default_factory=list)
    bands: Counter = dataclasses.field(default_factory=Counter)
    dhashes: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    sha256: list[str] = dataclasses.field(default_factory=list)  # of every file, read or not
    kept: list[decoding.Decoded] = dataclasses.field(default_factory=list)  # per cache row, pixels dropped
    reused: int = 0  # images taken from intake's validation pass instead of decoded


def decode_into(table: pd.DataFrame, data: Data, cache: CacheWriter, reuse: Path | None = None) -> DecodedSet:
    """Decode, conform and append each image to ``cache``; skip (or fail on) unreadable files. One decode per
    file (in worker processes for large sets), none for files whose bytes ``reuse`` holds decoded."""
    out = DecodedSet()
    paths = list(table["path"])
    items = shards.members(table) if "member" in table else paths  # a shard-layout set (shards.scan)
    results = decoding.decode_all(items, decoding.Settings.of(data), reuse)
    for i, found in enumerate(progress(results, len(paths))):
        path = paths[i]
        out.sha256.append(found.sha256)
        if found.reason is not None:
            if data.on_bad_file == "fail":
                raise DataError(
                    f"{path}: unreadable image ({found.reason}); set data.on_bad_file: skip to skip it"
                ) from None
            log.warning("skipping unreadable image %s (%s)", path, found.reason)
            out.rejected.append({"path": str(path), "reason": found.reason})
            continue
        if found.bands_error is not None:
            raise DataError(
                f"{path}: {found.bands_error} bands cannot be made RGB (data.channels: rgb); "
                "set data.channels: keep to train on all bands"
            )
        pixels, found.pixels = found.pixels, None
        assert pixels is not None, path  # read, with no reason to reject it: decoded
        out.bands[pixels.shape[-1]] += 1
        out.reused += found.reused
        if data.near_duplicate_bits is not None:
            out.dhashes.append(found.dhash)
        if cache.shape in ((), pixels.shape):  # another band count is an error once every file is counted
            cache.append(pixels)
            out.kept.append(found)
        out.rows.append(i)
        out.formats.append({"mode": found.mode, "bits": found.bits, "size": found.size})
    return out


def _label_conflicts(
    table: pd.DataFrame, dhashes: list[np.ndarray | None], data: Data, warnings: list[str]
) -> tuple[pd.DataFrame, list[dict]]:
    """Identical files under different labels: an error (``data.on_label_conflict: fail``), or every copy
    left out (``drop``: the table without them, ``dhashes`` shortened in place) and listed."""
    conflicts = [
        idx
        for idx in validation.exact_groups(list(table["sha256"]))
        if table["label"].iloc[idx].nunique() > 1
    ]
    if not conflicts:
        return table, []
    named = "; ".join(
        ", ".join(f"{table['path'].iloc[i]} ({table['label'].iloc[i]})" for i in idx) for idx in conflicts[:3]
    )
    if data.on_label_conflict == "fail":
        raise DataError(
            f"identical files under different labels: {named}; keep one, under its right label "
            "(or set data.on_label_conflict: drop to leave all of them out)"
        )
    dropped = sorted(i for idx in conflicts for i in idx)
    listed = [
        {"paths": list(table["path"].iloc[idx]), "labels": list(table["label"].iloc[idx])}
        for idx in conflicts
    ]
    warnings.append(
        f"{len(dropped)} identical files under different labels left out "
        f"(data.on_label_conflict: drop), e.g. {named}"
    )
    keep = sorted(set(range(len(table))) - set(dropped))
    dhashes[:] = [dhashes[i] for i in keep] if dhashes else dhashes
    return table.iloc[keep].reset_index(drop=True), listed


def _duplicates(
    table: pd.DataFrame, dhashes: list[np.ndarray | None], near_bits: int | None, warnings: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """Exact (same bytes) and near (dHash) duplicate index sets (label conflicts are already settled). A near
    set is listed only if it holds more than one file's bytes (copies alone are exact sets); both are sets,
    not pairs, so that thousands of copies of one frame cost linear memory."""
    exact = validation.exact_groups(list(table["sha256"]))
    near: list[list[int]] = []
    if near_bits is not None:
        groups = validation.near_groups(dhashes, near_bits)
        sha = table["sha256"].to_numpy()
        for _, idx in pd.Series(np.arange(len(groups))).groupby(groups).indices.items():
            if len(idx) > 1 and len(set(sha[idx])) > 1:
                near.append([int(i) for i in idx])
    for idx in near:
        labels = table["label"].iloc[idx]
        if labels.nunique() > 1:
            named = [labels[labels == label].index[0] for label in sorted(labels.unique())][:3]
            warnings.append(
                f"{len(idx)} near duplicates under different labels, e.g. "
                + ", ".join(f"{table['path'].iat[i]} ({table['label'].iat[i]})" for i in named)
            )
    return exact, near


def _units(table: pd.DataFrame, exact: list[list[int]], near: list[list[int]]) -> np.ndarray:
    """Images that must share a split: one group, and each set of exact or near duplicates."""
    links = [(idx[0], j) for idx in exact + near for j in idx[1:]]
    if "group" in table:
        links += validation.group_links(table["group"].tolist())
    return validation.components(len(table), links)


def _split(
    table: pd.DataFrame, units: np.ndarray, data: Data, seed: int, warnings: list[str]
) -> tuple[str, list]:
    """Fill table['split'] (and 'fold'); return how the split was made and the leaking unit file lists."""
    if "split" in table:
        how = "manifest"
    else:
        how = "stratified" if len(np.unique(units)) == len(units) else "grouped"
        table["split"] = splits.assign(
            table["label"].to_numpy(), units, data.val_fraction, data.test_fraction, seed
        )
    _refuse_empty(
        table, units, "split", SPLITS, "the manifest's split column" * (how == "manifest"), how == "manifest"
    )
    leaks = [list(table["path"].iloc[idx]) for idx in splits.crossing_units(units, table["split"].to_numpy())]
    if leaks:
        message = (
            f"{len(leaks)} sets of duplicates or groups span more than one split (leakage), e.g. "
            + "; ".join(
                ", ".join(
                    f"{p} ({s})"
                    for p, s in zip(files, table.set_index("path").loc[files, "split"], strict=True)
                )
                for files in leaks[:3]
            )
        )
        if data.on_leakage == "fail":
            raise DataError(message + "; fix the split column, or set data.on_leakage: warn")
        warnings.append(message)
    if data.folds:
        table["fold"] = splits.folds(
            table["label"].to_numpy(), units, table["split"].to_numpy(), data.folds, seed
        )
        pool = (table["split"] != "test").to_numpy()
        _refuse_empty(table[pool], units[pool], "fold", range(data.folds), f"data.folds: {data.folds}")
    for split in SPLITS:
        absent = sorted(set(table["label"]) - set(table.loc[table["split"] == split, "label"]))
        if absent:
            warnings.append(f"split '{split}' has no images of {absent}")
    return how, leaks


def _refuse_empty(
    table: pd.DataFrame, units: np.ndarray, column: str, names: Iterable, setting: str, manifest: bool = False
) -> None:
    """A DataError when a split (or fold) would hold no image: training would stop on it much later.

    ``setting``: what asked for the shares (shown in brackets); ``manifest``: a split column placed the images.
    """
    empty = [name for name in names if not (table[column] == name).any()]
    if not empty:
        return
    what = f"{column} '{empty[0]}' would hold no image" + (f" ({setting})" if setting else "")
    if manifest:
        raise DataError(f"{what}; give each split images of every class")
    listed = []
    for unit in pd.unique(units)[:5]:
        rows = table[units == unit]
        named = sorted(set(rows["group"]) - {""}) if "group" in rows else []
        label = f"group {', '.join(named)}" if named else "duplicates"
        listed.append(f"{label}: {len(rows)} image(s), e.g. {rows['path'].iat[0]}")
    raise DataError(
        f"{what}: the {len(table)} images form only {len(pd.unique(units))} unit(s) that must each stay "
        f"whole (a group, e.g. one patient, with its exact and near duplicates): "
        + "; ".join(listed)
        + (" ..." if len(pd.unique(units)) > 5 else "")
        + "; hand in images of at least three groups (patients), and more for metrics worth reading"
    )


def _check_classes(
    table: pd.DataFrame, classes: tuple[str, ...], raw_dir: Path, data: Data, warnings: list[str]
) -> None:
    if len(classes) < 2:
        raise DataError(
            f"{raw_dir}: only one class ({', '.join(map(repr, classes))}); a classifier needs at least "
            "two (one folder of images per class, or two labels in the manifest)"
        )
    folded: dict[str, str] = {}
    for (
        name
    ) in classes:  # one folder on macOS and Windows, two classes here: the same set would train otherwise
        if (other := folded.setdefault(name.casefold(), name)) != name:
            raise DataError(
                f"{raw_dir}: classes '{other}' and '{name}' differ only in case (one folder on macOS and "
                "Windows); merge them into one class or rename one"
            )
    counts = table["label"].value_counts()
    for name in classes:
        n = int(counts.get(name, 0))
        if n < MIN_PER_CLASS:
            raise DataError(
                f"{raw_dir / name}: class '{name}' has {n} readable images; "
                f"at least {MIN_PER_CLASS} are needed (one each for train, val and test)"
            )
        if n < data.min_images_per_class:
            warnings.append(
                f"class '{name}' has only {n} images (data.min_images_per_class: "
                f"{data.min_images_per_class}); its metrics will be noisy"
            )


def _listed(items: list, limit: int = 200) -> list:
    return items[:limit]


def ingest(
    raw_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    data: Data | None = None,
    reuse: Path | None = None,
    keep: Path | None = None,
    resolved: size.ImageSize | None = None,
    **fields,
) -> dict:
    """Validate, split and cache ``raw_dir`` into ``out_dir`` (replaced only on success); return the report.

    ``data`` holds the data.* params; keyword ``fields`` override single ones of them. ``keep``: also
    store what was decoded there (intake's validation pass, ``decoding.Validated``); ``reuse``: take
    each file whose bytes such a store holds, decoded with the same settings, from there. ``resolved``: the
    size stage's ``data.image_size`` (None: a number is taken as it is, auto as for random init).
    """
    data = dataclasses.replace(data or Data(), **fields)
    if resolved is None:  # intake's validation, tests, benches: no weights considered
        resolved = sizing.resolve_size(data, raw_dir, native=None)
        if data.image_size == "auto":
            what = "the images' own size, as for random init (the size stage decides with the weights)"
            resolved = dataclasses.replace(resolved, reason=f"{resolved.image_size} px (auto): {what}")
    data = dataclasses.replace(data, image_size=resolved.image_size)
    files, ignored = (shards.scan(raw_dir), []) if is_sharded(raw_dir) else scan(raw_dir)
    excluded: list[str] = []
    exclude_warnings: list[str] = []
    if data.exclude is not None:
        files, excluded = exclude(files, read_exclusions(Path(data.exclude)), raw_dir, exclude_warnings)
        log.info("ingest: %d file(s) left out (data.exclude: %s)", len(excluded), data.exclude)
    with atomic_dir(out_dir) as staging, CacheWriter(staging / CACHE_NPY, len(files)) as cache:
        decoded = decode_into(files, data, cache, reuse)
        table = files.iloc[decoded.rows].reset_index(drop=True)
        table, report = _validate_and_split(table, files, ignored, decoded, raw_dir, data, seed)
        report["image_size_reason"] = resolved.reason
        report["excluded"] = {"file": data.exclude, "n": len(excluded), "paths": _listed(excluded, 1000)}
        report["warnings"] += exclude_warnings
        if (active := rounds.summary(raw_dir)) is not None:  # labels added from the pool (rounds.json)
            report["active"] = active
        images = cache.finish()
        train = table.loc[table["split"] == "train", "cache_index"].to_numpy()
        # From the decoding pass's per-image sums: the cache is not read back (reading it back would)
        sums = np.stack([decoded.kept[i].sums for i in train])
        mean, std = decoding.stats_from_sums(sums, len(train) * int(np.prod(images.shape[1:-1])))
        report["cache"] = {
            "dtype": str(images.dtype),
            "channels": int(images.shape[-1]),
            "policy": data.channels,
        }
        report["normalization"] = {"split": "train", "units": "[0, 1]", "mean": mean, "std": std}
        del images
        columns = ["path", "label", "label_index", "split", "cache_index", "sha256"]
        columns += [c for c in ("group", "fold") if c in table]
        table[columns].to_csv(staging / SPLITS_CSV, index=False)
        write_json(staging / REPORT_JSON, report)
        if keep is not None:
            decoding.Validated.keep(keep, decoding.Settings.of(data), staging / CACHE_NPY, decoded.kept)
    if decoded.reused:
        log.info(
            "ingest: %d of %d images taken from intake's validation pass (%s)",
            decoded.reused,
            len(files),
            reuse,
        )
    return report


def _validate_and_split(
    table: pd.DataFrame,
    files: pd.DataFrame,
    ignored: list[str],
    decoded: DecodedSet,
    raw_dir: Path,
    data: Data,
    seed: int,
) -> tuple[pd.DataFrame, dict]:
    """Check classes and band counts, find duplicates, split; return the table (its files left out by
    ``data.on_label_conflict: drop``) and the report so far."""
    classes = tuple(sorted(set(files["label"])))
    warnings: list[str] = []
    if len(decoded.bands) > 1:
        raise DataError(
            f"{raw_dir}: images have different band counts {dict(decoded.bands)} (data.channels: keep); "
            "hand in one band count, or set data.channels: rgb for gray/RGB sets"
        )
    table["cache_index"] = np.arange(len(table))  # the cache's row; rows left out below keep theirs unread
    table["sha256"] = [decoded.sha256[i] for i in decoded.rows]  # hashed in the decoding pass
    table, conflicts = _label_conflicts(table, decoded.dhashes, data, warnings)
    _check_classes(table, classes, raw_dir, data, warnings)
    exact, near = _duplicates(table, decoded.dhashes, data.near_duplicate_bits, warnings)
    units = _units(table, exact, near)
    how, leaks = _split(table, units, data, seed, warnings)
    trained_on = sorted(set(table.loc[table["split"] == "train", "label"]))
    if len(trained_on) < 2:
        raise DataError(
            f"{raw_dir}: the train split holds images of {len(trained_on)} class(es) {trained_on}; "
            "training needs at least two"
        )
    table["label_index"] = table["label"].map({c: i for i, c in enumerate(classes)})
    for message in warnings:
        log.warning("%s", message)
    formats = pd.DataFrame(decoded.formats)
    return table, {
        "source": str(raw_dir),
        "classes": list(classes),
        "n_images": len(table),
        "image_size": data.image_size,
        "cache": None,  # filled in once the cache file is complete
        "counts": {
            s: table[table["split"] == s]["label"]
            .value_counts()
            .reindex(classes, fill_value=0)
            .astype(int)
            .to_dict()
            for s in SPLITS
        },
        "split_by": how,
        # Patient (or other) groups kept within one split: 0 when the set named none (not checked then).
        "groups": int(table.loc[table["group"] != "", "group"].nunique()) if "group" in table else 0,
        "folds": data.folds,
        "formats": {
            key: {str(k): int(v) for k, v in formats[key].value_counts().head(20).items()}
            for key in ("mode", "bits", "size")
        },
        "rejected": decoded.rejected,
        "ignored_non_images": len(ignored),
        "non_images": _listed(ignored),
        "label_conflicts": _listed(conflicts),
        "duplicates": {
            "exact": _listed([_listed(list(table["path"].iloc[idx]), 20) for idx in exact]),
            "near": _listed([_listed(list(table["path"].iloc[idx]), 20) for idx in near]),
            "n_exact_sets": len(exact),
            "n_near_sets": len(near),
        },
        "leakage": _listed(leaks),
        "warnings": warnings,
        "normalization": None,
    }
