"""The one link policy (pipeline/data/sources.py) as intake, ingest and predict see it, and the CLI's
one-line errors for hostile or broken input: nothing outside the source folder is read, only regular
files are copied, every PipelineError is one ``error:`` line and exit code 2."""

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from pipeline.__main__ import main as cli
from pipeline.config import Data
from pipeline.data import readers, sources
from pipeline.data.ingest import ingest
from pipeline.data.intake import intake
from pipeline.data.prepared import DataError
from pipeline.serve import predict
from tests.conftest import write_class_folders

REPO_PARAMS = Path(__file__).parents[1] / "params.yaml"
DATA = Data(image_size=16, val_fraction=0.25, test_fraction=0.25, min_images_per_class=3)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A cwd with the project's params.yaml (small images) and a salt in the environment; no DVC needed:
    every case here fails before intake versions anything."""
    root = tmp_path / "project"
    root.mkdir()
    (root / "params.yaml").write_text(REPO_PARAMS.read_text().replace("image_size: auto ", "image_size: 16 "))
    monkeypatch.chdir(root)
    monkeypatch.setenv("PIPELINE_GROUP_SALT", "s")
    return root


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the set, with an image and a 'private' file that must never be read."""
    folder = tmp_path / "outside"
    (folder / "private").mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(folder / "secret.png")
    (folder / "private" / "key.png").write_bytes(b"-----BEGIN PRIVATE KEY-----")
    return folder


def one_error_line(capsys, rc: int) -> str:
    """Exit code 2 and exactly one line on stderr, ``error: ...``, no traceback; return it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("link", ["file", "folder"])
def test_links_out_of_the_set_are_refused_by_intake_ingest_and_predict(
    project, tmp_path, outside, capsys, link
):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    name = src / "alpha" / ("x.png" if link == "file" else "ssl")
    name.symlink_to(outside / "secret.png" if link == "file" else outside)
    line = one_error_line(capsys, cli(["intake", str(src), "--name", "mine"]))
    assert str(name) in line and "outside the source folder" in line
    assert not (project / "data" / "raw" / "mine").exists()
    with pytest.raises(sources.UnsafePath, match="outside the source folder"):
        ingest(src, tmp_path / "prepared", seed=0, data=DATA)
    with pytest.raises(sources.UnsafePath, match="outside the source folder"):
        predict.list_images(src)


def test_manifest_rows_naming_files_outside_its_folder_are_refused(project, tmp_path, outside, capsys):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    rows = [{"path": str(p.relative_to(src)), "label": p.parent.name} for p in sorted(src.rglob("*.png"))]
    rows.append({"path": "../outside/secret.png", "label": "alpha"})
    pd.DataFrame(rows).to_csv(src / "list.csv", index=False)
    line = one_error_line(capsys, cli(["intake", str(src / "list.csv"), "--name", "mine"]))
    assert "outside the source folder" in line
    with pytest.raises(sources.UnsafePath):
        predict.list_images(src / "list.csv")


def test_links_inside_the_set_are_followed(tmp_path):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    (src / "alpha" / "linked.png").symlink_to(src / "alpha" / "alpha_00.png")
    (src / "beta" / "more").symlink_to(src / "gamma")  # a folder link that stays inside: followed
    assert src / "beta" / "more" / "gamma_00.png" in sources.listing(src)
    assert src / "alpha" / "linked.png" in predict.list_images(src)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".dcm", ".npy"])
def test_nothing_outside_the_source_is_read_whatever_the_format(tmp_path, outside, suffix):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    target = outside / f"img{suffix}"
    target.write_bytes(b"x" * 64)
    (src / "beta" / f"link{suffix}").symlink_to(target)
    with pytest.raises(sources.UnsafePath):
        ingest(src, tmp_path / "prepared", seed=0, data=DATA)


def test_a_fifo_named_png_is_skipped_with_a_reason_never_read(project, tmp_path, capsys):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    os.mkfifo(src / "alpha" / "pipe.png")  # opening it to read would block for ever
    report = intake(src, project / "raw" / "mine", seed=0, data=DATA, salt="s")
    assert {"path": str(src / "alpha" / "pipe.png"), "reason": "not a regular file (FIFO)"} in report[
        "rejected"
    ]
    assert not (project / "raw" / "mine" / "alpha" / "pipe.png").exists()  # only regular files are copied
    assert report["n_images"] == 12
    shutil.copytree(project / "raw" / "mine", tmp_path / "raw2")
    os.mkfifo(
        tmp_path / "raw2" / "beta" / "pipe.png"
    )  # a set placed in paths.raw by hand: ingest skips it too
    rejected = ingest(tmp_path / "raw2", tmp_path / "prepared", seed=0, data=DATA)["rejected"]
    assert rejected == [
        {"path": str(tmp_path / "raw2" / "beta" / "pipe.png"), "reason": "not a regular file (FIFO)"}
    ]
    with pytest.raises(readers.UnreadableImage, match="not a regular file"):
        readers.read(tmp_path / "raw2" / "beta" / "pipe.png")


def test_a_device_is_never_copied(tmp_path):
    """/dev/zero grows a copy without limit; linked from inside the set, it is refused before any read."""
    from pipeline.data.intake import Copied, _copy_file

    copied = Copied()
    assert not _copy_file(Path("/dev/zero"), tmp_path / "zero.png", copied, "skip")
    assert copied.rejected == [{"path": "/dev/zero", "reason": "not a regular file (character device)"}]
    assert not (tmp_path / "zero.png").exists()
    with pytest.raises(DataError, match="character device"):
        _copy_file(Path("/dev/zero"), tmp_path / "zero.png", Copied(), "fail")


def test_fifo_with_on_bad_file_fail_is_one_error_line(project, tmp_path, capsys):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    os.mkfifo(src / "alpha" / "pipe.png")
    (project / "params.yaml").write_text(
        (project / "params.yaml").read_text().replace("on_bad_file: skip ", "on_bad_file: fail ")
    )
    line = one_error_line(capsys, cli(["intake", str(src), "--name", "mine"]))
    assert str(src / "alpha" / "pipe.png") in line and "FIFO" in line


@pytest.mark.parametrize("loop", ["file", "folder"])
def test_a_symlink_loop_is_one_error_line_naming_it(project, tmp_path, capsys, loop):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    if loop == "file":
        (src / "alpha" / "a.png").symlink_to(src / "alpha" / "b.png")
        (src / "alpha" / "b.png").symlink_to(src / "alpha" / "a.png")
        named = src / "alpha" / "a.png"
    else:
        (src / "alpha" / "up").symlink_to(src / "alpha")
        named = src / "alpha" / "up"
    line = one_error_line(capsys, cli(["intake", str(src), "--name", "mine"]))
    assert str(named) in line and "loop" in line
    (project / "data" / "raw").mkdir(parents=True, exist_ok=True)
    shutil.copytree(src, project / "data" / "raw" / "demo", symlinks=True)
    (project / "data" / "raw" / "demo" / "alpha" / named.name).unlink()
    (project / "data" / "raw" / "demo" / "alpha" / named.name).symlink_to(named.name)  # a link to itself
    line = one_error_line(capsys, cli(["ingest"]))
    assert "loop" in line and named.name in line


def test_a_manifest_with_only_a_header_is_one_error_line(project, tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path,label\n")
    line = one_error_line(capsys, cli(["intake", str(tmp_path / "list.csv"), "--name", "mine"]))
    assert str(tmp_path / "list.csv") in line and "only a header row" in line


def test_an_empty_params_file_is_one_error_line(project, capsys):
    (project / "params.yaml").write_text("# nothing here\n")
    line = one_error_line(capsys, cli(["ingest"]))
    assert "params.yaml" in line and "empty" in line


def test_non_image_manifest_rows_are_counted_and_listed(project, tmp_path):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    (src / "alpha" / "notes.txt").write_text("scanner notes")
    rows = [{"path": str(p.relative_to(src)), "label": p.parent.name} for p in sorted(src.rglob("*.png"))]
    rows.append({"path": "alpha/notes.txt", "label": "alpha"})
    pd.DataFrame(rows).to_csv(src / "list.csv", index=False)
    report = intake(src / "list.csv", project / "raw" / "mine", seed=0, data=DATA, salt="s")
    assert report["ignored_non_images"] == 1 and report["non_images"] == [str(src / "alpha" / "notes.txt")]
    from pipeline.data.card import summary

    text = summary(report)
    assert "1 non-image files ignored" in text and "notes.txt" in text


@pytest.mark.parametrize("suffix", [".png", ".tif", ".dcm", ".npy"])
def test_one_pixel_budget_for_every_reader(tmp_path, suffix):
    """Past data.max_image_pixels a file is skipped with a reason, before its pixels are decoded."""
    path = tmp_path / f"big{suffix}"
    pixels = np.arange(40 * 30, dtype=np.uint16).reshape(30, 40)
    if suffix == ".png":
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    elif suffix == ".tif":
        tifffile.imwrite(path, pixels, compression="zlib")
    elif suffix == ".npy":
        np.save(path, np.stack([pixels] * 3, axis=-1))
    else:
        from tests.test_readers import write_dicom

        write_dicom(path, pixels, slope=1.0, intercept=0.0)
    assert readers.read(path, max_pixels=1200).pixels.shape[:2] == (30, 40)
    with pytest.raises(readers.UnreadableImage, match=r"40x30 pixels is over data.max_image_pixels \(1199\)"):
        readers.read(path, max_pixels=1199)


def test_a_decompression_bomb_tiff_is_skipped_by_ingest(tmp_path):
    src = write_class_folders(tmp_path / "set", per_class=4, size=16)
    tifffile.imwrite(src / "alpha" / "bomb.tif", np.zeros((300, 300), np.uint8), compression="zlib")
    report = ingest(
        src, tmp_path / "prepared", seed=0, data=Data(**{**DATA.__dict__, "max_image_pixels": 10_000})
    )
    assert report["rejected"][0]["path"] == str(src / "alpha" / "bomb.tif")
    assert "over data.max_image_pixels" in report["rejected"][0]["reason"]
    assert Data().max_image_pixels == readers.MAX_PIXELS


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored landscape with 'rotate 90' in its EXIF is read portrait, as it was taken."""
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    pixels = readers.read(tmp_path / "phone.jpg").pixels
    assert pixels.shape[:2] == (40, 20)
    assert pixels[:15].mean() > 200 and pixels[25:].mean() < 50  # the white half is now on top


def test_invalid_params_are_one_line_too_and_never_show_a_password(project, capsys):
    (project / "params.yaml").write_text(
        "train:\n  lr: -1\n  lrr: 1\ntune:\n  storage: postgresql://u:hunter2@db/x\n"
    )
    line = one_error_line(capsys, cli(["ingest"]))
    assert "train.lr" in line and "train.lrr: unknown key" in line and "tune.storage holds a password" in line
    assert "hunter2" not in line
