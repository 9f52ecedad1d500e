"""Which files of a handed-in folder may be read: the one link policy that intake, ingest and predict share.

Policy: a symbolic link is followed only when it resolves inside the source folder (the data set
folder, or the manifest's folder); one that resolves outside it, or a link loop, is an error naming
the link. Nothing outside the source folder is read, so nothing outside it is copied into
``paths.raw`` (which DVC caches and ``dvc push`` uploads). Whether a listed file is a regular file is
checked where it is opened (``readers.read``, intake's copy): a FIFO, device or socket is skipped with
a reason, never read, since reading ``/dev/zero`` never ends.

Written here rather than with ``os.walk(followlinks=True)``: that follows links anywhere and loops on
a link to an ancestor; ``Path.rglob`` lists links to folders without entering them.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    import pandas as pd


class UnsafePath(PipelineError, ValueError):
    """A link that leaves the source folder, or a link loop; the message names the link."""


def inside(path: Path, root: Path) -> Path:
    """``path`` itself, after checking that it (and any link on the way) resolves inside ``root``."""
    try:
        real = path.resolve(strict=False)
    except (RuntimeError, OSError) as err:  # Python 3.11: RuntimeError on a loop; 3.13: OSError
        raise UnsafePath(f"{path}: symbolic link loop ({err}); remove the link") from None
    if _loops(path):
        raise UnsafePath(f"{path}: symbolic link loop; remove the link")
    base = root.resolve()
    if real != base and not real.is_relative_to(base):
        raise UnsafePath(
            f"{path}: resolves to {real}, outside the source folder {base}; nothing outside it "
            "is read: copy the file into the folder instead of linking it"
        )
    return path


def _loops(path: Path) -> bool:
    """A link loop that ``resolve(strict=False)`` stops at without raising (it does on some versions)."""
    try:
        os.stat(path)
    except OSError as err:
        return err.errno == errno.ELOOP
    return False


def listing(folder: Path, root: Path | None = None) -> list[Path]:
    """Every non-hidden file under ``folder`` (sorted, links inside ``root`` followed), as paths under ``folder``.

    ``root`` (default: ``folder``) is the source folder links must stay in. Raises ``UnsafePath`` for a
    link out of it, or a folder link back into its own ancestors (a loop).
    """
    base = (folder if root is None else root).resolve()
    found: list[Path] = []

    def walk(folder: Path, ancestors: frozenset[Path]) -> None:
        real = folder.resolve()
        if real in ancestors:
            raise UnsafePath(f"{folder}: symbolic link loop (links back to {real}); remove the link")
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name.startswith("."):
                    continue
                path = Path(entry.path)
                if entry.is_symlink():
                    inside(path, base)
                if entry.is_dir():  # follows a link (checked above)
                    walk(path, ancestors | {real})
                else:  # files, special files and dangling links: their reader says why it cannot read one
                    found.append(path)

    walk(folder, frozenset())
    return found


def non_regular(path: Path) -> str | None:
    """Why ``path`` (links followed) must not be read as a file: 'FIFO', 'character device'...; None if regular."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return None
    kinds = {
        stat.S_ISFIFO: "FIFO",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
        stat.S_ISSOCK: "socket",
        stat.S_ISDIR: "folder",
    }
    return next((name for test, name in kinds.items() if test(mode)), "special file")


def read_csv(csv: Path, error: type[Exception], what: str = "") -> pd.DataFrame:
    """A handed-in CSV as strings (nothing read as NaN), or ``error`` naming the file (``what``: the key it
    came from, e.g. ' (data.exclude)')."""
    import pandas as pd

    try:
        return pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise error(f"{csv}{what}: not a readable CSV ({err})") from None


def listed(manifest: Path, paths: Iterable[str]) -> list[Path]:
    """A manifest's paths, relative to its folder, each checked to resolve inside that folder."""
    return [inside(manifest.parent / p, manifest.parent) for p in paths]


def path_column(csv: Path, error: type[Exception], what: str = "") -> list[str]:
    """The non-empty entries of a CSV's ``path`` column (any case, other columns ignored), or ``error``
    naming the file (``what``: the key it came from, e.g. ' (data.exclude)')."""
    table = read_csv(csv, error, what)
    column = next((c for c in table.columns if c.strip().lower() == "path"), None)
    if column is None:
        raise error(f"{csv}{what}: no 'path' column (columns: {', '.join(map(str, table.columns))})")
    return [p.strip() for p in table[column] if p.strip()]
