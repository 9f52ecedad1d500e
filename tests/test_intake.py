"""intake: copy, validate, version with DVC and select a user's set; the source is never touched."""

import difflib
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipeline.__main__ import main as cli
from pipeline.data.intake import group_hash, set_dataset
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
    params = REPO_PARAMS.read_text().replace("image_size: auto ", "image_size: 16 ")
    (root / "params.yaml").write_text(
        params.replace("val_fraction: 0.15", "val_fraction: 0.25").replace(
            "test_fraction: 0.15", "test_fraction: 0.25"
        )
    )
    monkeypatch.chdir(root)
    return root


def test_intake_of_a_folder_copies_versions_and_selects_it(repo, tmp_path, capsys):
    src = write_class_folders(tmp_path / "my_set", per_class=4, size=16)
    (src / "alpha" / "readme.txt").write_text("scanner notes")
    before = tree_digest(src)
    assert cli(["intake", str(src), "--name", "mine"]) == 0
    assert tree_digest(src) == before
    target = repo / "data" / "raw" / "mine"
    assert sorted(p.name for p in (target / "beta").iterdir()) == sorted(
        p.name for p in (src / "beta").iterdir()
    )
    assert (repo / "data" / "raw" / "mine.dvc").is_file()
    params = (repo / "params.yaml").read_text()
    assert "  dataset: mine              # folder under paths.raw to train on\n" in params
    assert params.replace("dataset: mine ", "dataset: demo ") == (repo / "params.yaml").read_text().replace(
        "dataset: mine ", "dataset: demo "
    )  # nothing else changed
    out = capsys.readouterr().out
    assert "12 images, 3 classes" in out and "1 non-image files ignored" in out and "dvc repro" in out
    assert "per class   alpha: 4, beta: 4, gamma: 4" in out


def test_intake_of_a_manifest_keeps_split_and_group(repo, tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_GROUP_SALT", raising=False)
    manifest = manifest_set(tmp_path / "src", n_groups=8, per_group=2, split=True)
    before = tree_digest(manifest.parent)
    assert cli(["intake", str(manifest), "--name", "listed"]) == 0
    assert tree_digest(manifest.parent) == before
    written = pd.read_csv(repo / "data" / "raw" / "listed" / "manifest.csv")
    given = pd.read_csv(manifest)
    assert list(written.columns) == list(given.columns)
    salt = (repo / ".dvc" / "group_salt").read_text().strip()  # made by this first intake
    assert list(written["split"]) == list(given["split"])
    assert list(written["group"]) == [group_hash(g, salt) for g in given["group"]]  # hashed, never the IDs
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
    params.write_text(
        "seed: 1\ndata:\n  image_size: 32  # side\n  dataset: old  # keep me\ntrain:\n  lr: 0.1\n"
    )
    set_dataset(params, "new-set")
    assert (
        params.read_text() == "seed: 1\ndata:\n  image_size: 32  # side\n  dataset: new-set  # keep me\n"
        "train:\n  lr: 0.1\n"
    )
    set_dataset(params, "2024")  # would read back as a number unquoted
    assert '  dataset: "2024"  # keep me\n' in params.read_text()
    params.write_text("seed: 1\n")
    set_dataset(params, "x")
    assert params.read_text().endswith("data:\n  dataset: x\n")


# --- privacy: group IDs stored only as salted hashes ----------------------------------------------


def patient_manifest(root: Path) -> tuple[Path, list[str]]:
    """``manifest_set`` with patient-like group IDs that could not turn up in any output by chance."""
    manifest = manifest_set(root, n_groups=8, per_group=3)
    table = pd.read_csv(manifest)
    table["group"] = [f"PATIENT-{g[1:]}^Doe" for g in table["group"]]
    table.to_csv(manifest, index=False)
    return manifest, sorted(set(table["group"]))


def all_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_group_ids_reach_raw_and_prepared_data_only_as_salted_hashes(repo, tmp_path, monkeypatch, capsys):
    from pipeline.data.card import summary
    from pipeline.data.ingest import ingest
    from pipeline.data.intake import group_hash
    from pipeline.data.prepared import SPLITS_CSV

    monkeypatch.setenv("PIPELINE_GROUP_SALT", "test-salt-1")
    manifest, ids = patient_manifest(tmp_path / "src")
    assert cli(["intake", str(manifest), "--name", "ward"]) == 0
    raw = repo / "data" / "raw" / "ward"
    report = ingest(
        raw, repo / "data" / "prepared", seed=0, image_size=16, val_fraction=0.25, test_fraction=0.25
    )
    stored = pd.read_csv(raw / "manifest.csv", dtype=str)
    given = pd.read_csv(manifest, dtype=str)
    assert list(stored["group"]) == [group_hash(g, "test-salt-1") for g in given["group"]]
    assert stored["group"].str.fullmatch(r"[0-9a-f]{16}").all() and stored["group"].nunique() == len(ids)
    splits = pd.read_csv(repo / "data" / "prepared" / SPLITS_CSV, dtype=str)
    assert set(splits["group"]) == set(stored["group"])
    assert (splits.groupby("group")["split"].nunique() == 1).all()  # a patient's images stay in one split
    everything = all_bytes(raw) + all_bytes(repo / "data" / "prepared") + raw.with_suffix(".dvc").read_bytes()
    text = capsys.readouterr().out + summary(report)
    for patient in ids:
        assert patient.encode() not in everything and patient not in text, patient
    assert b"test-salt-1" not in everything and "test-salt-1" not in text


def test_the_same_salt_gives_the_same_hashes_and_another_salt_others(tmp_path):
    from pipeline.config import Data
    from pipeline.data.intake import intake

    manifest, _ = patient_manifest(tmp_path / "src")
    data = Data(image_size=16, val_fraction=0.25, test_fraction=0.25)
    groups = {}
    for run, salt in (("a", "s1"), ("b", "s1"), ("c", "s2")):
        intake(manifest, tmp_path / "raw" / run, seed=0, data=data, salt=salt)
        groups[run] = list(pd.read_csv(tmp_path / "raw" / run / "manifest.csv", dtype=str)["group"])
    assert groups["a"] == groups["b"]
    assert set(groups["a"]).isdisjoint(groups["c"]) and len(set(groups["c"])) == len(set(groups["a"])) == 8


def test_without_the_variable_a_random_salt_is_kept_in_a_git_ignored_file(
    repo, tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("PIPELINE_GROUP_SALT", raising=False)
    manifest, _ = patient_manifest(tmp_path / "src")
    assert cli(["intake", str(manifest), "--name", "one"]) == 0
    assert cli(["intake", str(manifest), "--name", "two"]) == 0
    salt_file = repo / ".dvc" / "group_salt"
    salt = salt_file.read_text().strip()
    assert len(salt) == 64 and salt_file.stat().st_mode & 0o077 == 0  # readable by its owner only
    one, two = (
        pd.read_csv(repo / "data" / "raw" / n / "manifest.csv", dtype=str)["group"] for n in ("one", "two")
    )
    assert one.equals(two)
    captured = capsys.readouterr()
    assert salt not in captured.out + captured.err
    project = Path(__file__).parents[1]
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/group_salt"], cwd=project)
    assert ignored.returncode == 0  # never committed in this project


def test_a_manifest_inside_a_class_folder_set_is_hashed_too(tmp_path):
    from pipeline.config import Data
    from pipeline.data.intake import group_hash, intake

    src = write_class_folders(tmp_path / "folders", per_class=4, size=16)
    rows = [
        {"path": str(p.relative_to(src)), "label": p.parent.name, "group": f"PATIENT-{i % 4}^Doe"}
        for i, p in enumerate(sorted(src.rglob("*.png")))
    ]
    pd.DataFrame(rows).to_csv(src / "manifest.csv", index=False)
    intake(
        src,
        tmp_path / "raw" / "x",
        seed=0,
        data=Data(image_size=16, val_fraction=0.25, test_fraction=0.25),
        salt="s",
    )
    assert b"PATIENT-" not in all_bytes(tmp_path / "raw" / "x")
    stored = pd.read_csv(tmp_path / "raw" / "x" / "manifest.csv", dtype=str)
    assert list(stored["group"]) == [group_hash(r["group"], "s") for r in rows]


# --- messages and help ----------------------------------------------------------------------------


def test_warnings_during_intake_name_the_source_files(repo, tmp_path, caplog):
    src = write_class_folders(tmp_path / "my_set", per_class=4, size=16)
    (src / "alpha" / "broken.png").write_bytes(b"\x89PNG broken")
    with caplog.at_level("WARNING", logger="pipeline"):
        assert cli(["intake", str(src), "--name", "mine"]) == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(f"skipping unreadable image {src / 'alpha' / 'broken.png'}" in m for m in lines), lines
    assert not any(".mine." in m for m in lines), lines  # never the staging copy


def test_intake_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as done:
        cli(["intake", "--help"])
    out = capsys.readouterr().out
    assert (
        done.value.code == 0
        and "usage: python -m pipeline intake" in out
        and "SRC" in out
        and "--name" in out
    )


# --- the domain sets the augmentation; DICOM sets group themselves -----------------------------------


def test_domain_sets_augmentation_and_tta_and_the_card_says_so(repo, tmp_path, capsys):
    from pipeline.config import load

    src = write_class_folders(tmp_path / "films", per_class=4, size=12)  # smaller than data.image_size 16
    before = (repo / "params.yaml").read_text()
    assert load(repo / "params.yaml").augment.transforms  # the demo's SquareSymmetry, flips at test time
    assert cli(["intake", str(src), "--name", "chest", "--domain", "xray"]) == 0
    params = load(repo / "params.yaml")
    assert (params.augment.preset, params.augment.transforms, params.evaluate.tta) == ("medical", (), ())
    diff = list(difflib.ndiff(before.splitlines(), (repo / "params.yaml").read_text().splitlines()))
    added, removed = ([d[2:] for d in diff if d.startswith(sign)] for sign in ("+ ", "- "))
    assert [b.split("#")[0].strip() for b in added] == ["dataset: chest", "transforms: []", "tta: []"]
    assert (
        all("#" in b for b in added) and len(removed) == 4
    )  # comments kept; the old SquareSymmetry line out
    out = capsys.readouterr().out
    assert "--domain xray, written to params.yaml" in out and "evaluate.tta [] (none)" in out
    assert "upscaled to 16x16" in out and "data.image_size: 16 trains on them as they are" in out
    assert "training never applies it" not in out


def test_without_a_domain_the_card_names_what_is_kept_and_a_contradicting_tta(repo, tmp_path, capsys):
    params = (repo / "params.yaml").read_text()
    (repo / "params.yaml").write_text(
        params.replace("tta: [HorizontalFlip, VerticalFlip]", "tta: [VerticalFlip]").replace(
            "    - {name: SquareSymmetry, p: 1.0}", "    - {name: HorizontalFlip}"
        )
    )
    src = write_class_folders(tmp_path / "s", per_class=4, size=16)
    assert cli(["intake", str(src), "--name", "kept"]) == 0
    out = capsys.readouterr().out
    assert "kept from params.yaml (no --domain given" in out and "upscaled" not in out
    assert "warning:    evaluate.tta has VerticalFlip, but training never applies it" in out


def write_patient_slices(root: Path, n_patients: int = 6) -> dict[str, str]:
    """DICOM slices per class folder, two per patient in each class; returns file name -> PatientID."""
    import numpy as np
    import pydicom

    from tests.test_readers import write_dicom

    rng, owners = np.random.default_rng(0), {}
    for label in ("normal", "pneumonia"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for p in range(n_patients):
            for s in range(2):
                path = root / label / f"{label}_{p}_{s}.dcm"
                write_dicom(
                    path, rng.integers(0, 4096, (16, 16)), slope=1.0, intercept=0.0, window=(2048, 4096)
                )
                ds = pydicom.dcmread(path)
                ds.PatientID = owners[path.name] = f"PAT-{p:03d}"
                ds.save_as(path)
    return owners


def test_dicom_slices_are_grouped_by_patient_as_salted_hashes(repo, tmp_path, monkeypatch, capsys):
    from pipeline.data.ingest import ingest
    from pipeline.data.prepared import SPLITS_CSV

    monkeypatch.setenv("PIPELINE_GROUP_SALT", "salt-9")
    owners = write_patient_slices(tmp_path / "scans")
    assert cli(["intake", str(tmp_path / "scans"), "--name", "ward", "--domain", "ct"]) == 0
    raw = repo / "data" / "raw" / "ward"
    stored = pd.read_csv(raw / "manifest.csv", dtype=str)
    assert list(stored.columns) == ["path", "label", "group"]
    assert list(stored["group"]) == [group_hash(owners[Path(p).name], "salt-9") for p in stored["path"]]
    ingest(raw, repo / "data" / "prepared", seed=0, image_size=16, val_fraction=0.25, test_fraction=0.25)
    splits = pd.read_csv(repo / "data" / "prepared" / SPLITS_CSV, dtype=str)
    assert splits["group"].nunique() == 6 and (splits.groupby("group")["split"].nunique() == 1).all()
    out = capsys.readouterr().out
    assert "groups from DICOM PatientID: 6 groups, stored as salted hashes" in out
    assert "PAT-0" not in out and b"PAT-0" not in (raw / "manifest.csv").read_bytes()


def test_the_card_of_a_binary_set_names_the_positive_class_never_a_healthy_one(repo, tmp_path, capsys):
    """A breast-ultrasound-like set: sorted order would make `normal_benign` positive (sensitivity = the benign
    recall); the default is `malignant`, and the card says so and how to change it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("malignant", "normal_benign")):
        (tmp_path / "us" / name).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 90, (16, 16, 3)) + 120 * np.eye(3)[k]
            Image.fromarray(img.astype(np.uint8)).save(tmp_path / "us" / name / f"{i}.png")
    assert cli(["intake", str(tmp_path / "us"), "--name", "busi"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("positive"))
    assert line.split()[1] == "malignant" and "'normal_benign' names a healthy" in line
    assert "set evaluate.positive_class: normal_benign in params.yaml" in line


def test_a_set_of_two_patients_is_refused_at_intake_with_one_error_line(repo, tmp_path, capsys):
    # Every image of one patient per class: a grouped split cannot fill val and test.
    manifest = manifest_set(tmp_path / "src", n_groups=2, per_group=3)
    assert cli(["intake", str(manifest), "--name", "two"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "would hold no image" in err[-1] and "only 2 unit(s)" in err[-1]
    assert str(tmp_path / "src" / "imgs") in err[-1]  # the user's own files, not the staging copies
    assert not (repo / "data" / "raw" / "two").exists()
