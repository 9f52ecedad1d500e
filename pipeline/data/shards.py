"""The shard layout of a handed-in set: its files in a few tar shards, its per-file manifest in git.

DVC's costs grow with the number of files it tracks (``dvc add``, ``status``, ``push``, ``pull`` and each
``dvc repro``'s check of the raw set: seconds per ten thousand small files), so intake stores a large set
(``AUTO_MIN_FILES`` images or more, or ``--layout shards``) as::

    paths.raw/NAME/shards.csv    path,label[,split][,group],sha256,shard,offset,size: one row per image (git)
    paths.raw/NAME/shards/       shard-00000.tar ...: uncompressed tar, members named by ``path``, e.g.
                                 Forest/Forest_1.jpg (``dvc add``: shards.dvc and .gitignore beside, in git)

``path`` is the file's path in the set (as in the folder layout), ``shard`` its shard's file name, ``offset``
and ``size`` where its bytes lie in the shard (ingest reads them there without parsing the tar; ``tar xf``
gives the files back), ``sha256`` its content hash (per-file provenance, checked on every read). Ingest names
each file ``paths.raw/NAME/<path>`` as it does in the folder layout, so ``splits.csv``, the label audit and
``data.exclude`` use the same paths whichever the layout, and the prepared cache is the same.

The layout's names (the manifest's and the shards folder's, which layout a set has) are ``layout``'s, which
readers of a set that never touch a shard share.

The shards are written deterministically (sorted by the set's order, zero times and owners): taking the same
files in again gives the same shards, hence the same DVC objects.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

from pipeline.data import sources
from pipeline.data.layout import SHARDS_CSV, SHARDS_DIR, tracked
from pipeline.data.progress import progress
from pipeline.errors import PipelineError

if TYPE_CHECKING:  # pandas is imported where a table is read or written: decoding workers import this module
    import pandas as pd

COLUMNS = ("sha256", "shard", "offset", "size")  # after path, label and the user's split and group
SHARD_FILES = 1000  # files per shard: tens of shards for tens of thousands of files
SHARD_BYTES = 512 << 20  # or fewer, so that one shard stays a quick download
SHARD_NAME = re.compile(r"shard-(\d+)\.tar")
AUTO_MIN_FILES = 2000  # intake --layout auto: smaller sets (and the demo) keep the folder layout
Layout = Literal["auto", "folder", "shards"]


class ShardError(PipelineError, ValueError):
    """A shard missing, truncated or not the bytes its manifest lists; the message names shard and member."""


@dataclass(frozen=True)
class Member:
    """Where one file's bytes lie: ``shard`` (its path), ``offset`` and ``size``, and the sha256 they must have."""

    shard: str
    member: str  # the member's name: the file's path in the set
    offset: int
    size: int
    sha256: str
    path: str = (
        ""  # the name ingest gives the file (paths.raw/NAME/<member>): what an unreadable one's reason says
    )


def choose(layout: Layout, n_files: int) -> Literal["folder", "shards"]:
    if layout == "auto":
        return "shards" if n_files >= AUTO_MIN_FILES else "folder"
    return layout


def read(member: Member) -> bytes:
    """The member's bytes, checked against its sha256; ``ShardError`` naming shard and member otherwise."""
    try:
        with open(member.shard, "rb") as f:
            f.seek(member.offset)
            data = f.read(member.size)
    except OSError as err:
        raise ShardError(f"{member.shard}: cannot read member {member.member} ({err}){_RESTORE}") from None
    if len(data) != member.size:
        raise ShardError(
            f"{member.shard}: truncated: member {member.member} ends at byte {member.offset + member.size}, "
            f"the shard is shorter{_RESTORE}"
        )
    found = hashlib.sha256(data).hexdigest()
    if found != member.sha256:
        raise ShardError(
            f"{member.shard}: member {member.member} has sha256 {found[:16]}..., not the manifest's "
            f"{member.sha256[:16]}... (corrupt or replaced shard){_RESTORE}"
        )
    return data


_RESTORE = "; restore the shards with `dvc checkout` (or `dvc pull`), or take the set in again"


def pack(
    files: Iterable[tuple[str, Path]],
    root: Path,
    columns: pd.DataFrame,
    *,
    per_shard: int | None = None,
    max_bytes: int | None = None,
) -> None:
    """Write ``files`` ((path in the set, file) pairs, in the set's order) into ``root/shards/*.tar`` and their
    manifest ``root/shards.csv``, with ``columns`` (label and the user's split and group, a row per file).
    A shard holds ``per_shard`` files (``SHARD_FILES``) or fewer, ``max_bytes`` (``SHARD_BYTES``) at most."""
    listed = list(files)
    for name, _ in listed:
        _check_name(name)
    (root / SHARDS_DIR).mkdir()
    rows = _write_shards(root, listed, per_shard, max_bytes)
    _write_manifest(root, listed, columns, rows)


def _write_shards(
    root: Path, listed: list[tuple[str, Path]], per_shard: int | None, max_bytes: int | None, first: int = 0
) -> list[dict]:
    """``listed`` in shards ``shard-<first>.tar``, ``shard-<first + 1>.tar``... in ``root/shards``; their manifest
    columns (sha256, shard, offset, size), a row per file."""
    rows: list[dict] = []
    packed = iter(progress(listed, len(listed), "intake", "files packed"))
    for i, group in enumerate(_groups(listed, per_shard or SHARD_FILES, max_bytes or SHARD_BYTES), first):
        shard = f"shard-{i:05d}.tar"
        items = ((name, file.read_bytes()) for name, file in (next(packed) for _ in group))
        rows += write_shard(root / SHARDS_DIR / shard, items)
    return rows


def write_shard(path: Path, items: Iterable[tuple[str, bytes]]) -> list[dict]:
    """One uncompressed tar of ``items`` (member name, bytes), written deterministically (zero times and
    owners) to a new file that then replaces ``path``; each member's manifest columns (sha256, shard, offset,
    size). A new file, never one rewritten in place: a shard may share its inode with DVC's cache."""
    rows: list[dict] = []
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
            # addfile wrote the header(s), the bytes, then NULs to a whole block: the bytes start that far back
            offset = tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            sha = hashlib.sha256(data).hexdigest()
            rows.append({"sha256": sha, "shard": path.name, "offset": offset, "size": len(data)})
    os.replace(tmp, path)
    return rows


def extend(root: Path, files: list[tuple[str, Path]], columns: pd.DataFrame) -> None:
    """Add ``files`` ((path in the set, file) pairs) to the shard set in ``root`` in new shards after its last,
    their rows (``columns``: label, split, group... as the manifest has them) appended to ``root/shards.csv``.
    The existing shards are left as they are, so DVC stores only the new ones."""
    import pandas as pd

    for name, _ in files:
        _check_name(name)
    manifest = sources.read_csv(root / SHARDS_CSV, ShardError)
    taken = [int(m.group(1)) for p in (root / SHARDS_DIR).iterdir() if (m := SHARD_NAME.fullmatch(p.name))]
    rows = _write_shards(root, files, None, None, max(taken, default=-1) + 1)
    added = pd.concat(
        [
            pd.DataFrame({"path": [name for name, _ in files]}),
            columns.reset_index(drop=True),
            pd.DataFrame(rows),
        ],
        axis=1,
    )
    _replace_csv(pd.concat([manifest, added.astype(str)], ignore_index=True)[list(manifest.columns)], root)


def remove(root: Path, members: set[str]) -> None:
    """Take ``members`` (paths in the set) out of the shard set in ``root``: each shard holding any of them is
    written again without them (the others' bytes and order kept; a shard left empty is deleted), and their rows
    leave ``root/shards.csv``. The other shards are left as they are."""
    manifest = sources.read_csv(root / SHARDS_CSV, ShardError)
    gone = manifest["path"].isin(members)
    for shard in sorted(set(manifest.loc[gone, "shard"])):
        path = root / SHARDS_DIR / shard
        keep = manifest.index[(manifest["shard"] == shard) & ~gone]
        if not len(keep):
            path.unlink()
            continue
        kept = [
            Member(str(path), p, int(o), int(n), s)
            for p, o, n, s in manifest.loc[keep, ["path", "offset", "size", "sha256"]].itertuples(index=False)
        ]
        rows = write_shard(path, [(m.member, read(m)) for m in kept])
        for column in ("offset", "size"):
            manifest.loc[keep, column] = [str(r[column]) for r in rows]
    _replace_csv(manifest[~gone], root)


def _replace_csv(table: pd.DataFrame, root: Path) -> None:
    """``root/shards.csv`` as a new file (it may share its inode with the set it was copied from)."""
    tmp = root / f".{SHARDS_CSV}.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, root / SHARDS_CSV)


def _groups(listed: list[tuple[str, Path]], per_shard: int, max_bytes: int) -> list[list[tuple[str, Path]]]:
    """Consecutive runs of ``listed``: at most ``per_shard`` files and ``max_bytes`` (a larger file alone)."""
    groups: list[list[tuple[str, Path]]] = [[]]
    size = 0
    for name, file in listed:
        n = file.stat().st_size
        if len(groups[-1]) >= per_shard or (groups[-1] and size + n > max_bytes):
            groups.append([])
            size = 0
        groups[-1].append((name, file))
        size += n
    return [g for g in groups if g]


def _write_manifest(
    root: Path, listed: list[tuple[str, Path]], columns: pd.DataFrame, rows: list[dict]
) -> None:
    import pandas as pd

    table = pd.DataFrame({"path": [name for name, _ in listed]})
    table = pd.concat(
        [table, columns.reset_index(drop=True), pd.DataFrame(rows, columns=list(COLUMNS))], axis=1
    )
    table.to_csv(root / SHARDS_CSV, index=False)


def _check_name(name: str) -> None:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ShardError(f"{name}: not a path inside the set (absolute, empty or with '..')")


def scan(root: Path, labelled: bool = True) -> pd.DataFrame:
    """The set's files as ingest's table (path as ``root``/path, label[, split][, group]) plus where each one's
    bytes lie (sha256, shard, offset, size); every shard checked present and long enough first.
    ``labelled``: False for an unlabelled pool, whose manifest has no label column (path[,group],...)."""
    manifest = root / SHARDS_CSV
    table = sources.read_csv(manifest, ShardError)
    given = "path,label[,split][,group]" if labelled else "path[,group]"
    missing = {"path", *COLUMNS, *(["label"] if labelled else [])} - set(table.columns)
    if missing or table.empty:
        raise ShardError(
            f"{manifest}: expected columns {given},{','.join(COLUMNS)} and a row per file "
            f"(missing: {sorted(missing)}); take the set in again (python -m pipeline intake)"
        )
    try:
        ends = table["offset"].astype("int64") + table["size"].astype("int64")
    except ValueError as err:
        raise ShardError(f"{manifest}: offset and size must be whole numbers ({err})") from None
    for name in table["path"]:
        _check_name(name)
    for shard, end in ends.groupby(table["shard"]).max().items():
        path = root / SHARDS_DIR / shard
        if PurePosixPath(shard).name != shard:
            raise ShardError(f"{manifest}: shard '{shard}' must be a file name in {root / SHARDS_DIR}")
        if not path.is_file():
            first = table.loc[table["shard"] == shard, "path"].iloc[0]
            raise ShardError(
                f"{path}: shard not found ({manifest} lists {int((table['shard'] == shard).sum())} files "
                f"in it, e.g. {first}); fetch it: dvc pull {tracked(root)}.dvc"
            )
        if path.stat().st_size < end:
            raise ShardError(
                f"{path}: {path.stat().st_size} bytes, but {manifest} places a member up to byte {end}: "
                f"truncated, or not the shard the manifest describes{_RESTORE}"
            )
    table["member"] = table["path"]
    table["shard"] = [str(root / SHARDS_DIR / s) for s in table["shard"]]
    table["path"] = [str(root / p) for p in table["path"]]
    return table


def members(table: pd.DataFrame) -> list[Member]:
    """``scan``'s rows as the ``Member`` each decoding worker reads."""
    return [
        Member(shard, member, int(offset), int(size), sha, path)
        for shard, member, offset, size, sha, path in zip(
            table["shard"],
            table["member"],
            table["offset"],
            table["size"],
            table["sha256"],
            table["path"],
            strict=True,
        )
    ]
