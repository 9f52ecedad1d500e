"""The pixel cache (``images.npy``), written one image at a time so that ingest's memory stays bounded, and
read a row at a time (``Rows``) so that the stages after it stay bounded too.

The cache's dtype is the widest its images need (``cache_dtype``), which is known only after
the last file. Rather than read every file twice (once for its header), rows are appended in the
widest dtype seen so far; when a wider image arrives (a 16-bit file after 8-bit ones, a DICOM after
integers) the rows already written are converted into a new file, chunk by chunk. That is lossless
(``to_dtype`` maps uint8 -> uint16 -> float32 exactly, so converting twice equals converting once),
costs nothing on a set of one dtype and at most two sequential rewrites on a mixed one. The file is
appended to with plain writes rather than through a memory map, so written rows leave the process
instead of piling up as mapped pages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy

from pipeline.pixels import unit_range

# The augment stage's offline copies (augment.offline_copies), in its output folder paths.augment_offline.
OFFLINE_IMAGES = "images.npy"
OFFLINE_LABELS = "labels.npy"
CHUNK_BYTES = 1 << 20  # rows converted at a time when the file is rewritten


def cache_dtype(dtypes: set[np.dtype]) -> np.dtype:
    """The one dtype a set is cached in: the widest of its images (uint8 < uint16 < float32)."""
    for wide in (np.float32, np.uint16):
        if np.dtype(wide) in dtypes:
            return np.dtype(wide)
    return np.dtype(np.uint8)


def to_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Convert one image to the cache dtype, keeping its place in [0, 1] (uint8 255 -> uint16 65535 -> 1.0)."""
    if arr.dtype == dtype:
        return arr
    if dtype == np.float32:
        return unit_range(arr)
    return arr.astype(np.uint16) * 257  # uint8 -> uint16


class CacheWriter:
    """Append (H, W, C) images to an .npy file of ``capacity`` rows; ``finish`` trims it to the rows written."""

    def __init__(self, path: Path, capacity: int):
        self.path, self.capacity, self.n = path, capacity, 0
        self.dtype: np.dtype | None = None
        self.shape: tuple[int, ...] = ()
        self._file: BinaryIO | None = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def append(self, pixels: np.ndarray) -> None:
        if self._file is None or self.dtype is None:  # the first image: both are set together
            self.dtype, self.shape = pixels.dtype, pixels.shape
            self._file = self._open(self.path, self.dtype, self.capacity)
        wide = cache_dtype({self.dtype, pixels.dtype})
        if wide != self.dtype:
            self._rewrite(wide, self.capacity)
        self._file.write(np.ascontiguousarray(to_dtype(pixels, self.dtype)).tobytes())
        self.n += 1

    def finish(self) -> np.ndarray:
        """Close the file (rewritten to exactly the rows written) and return it memory-mapped."""
        if self._file is None or self.dtype is None:
            raise ValueError("no image was written to the cache")
        if self.n < self.capacity:  # files rejected while decoding left no row
            self._rewrite(self.dtype, self.n)
        self._file.close()
        return np.load(self.path, mmap_mode="r")

    def _open(self, path: Path, dtype: np.dtype, rows: int) -> BinaryIO:
        f = open(path, "wb")  # noqa: SIM115 -- stays open across add() calls; finish() or __exit__ closes it
        npy.write_array_header_1_0(
            f, {"descr": npy.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, *self.shape)}
        )
        return f

    def _rewrite(self, dtype: np.dtype, rows: int) -> None:
        """Copy the rows written so far into a new file of ``dtype`` and ``rows`` rows, converting in chunks."""
        assert self._file is not None and self.dtype is not None, "rewritten after the first append only"
        self._file.close()
        old = self.path.with_name(self.path.name + ".old")
        os.replace(self.path, old)
        # the header still claims ``capacity`` rows: map exactly the ones written
        written = np.memmap(
            old, dtype=self.dtype, mode="r", shape=(self.n, *self.shape), offset=self._offset(old)
        )
        self._file = self._open(self.path, dtype, rows)
        step = max(1, CHUNK_BYTES // max(1, written[:1].nbytes))
        for start in range(0, self.n, step):
            self._file.write(
                np.ascontiguousarray(to_dtype(np.asarray(written[start : start + step]), dtype)).tobytes()
            )
        del written
        old.unlink()
        self.dtype = dtype

    @staticmethod
    def _offset(path: Path) -> int:
        with open(path, "rb") as f:
            npy.read_magic(f)
            npy.read_array_header_1_0(f)
            return f.tell()


class Rows:
    """Rows of the memory-mapped pixel cache (and any arrays appended), read only when indexed.

    A split, or the train split plus its offline copies, without copying it into memory: what a stage
    holds stays a few batches whatever the set's size. The pages read stay in the OS page cache, shared
    by the loader workers and given back under memory pressure. Indexing takes an int (one image), or an
    array of positions or a slice (a stacked copy of those images only).
    """

    def __init__(self, images: np.ndarray, rows: np.ndarray | None = None, extra: np.ndarray | None = None):
        self.images = images
        self.rows = np.arange(len(images)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.extra = extra if extra is not None and len(extra) else None

    def __len__(self) -> int:
        return len(self.rows) + (0 if self.extra is None else len(self.extra))

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.images.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def __getitem__(self, i) -> np.ndarray:
        if isinstance(i, int | np.integer):
            i = int(i) + len(self) if i < 0 else int(i)
            if i < len(self.rows):
                return np.asarray(self.images[self.rows[i]])
            assert self.extra is not None, i  # past the cache's rows: an appended one
            return np.asarray(self.extra[i - len(self.rows)])
        positions = np.arange(len(self))[i]
        out = np.empty((len(positions), *self.images.shape[1:]), self.images.dtype)
        for k, position in enumerate(positions):
            out[k] = self[int(position)]
        return out

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self[:] if dtype is None else self[:].astype(dtype)


Images = np.ndarray | Rows  # (N, H, W, C) pixels: in memory, or rows of the cache read when indexed
