"""Ingest's one decoding pass over a set's files: in parallel, and skipped where intake already decoded the bytes.

Each file is read and decoded once per pass (``decode_file``): its content hash, format, dHash and pixel
sums (for the train split's normalization statistics) come from that one decode, so nothing reads the
pixel cache back. Sets of ``PARALLEL_MIN_FILES`` files or more are decoded by a pool of worker
processes, one per usable core, ``CHUNK`` files per task and at most ``IN_FLIGHT`` tasks per worker
ahead of the writer, so memory stays bounded whatever the set's size; the results come back in file order,
and the cache is identical to a serial pass.

Intake validates a set by a full ingest; what that pass decoded is kept (``Validated``: the conformed
pixels, hashes and facts, keyed by the file's sha256 and the decode settings) in ``paths.validated``,
a machine-local folder that is never versioned. The ingest stage that follows takes each file whose
bytes and settings are unchanged from there instead of decoding it again: the same pixels, a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import cast

import cv2
import numpy as np

from pipeline.data import readers, shards, validation
from pipeline.fsutil import file_sha256, link_or_copy
from pipeline.pixels import unit_max

PARALLEL_MIN_FILES = 2000  # below this a pool's start-up (about a second) costs more than it saves
CHUNK = 128  # files per worker task
IN_FLIGHT = 4  # tasks queued per worker: enough to keep it busy, few enough to bound memory
FACTS = "facts.npz"
PIXELS = "pixels.npy"
META = "settings.json"
READ_ONCE_BYTES = 16 << 20  # an image file up to this size is read once for its hash and its decode


@dataclass(frozen=True)
class Settings:
    """The data.* params that change what a file decodes to; a different value invalidates ``Validated``."""

    image_size: int
    channels: readers.Channels
    dicom_window: tuple[float, float] | None
    max_image_pixels: int

    @classmethod
    def of(cls, data) -> Settings:
        window = tuple(data.dicom_window) if data.dicom_window is not None else None
        return cls(data.image_size, data.channels, window, data.max_image_pixels)


@dataclass
class Decoded:
    """One file's decode: pixels (None if rejected) and the small facts ingest keeps."""

    sha256: str
    pixels: np.ndarray | None = None
    reason: str | None = None  # unreadable: why (the file is skipped, or ingest fails: data.on_bad_file)
    bands_error: int | None = None  # band count that data.channels: rgb cannot take
    mode: str = ""
    bits: int = 0
    size: str = ""
    dhash: np.ndarray | None = None
    sums: np.ndarray | None = None  # (2, C): sum and sum of squares of the pixels in [0, 1] units
    dtype: str = ""  # the pixels' own dtype (the cache may widen them)
    reused: bool = False


def pixel_sums(pixels: np.ndarray) -> np.ndarray:
    """(2, C) float64: per-channel sum and sum of squares of ``pixels`` in [0, 1] units (integers / dtype max)."""
    flat = pixels.reshape(-1, pixels.shape[-1])
    if pixels.dtype in (np.uint8, np.uint16) and pixels.shape[-1] <= 4:
        # OpenCV sums in float64, exactly: every partial sum is an integer below 2**53 (1024 x 1024 pixels of
        # 65535**2 at most), so these equal the int64 sums below; ~6x faster on a 64 px tile. The squares are
        # taken of float64 copies: OpenCV 5's cv2.multiply(uint16, uint16, dtype=CV_64F) rounds them (float32)
        top = unit_max(pixels.dtype)
        wide = pixels.astype(np.float64)
        squares = cv2.multiply(wide, wide)
        n = pixels.shape[-1]
        total, square_total = np.array(cv2.sumElems(pixels)[:n]), np.array(cv2.sumElems(squares)[:n])
        return np.stack([total / top, square_total / (top * top)])
    if pixels.dtype.kind in "ui":
        top = unit_max(pixels.dtype)
        wide = flat.astype(np.int64)  # exact integer sums
        return np.stack([wide.sum(0) / top, np.einsum("ij,ij->j", wide, wide) / (top * top)])
    wide = flat.astype(np.float64)
    return np.stack([wide.sum(0), np.einsum("ij,ij->j", wide, wide)])


def stats_from_sums(sums: np.ndarray, values_per_channel: int) -> tuple[list[float], list[float]]:
    """Mean and std per channel from per-image ``pixel_sums`` (N, 2, C), of the images' pixels in [0, 1] units;
    a constant channel gets std 1: dividing by ~0 would turn any unseen deviation at test time into a huge input."""
    total, squares = sums[:, 0].sum(0), sums[:, 1].sum(0)
    mean = total / values_per_channel
    std = np.sqrt(np.maximum(squares / values_per_channel - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def decode_file(path: str | shards.Member, settings: Settings, validated: Validated | None = None) -> Decoded:
    """Hash, decode, conform and describe one file or shard member (or copy it from ``validated`` when its
    bytes are there). A member's bytes are checked against its manifest's sha256 (``shards.ShardError``)."""
    member = path if isinstance(path, shards.Member) else None
    data: bytes | None
    if member:
        name, data, sha = member.path or member.member, shards.read(member), member.sha256  # sha256 checked
    else:
        name, data = str(path), _small_image(str(path))
        sha = _sha256(name, data)
    if validated is not None and (hit := validated.get(sha)) is not None:
        return hit
    window, budget = settings.dicom_window, settings.max_image_pixels
    try:
        found = (
            readers.read(Path(name), window, budget)
            if data is None
            else readers.read_bytes(data, name, window, budget)
        )
    except (readers.UnreadableImage, OSError) as err:
        return Decoded(sha, reason=str(err))  # readers.read says "empty file" for zero bytes
    bands = found.pixels.shape[-1]
    if settings.channels == "rgb" and bands not in (1, 3):
        return Decoded(sha, bands_error=bands)
    pixels = readers.conform(found, settings.image_size, settings.channels)
    return Decoded(
        sha,
        pixels=pixels,
        mode=found.mode,
        bits=found.bits,
        size=f"{found.pixels.shape[1]}x{found.pixels.shape[0]}",
        dhash=validation.dhash(pixels),
        sums=pixel_sums(pixels),
        dtype=str(pixels.dtype),
    )


def _sha256(path: str, data: bytes | None) -> str:
    if data is not None:
        return hashlib.sha256(data).hexdigest()
    return file_sha256(Path(path)) if os.path.isfile(path) else ""  # not a FIFO: it would be read forever


def _small_image(path: str) -> bytes | None:
    """The bytes of a regular Pillow-format file of at most ``READ_ONCE_BYTES`` (read once: hashed and decoded
    from memory), else None: ``readers.read`` opens the file itself (memory maps, budget checks before reading)."""
    if os.path.splitext(path)[1].lower() not in readers.PIL_SUFFIXES:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None  # readers.read says why
    if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= READ_ONCE_BYTES:
        return None
    with open(path, "rb") as f:
        return f.read()


_WORKER: dict = {}  # per worker process: the opened Validated store


def _init_worker(settings: Settings, store: str | None) -> None:
    _WORKER["settings"] = settings
    _WORKER["validated"] = Validated.open(Path(store), settings) if store else None


def _decode_chunk(paths: list[str | shards.Member]) -> list[Decoded]:
    return [decode_file(p, _WORKER["settings"], _WORKER["validated"]) for p in paths]


def workers() -> int:
    """Usable cores (the process's CPU affinity, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decode_all(
    paths: list[str] | list[shards.Member], settings: Settings, store: Path | None = None
) -> Iterator[Decoded]:
    """``decode_file`` of each path (or shard member), in order; in worker processes for large sets on several
    cores. The shard members that ``store`` holds (by their manifest's sha256) are taken from it here, their bytes
    checked as they are read: copying a stored image costs less than sending it back from a worker, so the ingest
    after intake starts no worker at all."""
    validated = (
        Validated.open(store, settings) if store and paths and isinstance(paths[0], shards.Member) else None
    )
    if validated is None:  # files (or no store): each decoder opens the store itself
        yield from _decode_each(paths, settings, store)
        return
    members = cast("list[shards.Member]", paths)  # a list is all members or all paths: the first said which
    held = [m.sha256 in validated.index for m in members]
    rest = _decode_each([m for m, h in zip(members, held, strict=True) if not h], settings, None)
    for member, h in zip(members, held, strict=True):
        yield decode_file(member, settings, validated) if h else next(rest)


def _decode_each(
    paths: list[str] | list[shards.Member], settings: Settings, store: Path | None
) -> Iterator[Decoded]:
    n_workers = workers()
    if len(paths) < PARALLEL_MIN_FILES or n_workers < 2:
        validated = Validated.open(store, settings) if store else None
        for path in paths:
            yield decode_file(path, settings, validated)
        return
    # spawn, not fork: the caller may hold threads (torch, a test runner) that a forked child would inherit
    # mid-lock. The workers import only numpy, OpenCV, Pillow and the readers.
    with ProcessPoolExecutor(
        n_workers,
        mp_context=get_context("spawn"),
        # typeshed's overloads tie initargs to initializer only without mp_context: checked by the call
        initializer=_init_worker,  # type: ignore[arg-type]
        initargs=(settings, store and str(store)),  # type: ignore[arg-type]
    ) as pool:
        pending: deque[Future] = deque()
        chunks = iter(_chunks(paths, CHUNK))
        for chunk in chunks:
            pending.append(pool.submit(_decode_chunk, chunk))
            if len(pending) >= n_workers * IN_FLIGHT:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class Validated:
    """Intake's decoded files, by sha256: pixels (memory-mapped), facts and the settings they were decoded with."""

    def __init__(self, index: dict[str, int], pixels: np.ndarray, facts: dict[str, np.ndarray]):
        self.index, self.pixels, self.facts = index, pixels, facts

    @classmethod
    def open(cls, folder: Path, settings: Settings) -> Validated | None:
        """The store in ``folder`` if it exists and was decoded with ``settings``; else None (decode all)."""
        try:
            meta = json.loads((folder / META).read_text())
        except (OSError, ValueError):
            return None
        if meta != json.loads(json.dumps(asdict(settings))):
            return None
        with np.load(folder / FACTS, allow_pickle=False) as npz:
            facts = {k: npz[k] for k in npz.files}
        index = {str(sha): i for i, sha in enumerate(facts["sha256"])}
        return cls(index, np.load(folder / PIXELS, mmap_mode="r"), facts)

    def get(self, sha: str) -> Decoded | None:
        i = self.index.get(sha)
        if i is None:
            return None
        f = self.facts
        pixels = _narrow(np.array(self.pixels[i]), np.dtype(str(f["dtype"][i])))
        return Decoded(
            sha,
            pixels=pixels,
            mode=str(f["mode"][i]),
            bits=int(f["bits"][i]),
            size=str(f["size"][i]),
            dhash=np.unpackbits(f["dhash"][i]) if f["has_dhash"][i] else None,
            sums=f["sums"][i],
            dtype=str(f["dtype"][i]),
            reused=True,
        )

    @staticmethod
    def keep(folder: Path, settings: Settings, cache_npy: Path, decoded: list[Decoded]) -> None:
        """Write the store: ``cache_npy`` (ingest's pixel cache, a row per ``decoded``, in order) hard-linked
        (copied across file systems), and the facts. Replaces what ``folder`` held."""
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        link_or_copy(cache_npy, folder / PIXELS)
        zero = np.zeros(validation.HASH_SIDE**2, np.uint8)
        np.savez(
            folder / FACTS,
            sha256=np.array([d.sha256 for d in decoded]),
            dtype=np.array([d.dtype for d in decoded]),
            mode=np.array([d.mode for d in decoded]),
            bits=np.array([d.bits for d in decoded]),
            size=np.array([d.size for d in decoded]),
            has_dhash=np.array([d.dhash is not None for d in decoded]),
            dhash=np.stack([np.packbits(zero if d.dhash is None else d.dhash) for d in decoded]),
            sums=np.stack([np.asarray(d.sums) for d in decoded]),
        )
        (folder / META).write_text(json.dumps(asdict(settings)))


def _narrow(pixels: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Undo ``cache.to_dtype``'s widening of one image exactly (uint8 -> uint16 is x 257, -> float32 is / max)."""
    if pixels.dtype == dtype:
        return pixels
    if pixels.dtype == np.uint16:
        return (pixels // 257).astype(dtype)
    return np.rint(pixels.astype(np.float64) * unit_max(dtype)).astype(dtype)
