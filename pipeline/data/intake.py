"""Intake: copy a user's image set into paths.raw in the layout ingest reads, validate it, then swap it in.

The source is never written to, and nothing outside it is read (``sources``' link policy: a link that
leaves the source folder is an error). Only regular files are copied: a FIFO, device or socket is
skipped with a reason (``data.on_bad_file``). A folder per class is copied as it is; a CSV manifest
(``path,label[,split][,group]``, paths relative to the manifest's folder) becomes a folder per class
plus ``manifest.csv`` with the copies' paths, keeping the split and group columns. The copy is
validated by a full ingest into a scratch folder and replaces an existing set of the same name
only if that succeeds. A large set (``--layout``, ``shards.AUTO_MIN_FILES`` image files) is instead packed
straight from the source into a few tar shards with a per-file manifest (``shards``), so that DVC versions tens
of files instead of tens of thousands: the same shards and manifest as the copy would give, each file read once
from the source, and those shards are what the full ingest validates.

Privacy: a ``group`` column usually holds patient IDs. The copy's manifest keeps only a salted hash of
each group (``group_hash``), so ``paths.raw`` (which DVC versions and pushes), ``splits.csv`` and every
report see the hash, never the ID. The salt is a per-repository secret, never committed: the same
salt gives the same hashes, so taking the same data in again gives the same splits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import yaml

from pipeline.config import Data
from pipeline.data import ingest as ingest_module
from pipeline.data import pool as pool_module
from pipeline.data import readers, shards, sources
from pipeline.data.groups import add_dicom_groups, dicom_groups
from pipeline.data.ingest import ingest
from pipeline.data.layout import SHARDS_CSV, tracked
from pipeline.data.listing import MANIFEST_CSV, class_folders, read_manifest, scan
from pipeline.data.prepared import DataError
from pipeline.data.progress import progress
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_dir, atomic_file

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
GROUP_HASH_CHARS = 16  # 64 bits of sha256: no collisions among any realistic number of patients


class IntakeError(PipelineError, RuntimeError):
    """Intake could not finish a step outside the data itself (DVC, params.yaml)."""


def default_name(src: Path) -> str:
    """The set's name when none is given: the folder's name, or the manifest's folder's name."""
    return (src.resolve().parent if src.is_file() else src.resolve()).name


def check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise DataError(
            f"{what} '{name}' must start with a letter or digit and hold only letters, digits, '.', "
            "'_' and '-' (it becomes a folder name)"
        )
    return name


@dataclasses.dataclass
class Copied:
    """What ``copy_set`` did: copy -> source paths, and the source files it left out (with why)."""

    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    rejected: list[dict] = dataclasses.field(default_factory=list)  # not regular files: {path, reason}
    non_images: list[str] = dataclasses.field(default_factory=list)  # manifest rows that name no image file


def _regular(src: Path, copied: Copied, on_bad_file: str) -> bool:
    """Whether ``src`` (links followed: ``sources`` checked them) is a regular file; if not, record why."""
    if kind := sources.non_regular(src):
        reason = f"not a regular file ({kind})"
        if on_bad_file == "fail":
            raise DataError(f"{src}: {reason}; set data.on_bad_file: skip to skip it")
        copied.rejected.append({"path": str(src), "reason": reason})
        return False
    return True


def _copy_file(src: Path, dest: Path, copied: Copied, on_bad_file: str) -> bool:
    """Copy ``src`` if it is a regular file; else record why not."""
    if not _regular(src, copied, on_bad_file):
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return True


def _manifest_plan(manifest: Path, dest: Path, on_bad_file: str) -> tuple[pd.DataFrame, list[Path], Copied]:
    """The copy's manifest rows (paths ``<label>/<file name>``, made unique) and their source files, as the copy
    of the manifest's images into ``dest`` lays them out."""
    table, ignored = read_manifest(manifest)
    rows, files, taken, copied = [], [], set(), Copied(non_images=ignored)
    for row in table.to_dict("records"):
        src = Path(row["path"])
        label = check_name(row["label"], "label")
        name, n = src.name, 1
        while (label, name.lower()) in taken:  # same file name from two source folders
            name, n = f"{src.stem}_{n}{src.suffix}", n + 1
        if _regular(src, copied, on_bad_file):
            taken.add((label, name.lower()))
            copied.sources[str(dest / label / name)] = str(src)
            rows.append(row | {"path": f"{label}/{name}"})
            files.append(src)
    return pd.DataFrame(rows, columns=table.columns), files, copied


def copy_manifest(manifest: Path, dest: Path, on_bad_file: str = "skip") -> Copied:
    """Copy each listed image into ``dest/<label>/``, write ``dest/manifest.csv``."""
    table, files, copied = _manifest_plan(manifest, dest, on_bad_file)
    for name, src in zip(table["path"], files, strict=True):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest / name)
    table.to_csv(dest / MANIFEST_CSV, index=False)
    return copied


def _not_a_set(src: Path) -> DataError:
    return DataError(
        f"{src}: expected a folder with one subfolder per class, or a CSV manifest "
        "(path,label[,split][,group])"
    )


def copy_set(src: Path, dest: Path, on_bad_file: str = "skip") -> Copied:
    """Copy a folder-per-class set or a manifest's images into the empty folder ``dest``."""
    if src.is_dir():
        copied = Copied()
        for class_dir in class_folders(src):
            check_name(class_dir.name, "class folder")
        listed = sources.listing(src)
        for path in progress(listed, len(listed), "intake", "files copied"):
            _copy_file(path, dest / path.relative_to(src), copied, on_bad_file)
        copied.sources[str(dest)] = str(src)
        return copied
    if src.is_file() and src.suffix.lower() == ".csv":
        return copy_manifest(src, dest, on_bad_file)
    raise _not_a_set(src)


def plan_set(src: Path, dest: Path, on_bad_file: str = "skip") -> tuple[pd.DataFrame, list[Path], Copied]:
    """What ``copy_set`` would copy into ``dest`` and ingest list there, without copying: the set's image files
    (table: path in the set, label[, split][, group] as given), their source files, and ``Copied``."""
    if src.is_file() and src.suffix.lower() == ".csv":
        return _manifest_plan(src, dest, on_bad_file)
    if not src.is_dir():
        raise _not_a_set(src)
    copied = Copied()
    for class_dir in class_folders(src):
        check_name(class_dir.name, "class folder")
    for path in sources.listing(src):  # every file copy_set would skip, recorded (or an error) as it does
        _regular(path, copied, on_bad_file)
    copied.sources[str(dest)] = str(src)
    listed, _ = scan(src)  # as ingest lists the copy (a manifest.csv in the folder included)
    table = listed[[sources.non_regular(Path(p)) is None for p in listed["path"]]].reset_index(drop=True)
    if emptied := sorted(set(listed["label"]) - set(table["label"])):
        raise DataError(f"{src / emptied[0]}: class '{emptied[0]}' has no image files that are regular files")
    files = [Path(p) for p in table["path"]]
    table["path"] = [f.relative_to(src).as_posix() for f in files]
    return table, files, copied


def group_salt(path: Path) -> str:
    """The repository's secret salt for group hashes: read from ``path``, created there (random) on first use."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(secrets.token_hex(32) + "\n")
            tmp.chmod(0o600)
    return path.read_text().strip()


def group_hash(value: str, salt: str) -> str:
    """A group ID as stored: the first ``GROUP_HASH_CHARS`` hex digits of sha256(salt + value)."""
    return hashlib.sha256((salt + value).encode()).hexdigest()[:GROUP_HASH_CHARS]


def hash_groups(manifest: Path, salt: str) -> None:
    """Replace each non-empty ``group`` value of ``manifest`` (a copy) by its salted hash, in place."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    if any(c.strip().lower() == "group" for c in table.columns):
        _hashed_groups(table, salt).to_csv(manifest, index=False)


def _hashed_groups(table: pd.DataFrame, salt: str) -> pd.DataFrame:
    """``table`` with each non-empty ``group`` value replaced by its salted hash."""
    table = table.copy()
    for column in [c for c in table.columns if c.strip().lower() == "group"]:
        table[column] = [group_hash(v.strip(), salt) if v.strip() else "" for v in table[column]]
    return table


def to_sources(message: str, sources: dict[str, str]) -> str:
    for copy, source in sorted(sources.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(copy, source)
    return message


@contextmanager
def logged_as_sources(sources: dict[str, str]) -> Iterator[None]:
    """Ingest's log lines name the user's own files while it validates their staging copies."""

    def rename(record: logging.LogRecord) -> bool:
        record.msg, record.args = to_sources(record.getMessage(), sources), None
        return True

    ingest_module.log.addFilter(rename)
    try:
        yield
    finally:
        ingest_module.log.removeFilter(rename)


def intake(
    src: Path,
    target: Path,
    *,
    seed: int,
    data: Data,
    salt: str,
    validated: Path | None = None,
    layout: shards.Layout = "auto",
) -> dict:
    """Copy (or pack) ``src`` to ``target``, validated by a full ingest; ``target`` is replaced only on success.

    ``group`` values are stored as ``group_hash(value, salt)``. ``validated``: where that ingest keeps
    what it decoded, for the ingest stage to reuse (``decoding.Validated``). ``layout``: the folder layout,
    or tar shards and their manifest (``shards``; ``auto``: shards from ``shards.AUTO_MIN_FILES`` image files on,
    counted as handed in).
    Returns the ingest report, its paths pointing into ``target``.
    """
    src, target = src.resolve(), target.absolute()
    if target == src or target in src.parents:
        raise DataError(f"{src}: already inside {target}; hand in a set from outside paths.raw")
    with atomic_dir(target) as staging, tempfile.TemporaryDirectory() as scratch:
        try:
            planned = plan_set(src, staging, data.on_bad_file) if layout != "folder" else None
            if planned is not None and shards.choose(layout, len(planned[0])) == "shards":
                copied = planned[2]
                n_groups = _pack_set(*planned[:2], staging, data, salt)
            else:
                copied = copy_set(src, staging, data.on_bad_file)
                n_groups = _groups_of_copy(staging, data, salt)
        except sources.UnsafePath as err:
            raise DataError(f"{src}: not taken in ({target} left as it was): {err}") from None
        for skipped in copied.rejected:
            ingest_module.log.warning("skipping %s (%s)", skipped["path"], skipped["reason"])
        try:
            with logged_as_sources(copied.sources):
                report = ingest(
                    staging,
                    Path(scratch) / "prepared",
                    seed=seed,
                    data=dataclasses.replace(data, dataset=target.name),
                    keep=validated,
                )
        except DataError as err:  # name the user's own files, not their staging copies
            raise DataError(
                f"{src}: not taken in ({target} left as it was): {to_sources(str(err), copied.sources)}"
            ) from None
    report = json.loads(
        json.dumps(report).replace(json.dumps(str(staging))[1:-1], json.dumps(str(target))[1:-1])
    )
    # What never reached the copy: listed in the report as ingest would have listed it.
    report["rejected"] = copied.rejected + report["rejected"]
    report["non_images"] = copied.non_images + report.get("non_images", [])
    report["ignored_non_images"] += len(copied.non_images)
    if n_groups:
        report["groups_from"] = f"DICOM {data.dicom_group}: {n_groups} groups, stored as salted hashes"
    return report


def _groups_of_copy(staging: Path, data: Data, salt: str) -> int:
    """The copy's groups hashed in its manifest, or DICOM groups added (hashed); the number of DICOM groups."""
    if (staging / MANIFEST_CSV).is_file():
        hash_groups(staging / MANIFEST_CSV, salt)
    if not data.dicom_group:
        return 0
    return add_dicom_groups(staging, data.dicom_group, lambda v: group_hash(v, salt))  # hashed already


def _pack_set(table: pd.DataFrame, files: list[Path], staging: Path, data: Data, salt: str) -> int:
    """Pack ``plan_set``'s files straight from the source into tar shards in ``staging`` (``shards.pack``), their
    manifest holding what the copy's would (groups hashed, or DICOM groups added); the number of DICOM groups.
    Each file is read once, and nothing is written outside ``staging``."""
    table = _hashed_groups(table, salt)
    n_groups = 0
    if data.dicom_group:
        table, n_groups = dicom_groups(table, files, data.dicom_group, lambda v: group_hash(v, salt))
    shards.pack(zip(table["path"], files, strict=True), staging, table.drop(columns="path"))
    return n_groups


def plan_pool(src: Path, dest: Path, on_bad_file: str = "skip") -> tuple[pd.DataFrame, list[Path], Copied]:
    """An unlabelled pool's image files: a table (path in the pool: its path under the source folder or the
    CSV's folder, group as given or ''), their source files, and ``Copied`` (files left out, and why)."""
    if src.is_file() and src.suffix.lower() == ".csv":
        table, ignored = pool_module.read_manifest(src)
        base = src.parent
    elif src.is_dir():
        images, others = readers.image_files(src)
        table, ignored = pd.DataFrame({"path": list(map(str, images)), "group": ""}), list(map(str, others))
        base = src
    else:
        raise DataError(
            f"{src}: expected a folder of images (subfolders allowed) or a CSV with a path column"
        )
    copied = Copied(non_images=ignored)
    files = [Path(p) for p in table["path"]]
    regular = [_regular(f, copied, on_bad_file) for f in files]
    table, files = (
        table[regular].reset_index(drop=True),
        [f for f, r in zip(files, regular, strict=True) if r],
    )
    if table.empty:
        raise DataError(
            f"{src}: no image files that are regular files (accepted: {', '.join(sorted(readers.IMAGE_SUFFIXES))})"
        )
    table["path"] = [Path(os.path.normpath(f.relative_to(base))).as_posix() for f in files]
    copied.sources[str(dest)] = str(base)
    return table, files, copied


def intake_pool(
    src: Path,
    target: Path,
    *,
    data: Data,
    salt: str,
    validated: Path | None = None,
    layout: shards.Layout = "auto",
) -> dict:
    """Copy (or pack) the unlabelled pool ``src`` to ``target``, validated by the pool stage's decoding pass;
    ``target`` is replaced only on success. As ``intake`` for a labelled set: groups stored as salted hashes
    (a CSV's group column, or DICOM ``data.dicom_group``), ``validated`` keeps the decodes for the pool stage.
    Returns the pool's report (nothing compared with the labelled set yet: the pool stage does that)."""
    src, target = src.resolve(), target.absolute()
    if target == src or target in src.parents:
        raise DataError(f"{src}: already inside {target}; hand in a pool from outside {target.parent}")
    with atomic_dir(target) as staging, tempfile.TemporaryDirectory() as scratch:
        try:
            table, files, copied = plan_pool(src, staging, data.on_bad_file)
        except sources.UnsafePath as err:
            raise DataError(f"{src}: not taken in ({target} left as it was): {err}") from None
        table = _hashed_groups(table, salt)
        n_groups = 0
        if data.dicom_group:
            table, n_groups = dicom_groups(table, files, data.dicom_group, lambda v: group_hash(v, salt))
        if shards.choose(layout, len(table)) == "shards":
            shards.pack(zip(table["path"], files, strict=True), staging, table.drop(columns="path"))
        else:
            listed = list(zip(table["path"], files, strict=True))
            for name, file in progress(listed, len(listed), "intake", "files copied"):
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, staging / name)
            if table["group"].ne("").any():
                table.to_csv(staging / MANIFEST_CSV, index=False)
        for skipped in copied.rejected:
            ingest_module.log.warning("skipping %s (%s)", skipped["path"], skipped["reason"])
        try:
            with logged_as_sources(copied.sources):
                report = pool_module.prepare_pool(
                    staging, Path(scratch) / "pool", data=data, labelled=None, keep=validated
                )
        except DataError as err:  # name the user's own files, not their staging copies
            raise DataError(
                f"{src}: not taken in ({target} left as it was): {to_sources(str(err), copied.sources)}"
            ) from None
    report = json.loads(
        json.dumps(report).replace(json.dumps(str(staging))[1:-1], json.dumps(str(target))[1:-1])
    )
    report["pool"] = target.name
    report["n_files"] += len(copied.rejected)  # FIFOs and the like: image files never copied
    report["rejected"] = copied.rejected + report["rejected"]
    report["non_images"] = copied.non_images + report["non_images"]
    report["ignored_non_images"] += len(copied.non_images)
    if n_groups:
        report["groups_from"] = f"DICOM {data.dicom_group}: {n_groups} groups, stored as salted hashes"
    return report


def _dvc(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise IntakeError(f"dvc {' '.join(args)} failed:\n{done.stderr.strip() or done.stdout.strip()}")


def dvc_add(target: Path) -> list[Path]:
    """Version the set in ``target`` with DVC: the folder (``<target>.dvc``) or its shards
    (``<target>/shards.dvc``, the manifest beside it is for git). Returns the files to commit (those that
    no longer exist: their removal).

    A ``<target>.dvc`` left by the same name's earlier folder layout is removed first (``dvc remove``, the
    files kept): DVC refuses to track the shards inside a folder it already tracks.
    """
    versioned = tracked(target)
    old = target.with_name(target.name + ".dvc")
    removed = versioned != target and old.is_file()
    if removed:
        _dvc("remove", str(old))
    _dvc("add", str(versioned))
    commit = [versioned.with_name(versioned.name + ".dvc"), versioned.parent / ".gitignore"]
    if versioned != target:
        commit.append(target / SHARDS_CSV)
    return commit + ([old, target.parent / ".gitignore"] if removed else [])


def set_dataset(params_file: Path, name: str) -> None:
    """Set ``data.dataset: name`` in params.yaml, changing that one line and keeping every comment."""
    value = name if yaml.safe_load(name) == name else json.dumps(name)
    lines = params_file.read_text().splitlines(keepends=True)
    section = next((i for i, line in enumerate(lines) if re.match(r"data:\s*(#.*)?$", line)), None)
    if section is None:
        lines += ["\n", "data:\n", f"  dataset: {value}\n"]
    else:
        end = next((i for i in range(section + 1, len(lines)) if re.match(r"\S", lines[i])), len(lines))
        key = next((i for i in range(section + 1, end) if re.match(r"\s+dataset:", lines[i])), None)
        if key is None:
            lines.insert(section + 1, f"  dataset: {value}\n")
        else:
            lines[key] = re.sub(
                r"(\s+dataset:\s*)([^#\s]+|\"[^\"]*\"|'[^']*')",
                lambda m: m.group(1) + value,
                lines[key],
                count=1,
            )
    text = "".join(lines)
    if (yaml.safe_load(text) or {}).get("data", {}).get("dataset") != name:
        raise IntakeError(f"{params_file}: could not set data.dataset to '{name}'; set it by hand")
    with atomic_file(params_file) as tmp:
        tmp.write_text(text)
