"""Closing the loop: labels for pool images move those images from the pool into the labelled set.

``python -m pipeline intake labels.csv --add`` reads ``path,label`` rows (paths as ``suggest.csv`` writes them;
``suggest.csv`` itself with a ``label`` column filled in is accepted) and, all or nothing:

- checks every row first: a known class, a path the pool stage kept (``paths.pool/pool.csv``), the file's bytes
  still those the pool stage hashed (not changed since it was suggested), each path once;
- writes the labelled set with the images under their class, and the pool without them, each into a staging copy
  in the layout it has (a folder, or tar shards: new shards for the set, the pool's affected shards rewritten);
- validates the new set with a full ingest, as intake does, and only then swaps both copies in.

Splits stay comparable across rounds: the added images go to the train split only. A set whose split ingest drew
(no ``split`` column) gets that split written into its manifest first (the split ingest gives it now, with
``seed`` and ``data.*`` as they are; a file ingest left out, unreadable or excluded, goes to train); from then on
the manifest's split column is the split, so val and test keep their images in every later round. With
``data.folds``, the test split stays as it was and the folds are drawn again over train and val.

Each add appends a round to the set's ``rounds.json`` (``pipeline.data.rounds``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from pipeline.config import Data
from pipeline.data import ingest as ingest_module
from pipeline.data import layout, rounds, shards, sources
from pipeline.data.ingest import ingest
from pipeline.data.intake import logged_as_sources, to_sources
from pipeline.data.listing import MANIFEST_CSV, scan
from pipeline.data.pool import scan_pool
from pipeline.data.pooled import KEPT, load_pool
from pipeline.data.prepared import SPLITS_CSV, DataError
from pipeline.data.readers import IMAGE_SUFFIXES
from pipeline.fsutil import link_or_copy, replaced_together, staging_dir

REQUIRED = ("path", "label")
# suggest.csv's other columns: the expert may fill a label column into suggest.csv and hand that in
ALLOWED = frozenset({*REQUIRED, "rank", "score", "predicted", "probability", "why"})


@dataclass(frozen=True)
class Added:
    """What an add did: the round it starts, the images added per class, and the pool's images left."""

    round: int
    per_class: dict[str, int]
    pool_left: int
    split_frozen: bool  # the set's drawn split was written into its manifest by this add


def key(path: str | Path) -> str:
    """A path as the loop compares them: relative to the working directory, normalized, with '/'."""
    return Path(os.path.relpath(os.path.abspath(path))).as_posix()


def read_labels(csv: Path) -> pd.DataFrame:
    """The labels CSV's rows: path, label, line (its line in the file), each path once; ``DataError`` otherwise."""
    if not csv.is_file():
        raise DataError(f"{csv}: not found (a CSV with columns path,label)")
    table = sources.read_csv(csv, DataError)
    table.columns = [str(c).strip().lower() for c in table.columns]
    missing, unknown = set(REQUIRED) - set(table.columns), set(table.columns) - ALLOWED
    if missing or unknown:
        raise DataError(
            f"{csv}: columns must be path,label (suggest.csv's columns besides them are ignored); "
            f"missing: {sorted(missing)}, unknown: {sorted(unknown)}"
        )
    if table.empty:
        raise DataError(f"{csv}: only a header row; list one image a line (path,label)")
    table = pd.DataFrame({c: table[c].str.strip() for c in REQUIRED}).assign(line=range(2, len(table) + 2))
    first: dict[str, tuple[int, str]] = {}
    for path, label, line in table.itertuples(index=False):
        if not path:
            raise DataError(f"{csv}, line {line}: empty path")
        if not label:
            raise DataError(
                f"{csv}, line {line}: no label for {path}; remove the row to leave the image in the pool"
            )
        if (seen := first.setdefault(key(path), (line, label))) != (line, label):
            what = "listed twice" if seen[1] == label else f"labelled both '{seen[1]}' and '{label}'"
            raise DataError(f"{csv}, lines {seen[0]} and {line}: {path} {what}; keep one row")
    return table


def _classes(table: pd.DataFrame) -> tuple[str, ...]:
    return tuple(sorted(set(table["label"])))


def _stored_set(raw_dir: Path) -> pd.DataFrame:
    """The labelled set's manifest as stored (paths relative to ``raw_dir``): ``shards.csv``, ``manifest.csv``,
    or, for a folder per class, its image files listed as a manifest would list them."""
    if layout.is_sharded(raw_dir):
        return sources.read_csv(raw_dir / layout.SHARDS_CSV, DataError)
    if (raw_dir / MANIFEST_CSV).is_file():
        return sources.read_csv(raw_dir / MANIFEST_CSV, DataError)
    listed, _ = scan(raw_dir)
    return pd.DataFrame(
        {"path": [Path(p).relative_to(raw_dir).as_posix() for p in listed["path"]], "label": listed["label"]}
    )


@dataclass(frozen=True)
class _Pick:
    line: int
    label: str
    name: str  # the image's path in the pool (its member in a shard layout)
    group: str  # its group hash ('' for none)
    file: Path  # its bytes: the pool's file, or a copy out of its shard


def _picks(
    labels: pd.DataFrame, csv: Path, pool_dir: Path, prepared_pool: Path, scratch: Path
) -> list[_Pick]:
    """Each labelled row's pool image, checked: the pool stage kept it, its bytes are the ones it hashed, and
    the pool keeps at least one image (a pool stored empty is not a pool the pool stage can read)."""
    pool = load_pool(prepared_pool)
    if pool.name != pool_dir.name:
        raise DataError(
            f"{prepared_pool}: holds the pool '{pool.name}', not data.unlabelled '{pool_dir.name}'; run "
            "dvc repro pool, then suggest again"
        )
    hashed = {key(p): row for p, row in zip(pool.table["path"], pool.table.to_dict("records"), strict=True)}
    stored, _ = scan_pool(pool_dir)
    stored_by_key = {key(p): row for p, row in zip(stored["path"], stored.to_dict("records"), strict=True)}
    example = next(iter(hashed), "none")
    picks = []
    for path, label, line in labels.itertuples(index=False):
        found, row = hashed.get(key(path)), stored_by_key.get(key(path))
        if found is None or row is None:
            raise DataError(
                f"{csv}, line {line}: {path} is not in the pool {pool_dir} (paths as suggest.csv names them, "
                f"e.g. {example})"
            )
        if found["status"] != KEPT:
            raise DataError(
                f"{csv}, line {line}: {path}: the pool stage left it out ({found['reason']}); "
                "it cannot join the labelled set"
            )
        if "member" in row:  # shard layout: the bytes out of the shard (checked against shards.csv)
            data = shards.read(shards.members(pd.DataFrame([row]))[0])
            name = row["member"]
            file = scratch / "picked" / str(line) / Path(name).name
            file.parent.mkdir(parents=True)
            file.write_bytes(data)
        else:
            file, name = Path(row["path"]), Path(row["path"]).relative_to(pool_dir).as_posix()
            data = file.read_bytes()
        if (now := hashlib.sha256(data).hexdigest()) != found["sha256"]:
            raise DataError(
                f"{csv}, line {line}: {path} changed since it was suggested (sha256 {now[:12]}..., the pool "
                f"stage's {found['sha256'][:12]}...); run dvc repro pool and suggest again"
            )
        picks.append(_Pick(line, label, name, found["group"], file))
    if len(picks) == len(stored):
        raise DataError(
            f"{csv}: labels every image of the pool {pool_dir}, which cannot be left empty; leave one out, or "
            "take the images in with the set (python -m pipeline intake) and set data.unlabelled: null"
        )
    return picks


def _link_tree(src: Path, dest: Path) -> None:
    """``src``'s files in the empty folder ``dest``: images and shards hard-linked where the file system allows
    (never written in place: every change is a new file), the rest copied."""

    def place(a: str, b: str) -> None:
        if Path(a).suffix.lower() in {*IMAGE_SUFFIXES, ".tar"}:
            link_or_copy(a, b, copy=shutil.copy2)
        else:
            shutil.copy2(a, b)

    shutil.copytree(src, dest, dirs_exist_ok=True, copy_function=place, symlinks=True)


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    path.unlink(missing_ok=True)  # a new file: the staging copy's may be the stored one's inode
    table.to_csv(path, index=False)


def _current_splits(
    raw_dir: Path, seed: int, data: Data, validated: Path | None, scratch: Path
) -> dict[str, str]:
    """The split ingest gives each file of the set now (``seed`` and ``data.*`` as they are)."""
    out = scratch / "current"
    quiet = logging.getLogger(ingest_module.__name__)  # its warnings were the user's at intake and ingest
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ingest(raw_dir, out, seed=seed, data=data, reuse=validated)
    finally:
        quiet.setLevel(level)
    table = pd.read_csv(out / SPLITS_CSV, dtype=str, keep_default_na=False)
    return {key(p): s for p, s in zip(table["path"], table["split"], strict=True)}


def _with_columns(
    table: pd.DataFrame, raw_dir: Path, picks: list[_Pick], split_of: dict[str, str] | None
) -> pd.DataFrame:
    """The stored manifest with a split column (``split_of``, when it had none) and a group column when an added
    image has a group; the columns in manifest order (path, label, split, group, then the shards' own)."""
    table = table.copy()
    if "split" not in table:
        assert split_of is not None
        table.insert(2, "split", [split_of.get(key(raw_dir / p), "train") for p in table["path"]])
    if "group" not in table and any(p.group for p in picks):
        table.insert(3, "group", "")
    return table


def _names(table: pd.DataFrame, picks: list[_Pick], raw_dir: Path) -> list[str]:
    """Each pick's path in the set: ``<label>/<file name>``, made unique (case-insensitively, and against the
    files in ``raw_dir``, listed or not) as intake does."""
    taken = {Path(os.path.normpath(p)).as_posix().lower() for p in table["path"]}
    names = []
    for pick in picks:
        stem, suffix = Path(pick.name).stem, Path(pick.name).suffix
        name, n = f"{pick.label}/{stem}{suffix}", 1
        while name.lower() in taken or (raw_dir / name).exists():
            name, n = f"{pick.label}/{stem}_{n}{suffix}", n + 1
        taken.add(name.lower())
        names.append(name)
    return names


def _write_set(staging: Path, table: pd.DataFrame, picks: list[_Pick], names: list[str]) -> None:
    """The labelled set with the picks added to the train split, into ``staging`` (a copy of the set)."""
    extra = {"label": [p.label for p in picks], "split": ["train"] * len(picks)}
    if "group" in table:
        extra["group"] = [p.group for p in picks]
    if layout.is_sharded(staging):
        _write_csv(table, staging / layout.SHARDS_CSV)  # the split (and group) columns first
        shards.extend(staging, [(n, p.file) for n, p in zip(names, picks, strict=True)], pd.DataFrame(extra))
        return
    for name, pick in zip(names, picks, strict=True):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(pick.file, staging / name)
    _write_csv(
        pd.concat([table, pd.DataFrame({"path": names} | extra)], ignore_index=True), staging / MANIFEST_CSV
    )


def _write_pool(staging: Path, picks: list[_Pick]) -> int:
    """The pool without the picks, in ``staging`` (a copy of it); the images left."""
    names = {p.name for p in picks}
    if layout.is_sharded(staging):
        shards.remove(staging, names)
    else:
        for name in names:
            (staging / name).unlink()
            for parent in (staging / name).parents:  # folders left empty go too
                if parent == staging or any(parent.iterdir()):
                    break
                parent.rmdir()
        if (staging / MANIFEST_CSV).is_file():
            listed = sources.read_csv(staging / MANIFEST_CSV, DataError)
            listed = listed[~listed["path"].map(lambda p: Path(os.path.normpath(p)).as_posix()).isin(names)]
            _write_csv(listed, staging / MANIFEST_CSV)
    left, _ = scan_pool(staging)  # still a pool the pool stage reads
    return len(left)


@contextmanager
def labels_added(
    csv: Path,
    raw_dir: Path,
    pool_dir: Path,
    prepared_pool: Path,
    *,
    seed: int,
    data: Data,
    validated: Path | None = None,
) -> Iterator[Added]:
    """Move the images ``csv`` labels from the pool ``pool_dir`` into the labelled set ``raw_dir`` (module
    docstring): both are written into staging copies and checked, then swapped in together, then the block runs
    (``dvc add`` of both). If anything fails, the set, the pool and their DVC files are left as they were."""
    labels = read_labels(csv)
    stored = _stored_set(raw_dir)
    classes = _classes(stored[stored["path"].map(lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)])
    for label, line in zip(labels["label"], labels["line"], strict=True):
        if label not in classes:
            raise DataError(
                f"{csv}, line {line}: label '{label}' is not a class of {raw_dir.name} ({', '.join(classes)})"
            )
    data = dataclasses.replace(data, dataset=raw_dir.name)
    new_set, new_pool = staging_dir(raw_dir), staging_dir(pool_dir)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            added = _stage(
                labels,
                csv,
                stored,
                raw_dir,
                pool_dir,
                prepared_pool,
                new_set,
                new_pool,
                Path(tmp),
                seed=seed,
                data=data,
                validated=validated,
            )
    except BaseException:
        shutil.rmtree(new_set, ignore_errors=True)
        shutil.rmtree(new_pool, ignore_errors=True)
        raise
    versioning = [f for target in (raw_dir, pool_dir) for f in _dvc_files(target)]
    with replaced_together([(new_set, raw_dir), (new_pool, pool_dir)], keep=versioning):
        yield added


def _dvc_files(target: Path) -> list[Path]:
    """What ``dvc add`` of the set in ``target`` writes besides the set: its .dvc file and the .gitignore."""
    tracked = layout.tracked(target)
    return [tracked.with_name(tracked.name + ".dvc"), tracked.parent / ".gitignore"]


def _stage(
    labels: pd.DataFrame,
    csv: Path,
    stored: pd.DataFrame,
    raw_dir: Path,
    pool_dir: Path,
    prepared_pool: Path,
    new_set: Path,
    new_pool: Path,
    scratch: Path,
    *,
    seed: int,
    data: Data,
    validated: Path | None,
) -> Added:
    """Write the set with the picks into ``new_set`` and the pool without them into ``new_pool``; validate."""
    picks = _picks(labels, csv, pool_dir, prepared_pool, scratch)
    frozen = "split" not in stored
    split_of = _current_splits(raw_dir, seed, data, validated, scratch) if frozen else None
    table = _with_columns(stored, raw_dir, picks, split_of)
    names = _names(table, picks, raw_dir)
    _link_tree(raw_dir, new_set)
    _write_set(new_set, table, picks, names)
    history = rounds.read(raw_dir)
    history.append(
        {
            "round": len(history) + 2,  # round 1: the set as taken in
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "labels_csv": str(csv),
            "pool": pool_dir.name,
            "added": len(picks),
            "paths": names,
        }
    )
    rounds.write(new_set, history)
    try:
        with logged_as_sources({str(new_set): str(raw_dir)}):
            ingest(new_set, scratch / "new", seed=seed, data=data, reuse=validated, keep=validated)
    except DataError as err:  # name the set's own files, not the staging copy's
        raise DataError(
            f"{csv}: not added ({raw_dir} and {pool_dir} left as they were): "
            f"{to_sources(str(err), {str(new_set): str(raw_dir)})}"
        ) from None
    _link_tree(pool_dir, new_pool)
    left = _write_pool(new_pool, picks)
    per_class = pd.Series([p.label for p in picks]).value_counts().sort_index()
    return Added(len(history) + 1, {str(k): int(v) for k, v in per_class.items()}, left, frozen)
