"""intake: copy, validate, version with DVC and select a user's set; the source is never touched."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.__main__ import main as cli
from pipeline.data.intake import set_dataset
from tests.conftest import write_class_folders
from tests.test_ingest import manifest_set, tree_digest

REPO_PARAMS = Path(__file__).parents[1] / "params.yaml"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A throwaway git + DVC repository holding a copy of the project's params.yaml, as the cwd."""
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    params = REPO_PARAMS.read_text().replace("image_size: 64 ", "image_size: 16 ")
    (root / "params.yaml").write_text(params.replace("val_fraction: 0.15", "val_fraction: 0.25")
                                      .replace("test_fraction: 0.15", "test_fraction: 0.25"))
    monkeypatch.chdir(root)
    return root


def test_intake_of_a_folder_copies_versions_and_selects_it(repo, tmp_path, capsys):
    src = write_class_folders(tmp_path / "my_set", per_class=4, size=16)
    (src / "alpha" / "readme.txt").write_text("scanner notes")
    before = tree_digest(src)
    assert cli(["intake", str(src), "--name", "mine"]) == 0
    assert tree_digest(src) == before
    target = repo / "data" / "raw" / "mine"
    assert sorted(p.name for p in (target / "beta").iterdir()) == sorted(p.name for p in (src / "beta").iterdir())
    assert (repo / "data" / "raw" / "mine.dvc").is_file()
    params = (repo / "params.yaml").read_text()
    assert "  dataset: mine              # folder under paths.raw to train on\n" in params
    assert params.replace("dataset: mine ", "dataset: demo ") == (repo / "params.yaml").read_text().replace(
        "dataset: mine ", "dataset: demo ")  # nothing else changed
    out = capsys.readouterr().out
    assert "12 images, 3 classes" in out and "1 non-image files ignored" in out and "dvc repro" in out
    assert "per class   alpha: 4, beta: 4, gamma: 4" in out


def test_intake_of_a_manifest_keeps_split_and_group(repo, tmp_path):
    manifest = manifest_set(tmp_path / "src", n_groups=8, per_group=2, split=True)
    before = tree_digest(manifest.parent)
    assert cli(["intake", str(manifest), "--name", "listed"]) == 0
    assert tree_digest(manifest.parent) == before
    written = pd.read_csv(repo / "data" / "raw" / "listed" / "manifest.csv")
    given = pd.read_csv(manifest)
    assert list(written.columns) == list(given.columns)
    assert list(written["split"]) == list(given["split"]) and list(written["group"]) == list(given["group"])
    assert all((repo / "data" / "raw" / "listed" / p).is_file() for p in written["path"])
    assert set(written["path"].str.split("/").str[0]) == {"sick", "well"}


def test_a_failed_intake_keeps_the_previous_set(repo, tmp_path, capsys):
    src = write_class_folders(tmp_path / "good", per_class=4, size=16)
    assert cli(["intake", str(src), "--name", "mine"]) == 0
    before = tree_digest(repo / "data" / "raw" / "mine")
    params_before = (repo / "params.yaml").read_text()
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    shutil.copy(bad / "alpha" / "alpha_00.png", bad / "beta" / "stolen.png")  # same bytes, two labels
    (repo / "params.yaml").write_text(params_before.replace("dataset: mine", "dataset: demo"))
    assert cli(["intake", str(bad), "--name", "mine"]) == 2
    assert "alpha_00.png (alpha)" in capsys.readouterr().err
    assert tree_digest(repo / "data" / "raw" / "mine") == before
    assert "dataset: demo" in (repo / "params.yaml").read_text()  # not selected
    assert not [p for p in (repo / "data" / "raw").iterdir() if p.name.startswith(".mine")]  # no staging left


def test_intake_refuses_the_demo_name_and_extra_args_elsewhere(repo, tmp_path, capsys):
    src = write_class_folders(tmp_path / "s", per_class=4, size=16)
    assert cli(["intake", str(src), "--name", "demo"]) == 2
    assert "demo stage's output" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["ingest", "extra"])


def test_set_dataset_edits_one_line_or_adds_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\ndata:\n  image_size: 32  # side\n  dataset: old  # keep me\ntrain:\n  lr: 0.1\n")
    set_dataset(params, "new-set")
    assert params.read_text() == "seed: 1\ndata:\n  image_size: 32  # side\n  dataset: new-set  # keep me\n" \
                                 "train:\n  lr: 0.1\n"
    set_dataset(params, "2024")  # would read back as a number unquoted
    assert '  dataset: "2024"  # keep me\n' in params.read_text()
    params.write_text("seed: 1\n")
    set_dataset(params, "x")
    assert params.read_text().endswith("data:\n  dataset: x\n")
