import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.data import decoding, readers
from pipeline.data.ingest import ingest
from pipeline.data.prepared import CACHE_NPY, REPORT_JSON, SPLITS_CSV, DataError, load_prepared

ARGS = dict(image_size=24, val_fraction=0.25, test_fraction=0.25, seed=3, on_bad_file="skip")


def decode(path: Path, size: int) -> np.ndarray:
    """One file as (size, size, 3) uint8 RGB, read apart from ingest's decoding pass."""
    pixels = readers.conform(readers.read(path), size, "rgb")
    if pixels.dtype == np.uint16:
        return (pixels / 257).round().astype(np.uint8)
    return (pixels * 255).round().astype(np.uint8) if pixels.dtype.kind == "f" else pixels


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
    assert (
        (counts.loc["test"] == 2).all()
        and (counts.loc["val"] == 2).all()
        and (counts.loc["train"] == 4).all()
    )
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
    with pytest.raises(DataError, match=r"broken.png"):
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


def test_sixteen_bit_images_keep_their_range(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (tmp_path / "raw" / name).mkdir(parents=True)
        for i in range(3):
            ramp = np.tile(np.linspace(0, 65000, 16), (16, 1)) + rng.integers(0, 500, (16, 16))
            ramp[:, 1:-1] = rng.integers(
                1000, 64000, (16, 14)
            )  # distinct images: one unit cannot fill 3 splits
            Image.fromarray(ramp.astype(np.uint16)).save(tmp_path / "raw" / name / f"{i}.png")
    ingest(tmp_path / "raw", tmp_path / "out", **(ARGS | {"image_size": 16}))
    cache = load_prepared(tmp_path / "out").images
    assert cache.dtype == np.uint16 and cache.shape[-1] == 3
    assert cache[:, :, 0].max() < 600 and cache[:, :, -1].min() > 64000
    assert (cache % 257 != 0).any()  # true 16-bit values, not 8-bit ones scaled up


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
    pixels = np.zeros((5, 4, 4, 13), dtype=np.uint16)
    pixels[..., 1] = 65535
    pixels[:2, ..., 2] = 65535  # 2 of 5 images bright: mean 0.4, std sqrt(0.24)
    sums = np.stack([decoding.pixel_sums(p) for p in pixels])
    mean, std = decoding.stats_from_sums(sums, 5 * 4 * 4)
    assert mean[:3] == pytest.approx([0.0, 1.0, 0.4]) and std[2] == pytest.approx(0.24**0.5)
    assert std[0] == std[1] == 1.0  # constant bands: no division by ~0


# --- validation, duplicates, manifests and splits -------------------------------------------------


def noise_png(path: Path, seed: int, size: int = 16, gray: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size) if gray else (size, size, 3)).astype(np.uint8)).save(
        path
    )
    return path


def manifest_set(root: Path, n_groups: int = 12, per_group: int = 3, split: bool = False) -> Path:
    """Two classes; ``per_group`` images per group (patient); every image distinct. Returns the manifest."""
    rows = []
    for g in range(n_groups):
        for i in range(per_group):
            label = "sick" if g % 2 else "well"
            name = f"imgs/p{g:02d}_{i}.png"
            noise_png(root / name, seed=100 * g + i)
            rows.append(
                {
                    "path": name,
                    "label": label,
                    "group": f"p{g:02d}",
                    "split": ("test", "val", "train", "train")[g % 4 if g > 1 else 2 + g],
                }
            )
    table = pd.DataFrame(rows)
    (table if split else table.drop(columns="split")).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def test_identical_files_under_two_labels_are_an_error_naming_both(image_folder, tmp_path):
    copy = image_folder / "beta" / "copy_of_alpha.png"
    copy.write_bytes((image_folder / "alpha" / "alpha_03.png").read_bytes())
    with pytest.raises(DataError, match=r"alpha_03\.png \(alpha\).*copy_of_alpha\.png \(beta\)"):
        ingest(image_folder, tmp_path / "out", **ARGS)


def test_exact_and_near_duplicates_are_reported_and_kept_in_one_split(image_folder, tmp_path):
    from PIL import Image

    original = image_folder / "alpha" / "alpha_00.png"
    (image_folder / "alpha" / "exact.png").write_bytes(original.read_bytes())
    brighter = np.clip(np.asarray(Image.open(original)).astype(int) + 6, 0, 255).astype(np.uint8)
    Image.fromarray(brighter).save(image_folder / "alpha" / "near.png")
    report = ingest(image_folder, tmp_path / "out", **ARGS)
    assert report["duplicates"]["n_exact_sets"] == 1 and report["duplicates"]["n_near_sets"] >= 1
    assert {Path(p).name for p in report["duplicates"]["exact"][0]} == {"alpha_00.png", "exact.png"}
    near_names = {Path(p).name for paths in report["duplicates"]["near"] for p in paths}
    assert "near.png" in near_names
    table = pd.read_csv(tmp_path / "out" / SPLITS_CSV)
    by_name = {Path(p).name: s for p, s in zip(table["path"], table["split"], strict=True)}
    assert by_name["alpha_00.png"] == by_name["exact.png"] == by_name["near.png"]
    assert report["split_by"] == "grouped"
    assert table["sha256"].str.len().eq(64).all()


def test_near_duplicate_check_can_be_turned_off(image_folder, tmp_path):
    from PIL import Image

    original = np.asarray(Image.open(image_folder / "alpha" / "alpha_00.png")).astype(int)
    Image.fromarray(np.clip(original + 6, 0, 255).astype(np.uint8)).save(image_folder / "alpha" / "near.png")
    report = ingest(image_folder, tmp_path / "out", **(ARGS | {"near_duplicate_bits": None}))
    assert report["duplicates"]["n_near_sets"] == 0 and report["split_by"] == "stratified"
    assert report["groups"] == 0  # no group column: patient-level separation unchecked (the report says so)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_a_group_never_spans_two_splits_and_labels_stay_balanced(tmp_path, seed):
    manifest = manifest_set(tmp_path / "src", n_groups=20, per_group=3)
    report = ingest(manifest.parent, tmp_path / "out", **(ARGS | {"seed": seed}))
    table = pd.read_csv(tmp_path / "out" / SPLITS_CSV)
    assert report["split_by"] == "grouped" and report["groups"] == 20  # the report says groups were kept
    assert (table.groupby("group")["split"].nunique() == 1).all()
    for split, share in (("train", 0.5), ("val", 0.25), ("test", 0.25)):
        part = table[table["split"] == split]
        assert abs(len(part) / len(table) - share) <= 0.1
        assert set(part["label"]) == {"sick", "well"}


def test_a_manifest_split_column_is_honoured_exactly(tmp_path):
    manifest = manifest_set(tmp_path / "src", split=True)
    given = pd.read_csv(manifest).set_index("path")["split"]
    report = ingest(manifest.parent, tmp_path / "out", **ARGS)
    table = pd.read_csv(tmp_path / "out" / SPLITS_CSV)
    got = {
        str(Path(p).relative_to(manifest.parent)): s
        for p, s in zip(table["path"], table["split"], strict=True)
    }
    assert got == given.to_dict() and report["split_by"] == "manifest"


def test_duplicates_across_a_predefined_split_are_leakage(tmp_path):
    manifest = manifest_set(tmp_path / "src", split=True)
    table = pd.read_csv(manifest)
    test_row = table[table["split"] == "test"].iloc[0]
    (manifest.parent / "imgs" / "leak.png").write_bytes((manifest.parent / test_row["path"]).read_bytes())
    extra = {"path": "imgs/leak.png", "label": test_row["label"], "group": "other", "split": "train"}
    pd.concat([table, pd.DataFrame([extra])]).to_csv(manifest, index=False)
    with pytest.raises(DataError, match=rf"leakage.*{test_row['path']} \(test\).*leak\.png \(train\)"):
        ingest(manifest.parent, tmp_path / "out", **ARGS)
    report = ingest(manifest.parent, tmp_path / "out", **(ARGS | {"on_leakage": "warn"}))
    assert len(report["leakage"]) == 1 and any("leakage" in w for w in report["warnings"])


def test_k_folds_are_grouped_stratified_and_skip_test(tmp_path):
    manifest = manifest_set(tmp_path / "src", n_groups=24, per_group=2)
    ingest(manifest.parent, tmp_path / "out", **(ARGS | {"folds": 3}))
    table = pd.read_csv(tmp_path / "out" / SPLITS_CSV)
    assert (table.loc[table["split"] == "test", "fold"] == -1).all()
    pool = table[table["split"] != "test"]
    assert set(pool["fold"]) == {0, 1, 2}
    assert (pool.groupby("group")["fold"].nunique() == 1).all()
    assert (pool.groupby("fold")["label"].nunique() == 2).all()


def test_a_small_class_is_a_warning(image_folder, tmp_path):
    report = ingest(image_folder, tmp_path / "out", **(ARGS | {"min_images_per_class": 9}))
    assert sum("only 8 images" in w for w in report["warnings"]) == 3
    assert ingest(image_folder, tmp_path / "out", **(ARGS | {"min_images_per_class": 8}))["warnings"] == []


def test_channel_policy_sets_the_cache_channels(tmp_path):
    for k, label in enumerate(("a", "b", "c")):
        for i in range(3):
            noise_png(tmp_path / "raw" / label / f"{i}.png", seed=10 * k + i, gray=True)
    assert ingest(tmp_path / "raw", tmp_path / "rgb", **ARGS)["cache"]["channels"] == 3
    report = ingest(tmp_path / "raw", tmp_path / "keep", **(ARGS | {"channels": "keep"}))
    assert report["cache"]["channels"] == 1 and load_prepared(tmp_path / "keep").images.shape[-1] == 1
    noise_png(tmp_path / "raw" / "a" / "color.png", seed=999)
    with pytest.raises(DataError, match="different band counts"):
        ingest(tmp_path / "raw", tmp_path / "keep", **(ARGS | {"channels": "keep"}))


def test_dicom_sets_are_cached_as_floats_in_unit_range(tmp_path):
    from tests.test_readers import write_dicom

    for k, label in enumerate(("a", "b", "c")):
        (tmp_path / "raw" / label).mkdir(parents=True)
        for i in range(3):
            stored = np.random.default_rng(10 * k + i).integers(0, 4000, (16, 16))
            write_dicom(tmp_path / "raw" / label / f"{i}.dcm", stored, slope=1.0, intercept=-1024.0)
    report = ingest(tmp_path / "raw", tmp_path / "out", **ARGS)
    cache = load_prepared(tmp_path / "out").images
    assert cache.dtype == np.float32 and cache.min() >= 0.0 and cache.max() <= 1.0
    assert report["formats"]["mode"] == {"DICOM MONOCHROME2": 9}
    text = json.dumps(report)
    assert "Doe" not in text and "P-0001" not in text  # identifying tags never reach the report


# --- streaming: bounded memory, progress ----------------------------------------------------------


def test_ingest_streams_the_cache_in_bounded_memory(tmp_path):
    """150 images of 128 px make a 7.4 MB cache; ingest's traced peak stays under 3 MB.

    The in-memory ingest this replaced (every image in a list, then np.stack, then float64 statistics)
    peaked at 80 MB on this very set, the streaming one at 1.2 MB: the bound fails for anything that
    holds the cache, or a float copy of it, in memory.
    """
    import tracemalloc

    for k, label in enumerate(("a", "b", "c")):
        for i in range(50):
            noise_png(tmp_path / "raw" / label / f"{i}.png", seed=1000 * k + i)
    ingest(tmp_path / "raw", tmp_path / "warm", **(ARGS | {"image_size": 16}))  # lazy imports, caches
    tracemalloc.start()
    try:
        report = ingest(tmp_path / "raw", tmp_path / "out", **(ARGS | {"image_size": 128}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    cache = np.load(tmp_path / "out" / CACHE_NPY, mmap_mode="r")
    assert cache.shape == (150, 128, 128, 3) and report["n_images"] == 150
    assert cache.nbytes > 7e6 and peak < 3e6, f"peak {peak / 1e6:.1f} MB"


def test_progress_is_logged_without_a_terminal(image_folder, tmp_path, monkeypatch, caplog):
    import pipeline.data.progress as module

    monkeypatch.setattr(module, "PROGRESS_LOG_S", 0.0)
    with caplog.at_level("INFO", logger="pipeline.data.progress"):
        ingest(image_folder, tmp_path / "out", **ARGS)
    lines = [r.getMessage() for r in caplog.records if "images read" in r.getMessage()]
    assert len(lines) == 24 and lines[-1].startswith("ingest: 23/24 images read")


def test_identifying_dicom_tags_reach_no_output(tmp_path, caplog):
    """Names, IDs, dates, addresses and institutions in the tags: not in the cache, splits.csv, report, card,
    log lines or error messages (a truncated file makes pydicom's own error message part of them)."""
    from pipeline.data.card import summary
    from tests.test_readers import IDENTIFYING, write_dicom

    for k, label in enumerate(("a", "b", "c")):
        (tmp_path / "raw" / label).mkdir(parents=True)
        for i in range(3):
            stored = np.random.default_rng(10 * k + i).integers(0, 4000, (16, 16))
            write_dicom(tmp_path / "raw" / label / f"{i}.dcm", stored, slope=1.0, intercept=0.0)
    broken = tmp_path / "raw" / "a" / "broken.dcm"
    write_dicom(broken, np.ones((16, 16)), slope=1.0, intercept=0.0)
    broken.write_bytes(broken.read_bytes()[:-100])
    with caplog.at_level("INFO"):
        report = ingest(tmp_path / "raw", tmp_path / "out", **(ARGS | {"folds": 2}))
    with pytest.raises(DataError) as failed:
        ingest(tmp_path / "raw", tmp_path / "failed", **(ARGS | {"on_bad_file": "fail"}))
    outputs = b"".join(p.read_bytes() for p in sorted((tmp_path / "out").iterdir()))
    texts = "\n".join([json.dumps(report), summary(report), caplog.text, str(failed.value)])
    assert report["n_images"] == 9 and "pixel data" in report["rejected"][0]["reason"] and "broken" in texts
    assert {CACHE_NPY, SPLITS_CSV, REPORT_JSON} == {p.name for p in (tmp_path / "out").iterdir()}
    for value in IDENTIFYING.values():
        for part in [value, *value.split("^")]:
            assert part.encode() not in outputs and part not in texts, part


def test_label_conflicts_can_be_dropped_and_are_listed(image_folder, tmp_path):
    """data.on_label_conflict: drop keeps a published split usable: every copy is left out, and listed."""
    copy = image_folder / "beta" / "copy_of_alpha.png"
    copy.write_bytes((image_folder / "alpha" / "alpha_03.png").read_bytes())
    with pytest.raises(DataError, match="on_label_conflict: drop"):
        ingest(image_folder, tmp_path / "out", seed=0)
    report = ingest(image_folder, tmp_path / "out", seed=0, on_label_conflict="drop")
    assert report["label_conflicts"] == [
        {"paths": [str(image_folder / "alpha" / "alpha_03.png"), str(copy)], "labels": ["alpha", "beta"]}
    ]
    assert report["n_images"] == 23 and any("left out" in w for w in report["warnings"])
    prepared = load_prepared(tmp_path / "out")
    assert str(copy) not in set(prepared.table["path"]) and len(prepared.table) == 23
    rows = prepared.table.set_index("path")
    kept = image_folder / "beta" / "beta_00.png"  # cache rows still line up after the rows left out
    assert (prepared.images[rows.loc[str(kept), "cache_index"]] == decode(kept, 32)).all()  # auto: own size
    from pipeline.data.card import summary

    assert "copy_of_alpha.png (beta) (identical files under different labels)" in summary(report)


def test_a_one_class_set_is_refused(tmp_path):
    src = tmp_path / "one"
    for i in range(6):
        noise_png(src / "only" / f"{i}.png", seed=i)
    with pytest.raises(DataError, match="only one class"):
        ingest(src, tmp_path / "out", seed=0)
    manifest = manifest_set(tmp_path / "listed", n_groups=8, per_group=2)
    table = pd.read_csv(manifest)
    table["split"] = np.where(table["label"] == "sick", "test", "train")  # train holds one class only
    table.loc[table.index[-2:], "split"] = "val"
    table.to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"train split holds images of 1 class"):
        ingest(manifest.parent, tmp_path / "out", seed=0, on_leakage="warn")


def test_excluded_files_are_left_out_listed_and_untouched(image_folder, tmp_path):
    from pipeline.data.card import summary

    dropped = [image_folder / "alpha" / "alpha_00.png", image_folder / "beta" / "beta_03.png"]
    (tmp_path / "exclude.csv").write_text(
        "path,given,score\n"  # the label audit's columns: only path counts
        f"{dropped[0]},alpha,0.1\nbeta/beta_03.png,beta,0.2\nnot/there.png,x,0\n"
    )
    before = tree_digest(image_folder)
    report = ingest(image_folder, tmp_path / "out", **ARGS, exclude=str(tmp_path / "exclude.csv"))
    table = pd.read_csv(tmp_path / "out" / "splits.csv")
    assert report["n_images"] == 22 and not set(map(str, dropped)) & set(table["path"])
    assert sorted(report["excluded"]["paths"]) == sorted(map(str, dropped)) and report["excluded"]["n"] == 2
    assert any("not/there.png" in w for w in report["warnings"])
    assert "excluded    2 files" in summary(report) and tree_digest(image_folder) == before
    (tmp_path / "bad.csv").write_text("file\nx.png\n")
    with pytest.raises(DataError, match=r"data.exclude.*'path' column"):
        ingest(image_folder, tmp_path / "out2", **ARGS, exclude=str(tmp_path / "bad.csv"))


def test_groups_too_few_to_fill_val_and_test_are_refused_naming_them(tmp_path):
    # Two patients (one per class): a grouped split cannot fill three splits, and train would stop much later
    # on "split 'val' is empty".
    manifest = manifest_set(tmp_path / "src", n_groups=2, per_group=3)
    with pytest.raises(
        DataError, match=r"would hold no image.*only 2 unit\(s\).*group p00: 3 image\(s\)"
    ) as err:
        ingest(manifest.parent, tmp_path / "out", **ARGS)
    assert "group p01" in str(err.value) and not (tmp_path / "out").exists()


def test_a_split_column_without_val_is_refused(tmp_path):
    manifest = manifest_set(tmp_path / "src", n_groups=8, per_group=2, split=True)
    table = pd.read_csv(manifest)
    table.loc[table["split"] == "val", "split"] = "train"
    table.to_csv(manifest, index=False)
    with pytest.raises(DataError, match=r"split 'val' would hold no image \(the manifest's split column\)"):
        ingest(manifest.parent, tmp_path / "out", **ARGS)


def test_more_folds_than_groups_is_refused(tmp_path):
    manifest = manifest_set(tmp_path / "src", n_groups=6, per_group=2)
    with pytest.raises(DataError, match=r"fold '\d' would hold no image.*group p"):
        ingest(manifest.parent, tmp_path / "out", **(ARGS | {"folds": 5}))


def test_class_names_differing_only_in_case_are_refused_naming_both(image_folder, tmp_path):
    (image_folder / "alpha").rename(image_folder / "Beta")
    with pytest.raises(DataError, match=r"classes 'Beta' and 'beta' differ only in case"):
        ingest(image_folder, tmp_path / "out", **ARGS)


def test_a_png_whose_text_chunk_pillow_refuses_to_inflate_is_skipped_as_unreadable(image_folder, tmp_path):
    from PIL import Image, PngImagePlugin

    text = PngImagePlugin.PngInfo()  # 2 MB of text in a few compressed bytes: over Pillow's MAX_TEXT_CHUNK
    text.add_text("comment", "a" * (2 << 20), zip=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_folder / "alpha" / "text.png", pnginfo=text)
    report = ingest(image_folder, tmp_path / "out", **ARGS)
    rejected = {Path(r["path"]).name: r["reason"] for r in report["rejected"]}
    assert "MAX_TEXT_CHUNK" in rejected["text.png"] and report["n_images"] == 24
