"""The indexed near-duplicate search finds exactly the sets of the exhaustive one, in linear memory."""

import tracemalloc

import numpy as np
import pytest

from pipeline.data import validation


def planted(n: int, seed: int) -> list[np.ndarray | None]:
    """Random 256-bit hashes with near copies planted at 0..14 bits (around the 10-bit threshold), a few None."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, (n, 256), dtype=np.uint8)
    for source, copy in rng.integers(0, n, (n // 10, 2)):
        bits[copy] = bits[source]
        bits[copy, rng.choice(256, rng.integers(0, 15), replace=False)] ^= 1
    bits[: n // 20] = bits[0]  # one large group of identical hashes
    hashes = list(bits)
    for i in rng.integers(0, n, 5):
        hashes[i] = None  # flat images: no hash
    return hashes


@pytest.mark.parametrize("max_distance", [0, 3, 10, 15, 20])
def test_indexed_sets_equal_the_components_of_the_exhaustive_pairs(max_distance):
    hashes = planted(1000, seed=max_distance)
    sets = validation.near_groups(hashes, max_distance, chunk=97)  # small chunks: the chunking is exercised
    pairs = validation.near_pairs_exhaustive(hashes, max_distance)
    assert np.array_equal(sets, validation.components(len(hashes), [(a, b) for a, b, _ in pairs]))
    assert len(pairs) > 50 * 49 / 2  # the planted pairs are there (the identical group alone is 1,225)
    assert np.bincount(sets).max() >= 50 and len(set(sets)) < len(hashes) - 50


def test_near_identical_frames_cost_linear_memory():
    """3,000 frames a few bits apart (a video, consecutive slices) and 20,000 copies of one hash: one set
    each, found without the N^2/2 candidate pairs (10,000 copies took 21 GB when pairs were collected)."""
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 2, 256, dtype=np.uint8)
    frames = np.repeat(frame[None], 3000, axis=0)
    for row in frames:
        row[rng.choice(256, 3, replace=False)] ^= 1
    tracemalloc.start()
    sets = validation.near_groups(list(frames) + [frame] * 20000, 10)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (sets == 0).all()
    assert peak < 200e6  # pairs alone would be 23,000^2 / 2 x 24 bytes = 6 GB


def test_fast_gray_and_pixel_sums_equal_numpy_s_bit_for_bit():
    from pipeline.data.decoding import pixel_sums

    rng = np.random.default_rng(0)
    for dtype, shape in (
        (np.uint8, (64, 64, 3)),
        (np.uint16, (9, 7, 3)),
        (np.uint8, (5, 5, 1)),
        (np.uint16, (4, 6, 5)),
    ):
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
        assert validation._gray(pixels).tobytes() == pixels.astype(np.float32).mean(axis=-1).tobytes()
        wide, top = pixels.reshape(-1, shape[-1]).astype(np.int64), float(np.iinfo(dtype).max)
        expected = np.stack([wide.sum(0) / top, (wide * wide).sum(0) / (top * top)])
        assert pixel_sums(pixels).tobytes() == expected.tobytes()
