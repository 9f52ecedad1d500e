"""The streamed pixel cache: rows widened to the set's dtype and trimmed to the rows written, losslessly."""

import numpy as np
import pytest

from pipeline.data import cache as cache_module
from pipeline.data.cache import CacheWriter, cache_dtype, to_dtype


def test_cache_dtype_is_the_widest_and_keeps_unit_positions():
    assert cache_dtype({np.dtype(np.uint8), np.dtype(np.uint16)}) == np.uint16
    assert cache_dtype({np.dtype(np.uint8), np.dtype(np.float32)}) == np.float32
    assert to_dtype(np.array([255], np.uint8), np.dtype(np.uint16))[0] == 65535
    assert to_dtype(np.array([65535], np.uint16), np.dtype(np.float32))[0] == 1.0


def test_rows_are_widened_and_trimmed_like_a_stack_of_the_widest_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_BYTES", 100)  # several chunks per rewrite
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (4, 4, 3)).astype(np.uint8) for _ in range(5)]
    rows += [rng.integers(0, 65536, (4, 4, 3)).astype(np.uint16) for _ in range(2)]
    rows += [rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)]
    with CacheWriter(tmp_path / "c.npy", capacity=12) as writer:  # 4 rows never come (rejected files)
        for row in rows[:7]:
            writer.append(row)
        assert writer.dtype == np.uint16
        writer.append(rows[7])
        widened = writer.finish()
    expected = np.stack([to_dtype(r, np.dtype(np.uint16)) for r in rows])
    assert widened.dtype == np.uint16 and np.array_equal(np.load(tmp_path / "c.npy"), expected)

    floats = [*rows, rng.random((4, 4, 3)).astype(np.float32)]
    with CacheWriter(tmp_path / "f.npy", capacity=len(floats)) as writer:
        for row in floats:
            writer.append(row)
        writer.finish()
    wide = cache_dtype({r.dtype for r in floats})
    assert np.array_equal(np.load(tmp_path / "f.npy"), np.stack([to_dtype(r, wide) for r in floats]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npy", "f.npy"]  # no .old file left


def test_an_empty_cache_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no image"), CacheWriter(tmp_path / "c.npy", capacity=3) as writer:
        writer.finish()


def test_stages_read_a_few_thousand_images_in_bounded_memory(tmp_path):
    """Training items, TTA predictions' input and offline copies read the cache a row at a time: Python's peak
    allocation stays a small fraction of the split (2,000 images, 6 MB as uint8, 25 MB as float)."""
    import tracemalloc

    from pipeline import augment
    from pipeline.data.cache import Rows
    from pipeline.data.datamodule import CachedImageDataset

    n = 2000
    pixels = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    del pixels
    cache = np.load(tmp_path / "images.npy", mmap_mode="r")
    rows = np.arange(n)[::-1].copy()  # not in file order
    pipeline = augment.build([{"name": "HorizontalFlip", "p": 0.5}], seed=0)
    tracemalloc.start()
    try:
        dataset = CachedImageDataset(Rows(cache, rows), np.zeros(n), pipeline)
        total = sum(int(dataset[i][0].sum()) for i in range(0, n, 13))
        written = augment.write_offline_copies(
            pipeline, Rows(cache, rows), np.zeros(n), 1, tmp_path / "copies.npy", tmp_path / "labels.npy"
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    copies = np.load(tmp_path / "copies.npy", mmap_mode="r")
    assert written == n and copies.shape == (n, 32, 32, 3) and total > 0
    assert peak < 2e6, f"peak {peak / 1e6:.1f} MB"
    assert np.array_equal(Rows(cache, rows)[[3, 1]], cache[[n - 4, n - 2]])
