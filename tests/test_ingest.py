import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data.ingest import CACHE_NPY, REPORT_JSON, SPLITS_CSV, DataError, ingest, load_prepared

ARGS = dict(image_size=24, val_fraction=0.25, test_fraction=0.25, seed=3, on_bad_file="skip")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


def test_ingest_writes_splits_report_and_cache(image_folder, tmp_path):
    report = ingest(image_folder, tmp_path / "out", **ARGS)
    table = pd.read_csv(tmp_path / "out" / SPLITS_CSV)
    assert {"path", "label", "split"} <= set(table.columns)
    assert report["n_images"] == len(table) == 24
    # stratified: every class in every split, 2/2/4 of 8
    counts = table.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 2).all() and (counts.loc["val"] == 2).all() and (counts.loc["train"] == 4).all()
    cache = np.load(tmp_path / "out" / CACHE_NPY)
    assert cache.shape == (24, 24, 24, 3) and cache.dtype == np.uint8
    assert json.loads((tmp_path / "out" / REPORT_JSON).read_text())["counts"]["train"]["alpha"] == 4


def test_splits_are_deterministic_and_seeded(image_folder, tmp_path):
    ingest(image_folder, tmp_path / "a", **ARGS)
    ingest(image_folder, tmp_path / "b", **ARGS)
    ingest(image_folder, tmp_path / "c", **(ARGS | {"seed": 4}))
    a, b, c = (pd.read_csv(tmp_path / d / SPLITS_CSV) for d in "abc")
    assert a.equals(b)
    assert not a["split"].equals(c["split"])


def test_bad_files_are_skipped_and_reported_and_source_untouched(image_folder, tmp_path):
    (image_folder / "alpha" / "empty.png").write_bytes(b"")
    (image_folder / "beta" / "garbage.jpg").write_bytes(b"not an image at all")
    (image_folder / "beta" / "notes.txt").write_text("scanner settings")
    before = tree_digest(image_folder)
    report = ingest(image_folder, tmp_path / "out", **ARGS)
    assert tree_digest(image_folder) == before
    rejected = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert rejected["empty.png"] == "empty file" and "garbage.jpg" in rejected
    assert report["ignored_non_images"] == 1 and report["n_images"] == 24


def test_fail_mode_names_the_file(image_folder, tmp_path):
    (image_folder / "alpha" / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="broken.png"):
        ingest(image_folder, tmp_path / "out", **(ARGS | {"on_bad_file": "fail"}))


def test_empty_and_tiny_classes_are_errors(image_folder, tmp_path):
    (image_folder / "delta").mkdir()
    with pytest.raises(DataError, match="'delta' has no image files"):
        ingest(image_folder, tmp_path / "out", **ARGS)
    for p in list((image_folder / "alpha").iterdir())[2:]:
        p.unlink()
    (image_folder / "delta").rmdir()
    with pytest.raises(DataError, match="'alpha' has 2 readable images"):
        ingest(image_folder, tmp_path / "out", **ARGS)


def test_a_failed_ingest_keeps_the_previous_outputs(image_folder, tmp_path):
    ingest(image_folder, tmp_path / "out", **ARGS)
    before = tree_digest(tmp_path / "out")
    (image_folder / "delta").mkdir()
    with pytest.raises(DataError):
        ingest(image_folder, tmp_path / "out", **ARGS)
    assert tree_digest(tmp_path / "out") == before


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    from PIL import Image
    for name in ("a", "b", "c"):
        (tmp_path / "raw" / name).mkdir(parents=True)
        for i in range(3):
            ramp = np.tile(np.linspace(0, 65535, 16, dtype=np.uint16), (16, 1))
            Image.fromarray(ramp).save(tmp_path / "raw" / name / f"{i}.png")
    ingest(tmp_path / "raw", tmp_path / "out", **(ARGS | {"image_size": 16}))
    cache = load_prepared(tmp_path / "out").images
    assert cache[0, 0, 0, 0] < 10 and cache[0, 0, -1, 0] > 245


def test_report_holds_the_train_split_normalization(image_folder, tmp_path):
    ingest(image_folder, tmp_path / "out", **ARGS)
    prepared = load_prepared(tmp_path / "out")
    train = prepared.images[prepared.split("train")["cache_index"].to_numpy()] / 255.0
    stats = json.loads((tmp_path / "out" / REPORT_JSON).read_text())["normalization"]
    np.testing.assert_allclose(stats["mean"], train.mean(axis=(0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(stats["std"], train.std(axis=(0, 1, 2)), atol=1e-5)
    assert prepared.mean == tuple(stats["mean"]) and prepared.std == tuple(stats["std"])
    everything = prepared.images / 255.0  # the train split alone, not the whole set
    assert not np.allclose(stats["mean"], everything.mean(axis=(0, 1, 2)), atol=1e-5)


def test_channel_stats_of_sixteen_bit_n_band_pixels():
    from pipeline.data.ingest import channel_stats
    pixels = np.zeros((5, 4, 4, 13), dtype=np.uint16)
    pixels[..., 1] = 65535
    pixels[:2, ..., 2] = 65535  # 2 of 5 images bright: mean 0.4, std sqrt(0.24)
    mean, std = channel_stats(pixels, chunk=2)
    assert mean[:3] == pytest.approx([0.0, 1.0, 0.4]) and std[2] == pytest.approx(0.24 ** 0.5)
    assert std[0] == std[1] == 1.0  # constant bands: no division by ~0
