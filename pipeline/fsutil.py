"""Writing outputs so that a failure never leaves a half-written or missing previous result.

Staging copies are named ``.<target>.staging-<pid>-<host>-<random>`` beside their target (the
pattern .gitignore lists). A killed writer (SIGKILL, a power cut) cannot remove its own, so the next
writer of the same target removes those whose process on this machine is gone, and puts back a
previous output that a kill left renamed to ``.<target>.old``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
STAGING = "staging"


def link_or_copy(src: str | Path, dest: str | Path, copy=shutil.copyfile) -> None:
    """``dest`` as a hard link to ``src`` (no second copy of a large file), or ``copy``'s copy where the file
    system refuses one (another device, no links)."""
    try:
        os.link(src, dest)
    except OSError:
        copy(src, dest)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def _prefix(target: Path) -> str:
    return f".{target.name}.{STAGING}-{os.getpid()}-{_host()}-"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's live process
        return False
    return False


def clean_stale(target: Path) -> None:
    """Remove the staging copies of ``target`` left by killed writers on this machine; restore a previous
    output that a kill left as ``.<target>.old`` while ``target`` itself is missing."""
    stem = f".{target.name}.{STAGING}-"
    for path in target.parent.glob(glob.escape(stem) + "*"):
        pid, _, rest = path.name[len(stem) :].partition("-")
        if pid.isdigit() and rest.startswith(_host() + "-") and _gone(int(pid)):
            log.info("removing %s, left by a killed run", path)
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    old = target.with_name(f".{target.name}.old")
    if old.is_dir() and not target.exists():
        log.warning("restoring %s from %s (a run was killed while replacing it)", target, old)
        old.rename(target)


def staging_dir(target: Path) -> Path:
    """A new empty staging folder beside ``target`` (stale ones of killed writers removed first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(target), dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual permissions
    return staging


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder that replaces ``target`` only if the block succeeds."""
    target = Path(target)
    staging = staging_dir(target)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def replaced_together(pairs: list[tuple[Path, Path]], keep: list[Path]) -> Iterator[None]:
    """Swap each staging folder of ``pairs`` (staging, target) in for its target, then run the block (e.g.
    versioning the new folders). If a swap or the block fails, every target is put back as it was, and so is
    each file of ``keep`` (its bytes, or its absence, before the swaps); the staging folders are removed."""
    saved = {path: path.read_bytes() if path.is_file() else None for path in keep}
    done: list[tuple[Path, Path]] = []
    try:
        for staging, target in pairs:
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if target.exists():
                target.rename(old)
            staging.rename(target)
            done.append((target, old))
        yield
    except BaseException:
        for target, old in reversed(done):
            shutil.rmtree(target, ignore_errors=True)
            if old.exists():
                old.rename(target)
        for path, data in saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        for staging, _ in pairs:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    for _, old in done:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; it replaces ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(target), suffix=target.suffix, dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def not_replaceable(target: Path) -> str | None:
    """Why a path the user named for an output must not be replaced ('a symbolic link', 'a FIFO'...), or None
    for a regular file or a new path: ``atomic_file`` replaces whatever is there, links and devices included."""
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = {stat.S_ISLNK: "a symbolic link", stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO"}
    kinds |= {stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def write_json(target: str | Path, obj: Any) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex): identical files have it whatever their names; weights files are checked by it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
