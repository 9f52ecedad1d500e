"""The unlabelled pool: intake --unlabelled, the pool stage's leakage control, and its reader for training."""

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import config
from pipeline.__main__ import main as cli
from pipeline.data.datamodule import UnlabelledDataset
from pipeline.data.ingest import ingest
from pipeline.data.intake import group_hash
from pipeline.data.pool import CACHE_NPY, prepare_pool
from pipeline.data.pooled import EXCLUDED, KEPT, POOL_CSV, UNREADABLE, load_pool, pool_selected
from pipeline.data.prepared import SPLITS_CSV, DataError
from tests.conftest import write_class_folders
from tests.test_ingest import tree_digest
from tests.test_intake import repo  # noqa: F401  (the fixture: a git + DVC repository as the cwd)

REPO = Path(__file__).resolve().parents[1]
DATA = config.Data(image_size=16, val_fraction=0.25, test_fraction=0.25)


def write_images(root: Path, names: list[str], seed: int = 1, size: int = 16) -> list[Path]:
    """Random RGB PNGs at ``names`` (paths under ``root``, subfolders made)."""
    rng, paths = np.random.default_rng(seed), []
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8)).save(root / name)
        paths.append(root / name)
    return paths


def error_line(capsys) -> str:
    """The one ``error:`` line the CLI printed (warnings about skipped files may come before it)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- intake --unlabelled ----------------------------------------------------------------------------------


def test_intake_of_a_nested_folder_copies_versions_and_selects_it(repo, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "scans"
    write_images(src, ["a.png", "ward1/b.png", "ward1/day2/c.png", "ward2/d.jpg"])
    (src / "ward1" / "notes.txt").write_text("not an image")
    before = tree_digest(src)
    assert cli(["intake", str(src), "--unlabelled", "--name", "spare"]) == 0
    assert tree_digest(src) == before
    target = repo / "data" / "unlabelled" / "spare"
    found = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert found == ["a.png", "ward1/b.png", "ward1/day2/c.png", "ward2/d.jpg"]
    assert (repo / "data" / "unlabelled" / "spare.dvc").is_file()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["unlabelled"] == "spare" and params["data"]["dataset"] == "demo"
    out = capsys.readouterr().out
    assert "unlabelled pool spare: 4 image files, 4 kept" in out and "1 non-image files ignored" in out
    assert "git add data/unlabelled/spare.dvc data/unlabelled/.gitignore params.yaml && dvc repro" in out


def test_intake_of_a_csv_keeps_paths_and_hashes_groups(repo, tmp_path, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("PIPELINE_GROUP_SALT", "s1")
    src = tmp_path / "export"
    write_images(src, ["x/1.png", "x/2.png", "y/3.png", "y/unlisted.png"])
    (src / "list.csv").write_text("path,group\nx/1.png,P-1\nx/2.png,P-1\ny/3.png,P-2\n")
    before = tree_digest(src)
    assert cli(["intake", str(src / "list.csv"), "--unlabelled", "--name", "listed"]) == 0
    assert tree_digest(src) == before
    target = repo / "data" / "unlabelled" / "listed"
    stored = pd.read_csv(target / "manifest.csv", dtype=str)
    assert list(stored["path"]) == ["x/1.png", "x/2.png", "y/3.png"]
    assert list(stored["group"]) == [group_hash(g, "s1") for g in ("P-1", "P-1", "P-2")]
    assert not (target / "y" / "unlisted.png").exists()
    assert b"P-1" not in (target / "manifest.csv").read_bytes()
    assert "groups      2 in the pool" in capsys.readouterr().out


def test_intake_of_a_pool_as_shards_and_the_pool_stage_reads_them(repo, tmp_path, capsys, caplog):  # noqa: F811
    src = tmp_path / "many"
    write_images(src, [f"s{i % 2}/{i}.png" for i in range(6)])
    assert cli(["intake", str(src), "--unlabelled", "--name", "many", "--layout", "shards"]) == 0
    target = repo / "data" / "unlabelled" / "many"
    manifest = pd.read_csv(target / "shards.csv")
    assert "label" not in manifest and len(manifest) == 6
    assert (target / "shards.dvc").is_file()
    labelled = write_class_folders(tmp_path / "labelled", per_class=4, size=16)
    ingest(labelled, repo / "data" / "prepared", seed=0, data=DATA)
    capsys.readouterr()
    with caplog.at_level("INFO", logger="pipeline"):
        assert cli(["pool"]) == 0
    assert "pool: 6 of 6 images taken from intake's validation pass" in caplog.text  # not decoded again
    pool = load_pool(repo / "data" / "pool")
    assert len(pool) == 6 and pool.images.shape[1:] == (16, 16, 3)
    assert set(pool.kept()["path"]) == {str(Path("data/unlabelled/many") / p) for p in manifest["path"]}


@pytest.mark.parametrize(
    ("csv", "named"),
    [
        ("name,group\na.png,1\n", "no 'path' column"),
        ("path,label\na.png,cat\n", "a pool takes no labels"),
        ("path\n", "only a header row"),
        ("path\nmissing.png\n", "listed files not found"),
    ],
)
def test_a_bad_csv_is_one_error_line_naming_it(repo, tmp_path, capsys, csv, named):  # noqa: F811
    write_images(tmp_path / "src", ["a.png"])
    (tmp_path / "src" / "list.csv").write_text(csv)
    assert cli(["intake", str(tmp_path / "src" / "list.csv"), "--unlabelled", "--name", "p"]) == 2
    line = error_line(capsys)
    assert "list.csv" in line and named in line
    assert not (repo / "data" / "unlabelled" / "p").exists()


def test_an_empty_pool_and_a_link_out_of_it_are_refused(repo, tmp_path, capsys):  # noqa: F811
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images")
    assert cli(["intake", str(tmp_path / "empty"), "--unlabelled"]) == 2
    assert "no image files" in error_line(capsys)
    src = tmp_path / "linked"
    write_images(src, ["a.png"])
    write_images(tmp_path / "outside", ["secret.png"])
    (src / "b.png").symlink_to(tmp_path / "outside" / "secret.png")
    assert cli(["intake", str(src), "--unlabelled"]) == 2
    line = error_line(capsys)
    assert "b.png" in line and "outside the source folder" in line
    assert not (repo / "data" / "unlabelled" / "linked").exists()


def test_unreadable_files_fifos_and_oversized_images_are_skipped_and_listed(
    repo,  # noqa: F811
    tmp_path,
    capsys,
):
    src = tmp_path / "mixed"
    write_images(src, ["ok1.png", "ok2.png"])
    write_images(src, ["big.png"], size=40)
    (src / "broken.png").write_bytes(b"not a png")
    os.mkfifo(src / "pipe.png")
    params = (
        (repo / "params.yaml").read_text().replace("max_image_pixels: 100000000", "max_image_pixels: 1000")
    )
    (repo / "params.yaml").write_text(params)
    assert cli(["intake", str(src), "--unlabelled"]) == 0
    out = capsys.readouterr().out
    assert "5 image files, 2 kept (3 unreadable skipped" in out
    for name, why in (("broken.png", "unreadable"), ("pipe.png", "FIFO"), ("big.png", "pixel")):
        assert any(name in line and why.lower() in line.lower() for line in out.splitlines()), name
    assert not (repo / "data" / "unlabelled" / "mixed" / "pipe.png").exists()


def test_a_failed_intake_keeps_the_previous_pool(repo, tmp_path, capsys):  # noqa: F811
    src = tmp_path / "good"
    write_images(src, ["a.png", "b.png"])
    assert cli(["intake", str(src), "--unlabelled", "--name", "spare"]) == 0
    target = repo / "data" / "unlabelled" / "spare"
    before, params_before = tree_digest(target), (repo / "params.yaml").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"garbage")
    (bad / "y.png").write_bytes(b"")
    capsys.readouterr()
    assert cli(["intake", str(bad), "--unlabelled", "--name", "spare"]) == 2
    line = error_line(capsys)
    assert "not taken in" in line and str(bad) in line and "none of its 2 image files is readable" in line
    assert tree_digest(target) == before and (repo / "params.yaml").read_text() == params_before
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".spare")]  # no staging left


# --- the pool stage: leakage control ----------------------------------------------------------------------


@pytest.fixture
def labelled(tmp_path) -> tuple[Path, pd.DataFrame]:
    """A labelled set of 3 classes x 8 images (16 px), ingested; its prepared folder and splits table."""
    src = write_class_folders(tmp_path / "labelled", per_class=8, size=16)
    ingest(src, tmp_path / "prepared", seed=0, data=DATA)
    return tmp_path / "prepared", pd.read_csv(tmp_path / "prepared" / SPLITS_CSV)


def one_of(splits: pd.DataFrame, split: str, k: int = 0) -> Path:
    return Path(splits.loc[splits["split"] == split, "path"].iloc[k])


def test_duplicates_of_labelled_images_are_left_out_and_listed(labelled, tmp_path):
    prepared, splits = labelled
    raw = tmp_path / "pool"
    fresh = write_images(raw, ["new/0.png", "new/1.png", "new/2.png"], seed=7)
    shutil.copy(one_of(splits, "test"), raw / "copy_of_test.png")
    shutil.copy(one_of(splits, "train"), raw / "copy_of_train.png")
    near = np.array(Image.open(one_of(splits, "val")))
    near[0, 0] = 255 - near[0, 0]  # one pixel changed: other bytes, almost the same picture
    Image.fromarray(near).save(raw / "nearly_val.png")
    report = prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)

    table = pd.read_csv(tmp_path / "out" / POOL_CSV, dtype=str, keep_default_na=False).set_index("path")
    status = table["status"].to_dict()
    assert {p: s for p, s in status.items() if s == KEPT} == {str(p): KEPT for p in fresh}
    reason = table["reason"].to_dict()
    assert reason[str(raw / "copy_of_test.png")] == f"identical to test image {one_of(splits, 'test')}"
    assert reason[str(raw / "copy_of_train.png")] == f"identical to train image {one_of(splits, 'train')}"
    assert reason[str(raw / "nearly_val.png")].startswith("a near duplicate of")
    assert reason[str(raw / "nearly_val.png")].endswith(f"val image {one_of(splits, 'val')}")
    assert report["excluded"]["n"] == 3
    assert report["excluded"]["by_split"] == {"test": 1, "val": 1, "train": 1}
    assert report["excluded"]["by_kind"] == {"identical": 2, "near": 1}
    assert {f["path"] for f in report["excluded"]["files"]} == {
        str(raw / n) for n in ("copy_of_test.png", "copy_of_train.png", "nearly_val.png")
    }
    # only the kept images reach the pixels a loader reads, in pool.csv's cache_index order
    pool = load_pool(tmp_path / "out")
    assert len(pool) == 3 and np.load(tmp_path / "out" / CACHE_NPY).shape == (3, 16, 16, 3)
    for path, index in zip(pool.kept()["path"], pool.kept()["cache_index"], strict=True):
        assert np.array_equal(pool.images[index], np.array(Image.open(path)))
    assert all(len(h) == 64 for h in table["dhash"])  # 256 bits each, for later near-duplicate checks


def test_a_pool_image_linked_to_a_test_image_through_its_group_is_left_out(labelled, tmp_path):
    prepared, splits = labelled
    raw = tmp_path / "pool"
    write_images(raw, ["same_patient.png", "other.png"], seed=8)
    shutil.copy(one_of(splits, "test"), raw / "copy_of_test.png")
    (raw / "manifest.csv").write_text(
        "path,group\nsame_patient.png,p1\ncopy_of_test.png,p1\nother.png,p2\n"
    )  # the copy's patient is new to the labelled set, but one of its images is a test image
    prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    table = pd.read_csv(tmp_path / "out" / POOL_CSV, dtype=str, keep_default_na=False).set_index("path")
    test_image = one_of(splits, "test")
    assert table.at[str(raw / "copy_of_test.png"), "reason"] == f"identical to test image {test_image}"
    assert table.at[str(raw / "same_patient.png"), "reason"] == (
        f"linked through near duplicates or groups to test image {test_image}"
    )
    assert list(load_pool(tmp_path / "out").kept()["path"]) == [str(raw / "other.png")]


def test_without_the_near_duplicate_check_only_exact_copies_are_left_out(labelled, tmp_path):
    prepared, splits = labelled
    raw = tmp_path / "pool"
    raw.mkdir()
    shutil.copy(one_of(splits, "test"), raw / "copy.png")
    near = np.array(Image.open(one_of(splits, "val")))
    near[0, 0] = 255 - near[0, 0]
    Image.fromarray(near).save(raw / "nearly_val.png")
    data = config.Data(image_size=16, val_fraction=0.25, test_fraction=0.25, near_duplicate_bits=None)
    prepare_pool(raw, tmp_path / "out", data=data, labelled=prepared)
    assert list(load_pool(tmp_path / "out").kept()["path"]) == [str(raw / "nearly_val.png")]


def test_a_pool_of_only_duplicates_is_an_error_and_keeps_the_previous_output(labelled, tmp_path):
    prepared, splits = labelled
    raw = tmp_path / "pool"
    write_images(raw, ["fresh.png"], seed=9)
    prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    before = tree_digest(tmp_path / "out")
    (raw / "fresh.png").unlink()
    shutil.copy(one_of(splits, "test"), raw / "copy.png")
    with pytest.raises(DataError, match="every readable image of the pool duplicates"):
        prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    assert tree_digest(tmp_path / "out") == before


def test_pool_bands_must_match_the_labelled_set(labelled, tmp_path):
    prepared, _ = labelled
    raw = tmp_path / "pool"
    raw.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16)).astype(np.uint8)).save(raw / "g.png")
    data = config.Data(image_size=16, val_fraction=0.25, test_fraction=0.25, channels="keep")
    with pytest.raises(DataError, match=r"\(16, 16, 1\).*\(16, 16, 3\)"):
        prepare_pool(raw, tmp_path / "out", data=data, labelled=prepared)


def test_a_dicom_pool_patient_in_val_or_test_contributes_nothing(repo, tmp_path, monkeypatch, capsys):  # noqa: F811
    from tests.test_intake import write_patient_slices
    from tests.test_readers import write_dicom

    monkeypatch.setenv("PIPELINE_GROUP_SALT", "salt-3")
    write_patient_slices(tmp_path / "scans")  # 6 patients x 2 classes x 2 slices, labelled
    assert cli(["intake", str(tmp_path / "scans"), "--name", "ward"]) == 0
    assert cli(["ingest"]) == 0
    splits = pd.read_csv(repo / "data" / "prepared" / SPLITS_CSV, dtype=str)
    split_of = dict(zip(splits["group"], splits["split"], strict=False))
    rng = np.random.default_rng(5)
    for p in range(7):  # new slices of the same six patients, and of a seventh
        path = tmp_path / "unread" / f"p{p}.dcm"
        path.parent.mkdir(exist_ok=True)
        write_dicom(path, rng.integers(0, 4096, (16, 16)), slope=1.0, intercept=0.0, window=(2048, 4096))
        import pydicom

        ds = pydicom.dcmread(path)
        ds.PatientID = f"PAT-{p:03d}"
        ds.save_as(path)
    assert cli(["intake", str(tmp_path / "unread"), "--unlabelled", "--name", "unread"]) == 0
    capsys.readouterr()
    assert cli(["pool"]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(repo / "data" / "pool" / POOL_CSV, dtype=str, keep_default_na=False)
    for path, group, status in zip(table["path"], table["group"], table["status"], strict=True):
        patient = int(Path(path).stem[1:])
        assert group == group_hash(f"PAT-{patient:03d}", "salt-3")
        evaluated = split_of.get(group) in ("val", "test")
        assert status == (EXCLUDED if evaluated else KEPT), (path, split_of.get(group))
    assert (table["status"] == EXCLUDED).any() and (table["status"] == KEPT).sum() >= 2  # the new patient too
    assert "in one group with" in out and "group:" in out


def test_with_folds_a_patient_anywhere_in_the_labelled_set_is_left_out(labelled, tmp_path):
    prepared, _ = labelled
    table = pd.read_csv(prepared / SPLITS_CSV, dtype=str, keep_default_na=False)
    table["group"] = [f"g{i}" for i in range(len(table))]
    table.to_csv(prepared / SPLITS_CSV, index=False)  # as if every labelled image had its patient
    raw = tmp_path / "pool"
    write_images(raw, ["a.png", "b.png"], seed=11)
    train_group = table.loc[table["split"] == "train", "group"].iloc[0]
    (raw / "manifest.csv").write_text(f"path,group\na.png,{train_group}\nb.png,new\n")
    prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    assert list(load_pool(tmp_path / "out").kept()["path"]) == [str(raw / "a.png"), str(raw / "b.png")]
    folds = config.Data(image_size=16, val_fraction=0.25, test_fraction=0.25, folds=2)
    prepare_pool(raw, tmp_path / "out", data=folds, labelled=prepared)
    assert list(load_pool(tmp_path / "out").kept()["path"]) == [str(raw / "b.png")]


def test_unreadable_pool_files_are_rows_with_a_reason(labelled, tmp_path):
    prepared, _ = labelled
    raw = tmp_path / "pool"
    write_images(raw, ["a.png"], seed=12)
    (raw / "b.png").write_bytes(b"junk")
    prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    table = pd.read_csv(tmp_path / "out" / POOL_CSV, dtype=str, keep_default_na=False).set_index("path")
    assert table.at[str(raw / "b.png"), "status"] == UNREADABLE and table.at[str(raw / "b.png"), "reason"]
    assert (
        table.at[str(raw / "b.png"), "cache_index"] == "-1"
        and table.at[str(raw / "a.png"), "cache_index"] == "0"
    )


# --- the stage, its key and dvc.yaml ------------------------------------------------------------------------


def test_the_stage_without_a_pool_writes_an_empty_one_and_a_missing_pool_is_one_error_line(
    repo,  # noqa: F811
    capsys,
):
    assert cli(["pool"]) == 0
    assert not pool_selected(repo / "data" / "pool")
    with pytest.raises(DataError, match=r"data.unlabelled: null"):
        load_pool(repo / "data" / "pool")
    params = (repo / "params.yaml").read_text().replace("unlabelled: null ", "unlabelled: nowhere ")
    (repo / "params.yaml").write_text(params)
    capsys.readouterr()
    assert cli(["pool"]) == 2
    line = error_line(capsys)
    assert "data.unlabelled: nowhere" in line and "intake SRC --unlabelled" in line


def test_only_the_pool_stage_reads_data_unlabelled():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    readers = {
        name
        for name, stage in stages.items()
        for p in stage.get("params", [])
        if p in ("data", "data.unlabelled")
    }
    assert readers == {"pool"}
    every_key = {f"data.{f}" for f in config.Data.__dataclass_fields__} - {
        "data.unlabelled",
        "data.image_size",
    }
    listed = {p for p in stages["ingest"]["params"] if isinstance(p, str)}
    assert listed - {"seed"} == every_key  # ingest still reads every other key
    # data.image_size: the size stage's resolved value only (pipeline/data/size.py)
    assert {"${paths.image_size}": ["image_size"]} in stages["ingest"]["params"]


# --- the reader a training loader uses ----------------------------------------------------------------------


def test_unlabelled_dataset_serves_pixels_and_independent_views(labelled, tmp_path):
    import albumentations as A
    import torch

    prepared, _ = labelled
    raw = tmp_path / "pool"
    write_images(raw, [f"{i}.png" for i in range(4)], seed=13)
    prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    pool = load_pool(tmp_path / "out")
    plain = UnlabelledDataset(pool.images)
    assert len(plain) == 4 and plain[2].shape == (3, 16, 16) and plain[2].dtype == torch.uint8
    assert torch.equal(plain[2], torch.from_numpy(np.array(pool.images[2]).transpose(2, 0, 1)))
    weak, strong = A.HorizontalFlip(p=1.0), A.Compose([A.VerticalFlip(p=1.0)])
    views = UnlabelledDataset(pool.images, [weak, strong])[1]
    assert isinstance(views, tuple) and len(views) == 2
    assert torch.equal(views[0], plain[1].flip(-1)) and torch.equal(views[1], plain[1].flip(-2))
    batch = next(iter(torch.utils.data.DataLoader(UnlabelledDataset(pool.images, A.NoOp()), batch_size=4)))
    assert batch.shape == (4, 3, 16, 16)


def test_a_16_bit_pool_beside_an_8_bit_set_is_stored_as_the_set_is(labelled, tmp_path):
    prepared, _ = labelled
    raw = tmp_path / "pool"
    raw.mkdir()
    deep = np.random.default_rng(3).integers(0, 65536, (16, 16), dtype=np.uint16)
    Image.fromarray(deep).save(raw / "deep.png")
    report = prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared)
    pool = load_pool(tmp_path / "out")
    assert pool.images.dtype == np.uint8 and "stored as uint8" in report["warnings"][0]
    assert np.abs(pool.images[0, ..., 0].astype(float) - deep / 257).max() <= 0.5


def test_pretraining_rows_are_the_train_split_then_the_pool(labelled, tmp_path):
    from pipeline.data.pooled import unlabelled_rows
    from pipeline.data.prepared import load_prepared

    prepared_dir, splits = labelled
    raw = tmp_path / "pool"
    write_images(raw, ["a.png", "b.png"], seed=21)
    prepare_pool(raw, tmp_path / "out", data=DATA, labelled=prepared_dir)
    prepared, pool = load_prepared(prepared_dir), load_pool(tmp_path / "out")
    rows = unlabelled_rows(prepared, pool)
    train = splits.loc[splits["split"] == "train", "cache_index"].to_numpy()
    assert len(rows) == len(train) + 2
    assert np.array_equal(rows[0], prepared.images[train[0]]) and np.array_equal(
        rows[len(train)], pool.images[0]
    )
    evaluated = {prepared.images[i].tobytes() for i in splits.loc[splits["split"] != "train", "cache_index"]}
    assert not any(np.asarray(image).tobytes() in evaluated for image in rows)
