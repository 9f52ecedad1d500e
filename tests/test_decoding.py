"""One decode per file per pass; intake's decodes reused where the bytes are unchanged; large sets on every core."""

import filecmp

import numpy as np
import pytest

from pipeline.data import decoding, readers
from pipeline.data.ingest import CACHE_NPY, REPORT_JSON, SPLITS_CSV, ingest
from pipeline.pixels import unit_max

ARGS = dict(image_size=24, val_fraction=0.25, test_fraction=0.25, seed=3, on_bad_file="skip")


@pytest.fixture
def counted(monkeypatch):
    """readers.read and read_bytes (a small file is read once, then decoded from memory), counting the files
    they decode."""
    calls: list[str] = []
    real, real_bytes = readers.read, readers.read_bytes

    def read(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    def read_bytes(data, name, *args, **kwargs):
        calls.append(str(name))
        return real_bytes(data, name, *args, **kwargs)

    monkeypatch.setattr(readers, "read", read)
    monkeypatch.setattr(readers, "read_bytes", read_bytes)
    return calls


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (N, H, W, C) pixels in [0, 1] units, from the pixels themselves (what ingest
    computed by reading the cache back before its decoding pass kept per-image sums)."""
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / unit_max(images.dtype)
    mean = x.sum(0) / len(x)
    std = np.sqrt(np.maximum((x * x).sum(0) / len(x) - mean**2, 0.0))
    std = np.where(std > 1e-6, std, 1.0)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def same_outputs(a, b) -> bool:
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in (CACHE_NPY, SPLITS_CSV)) and (
        (a / REPORT_JSON).read_text().replace(str(a), "") == (b / REPORT_JSON).read_text().replace(str(b), "")
    )


def test_ingest_reuses_what_intake_decoded_where_the_bytes_are_unchanged(image_folder, tmp_path, counted):
    ingest(image_folder, tmp_path / "validation", keep=tmp_path / "validated", **ARGS)
    assert len(counted) == len(set(counted)) == 24  # one decode per file
    counted.clear()
    ingest(image_folder, tmp_path / "reused", reuse=tmp_path / "validated", **ARGS)
    assert counted == []  # every file taken from the store
    ingest(image_folder, tmp_path / "fresh", **ARGS)
    assert same_outputs(tmp_path / "reused", tmp_path / "fresh")
    counted.clear()

    changed = sorted((image_folder / "alpha").iterdir())[0]
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(changed)
    ingest(image_folder, tmp_path / "after", reuse=tmp_path / "validated", **ARGS)
    assert counted == [str(changed)]  # only the changed file is decoded again

    counted.clear()
    ingest(image_folder, tmp_path / "resized", reuse=tmp_path / "validated", **(ARGS | {"image_size": 16}))
    assert len(counted) == 24  # other settings: the store does not apply


def test_worker_processes_give_the_serial_pass_s_outputs(image_folder, tmp_path, monkeypatch):
    ingest(image_folder, tmp_path / "serial", **ARGS)
    monkeypatch.setattr(decoding, "PARALLEL_MIN_FILES", 0)
    monkeypatch.setattr(decoding, "CHUNK", 5)
    monkeypatch.setattr(decoding, "workers", lambda: 2)
    ingest(image_folder, tmp_path / "parallel", **ARGS)
    assert same_outputs(tmp_path / "serial", tmp_path / "parallel")


def test_statistics_from_the_pass_equal_those_of_the_cache():
    rng = np.random.default_rng(1)
    for pixels in (
        rng.integers(0, 256, (7, 9, 9, 3), dtype=np.uint8),
        rng.integers(0, 65536, (7, 9, 9, 5), dtype=np.uint16),
        rng.random((7, 9, 9, 1), dtype=np.float32),
    ):
        sums = np.stack([decoding.pixel_sums(p) for p in pixels])
        assert decoding.stats_from_sums(sums, 7 * 81) == channel_stats(pixels)
