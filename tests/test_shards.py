"""The shard layout: tar shards under DVC, their per-file manifest in git, read by ingest as a folder is."""

import filecmp
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from pipeline.__main__ import main as cli
from pipeline.config import Data
from pipeline.data import decoding, readers, shards
from pipeline.data.ingest import CACHE_NPY, REPORT_JSON, SPLITS_CSV, ingest
from pipeline.data.intake import intake
from pipeline.data.layout import SHARDS_CSV, SHARDS_DIR, is_sharded
from pipeline.data.prepared import DataError
from tests.conftest import write_class_folders
from tests.test_ingest import manifest_set
from tests.test_intake import repo  # noqa: F401  (the fixture: a git + DVC repository as the cwd)

DATA = Data(image_size=16, val_fraction=0.25, test_fraction=0.25, min_images_per_class=3)


@pytest.fixture
def small_shards(monkeypatch):
    monkeypatch.setattr(shards, "SHARD_FILES", 5)


def take_in(src: Path, root: Path, layout: str, validated: Path | None = None) -> Path:
    """``src`` taken in as ``root/set`` in ``layout``; returns ``root`` (ingest it from there as ``set``)."""
    intake(src, root / "set", seed=0, data=DATA, salt="salt", layout=layout, validated=validated)
    return root


@pytest.mark.parametrize("source", ["folders", "manifest"])
def test_folder_and_shard_layouts_give_the_same_prepared_cache(source, tmp_path, small_shards, monkeypatch):
    src = (
        write_class_folders(tmp_path / "src", per_class=6, size=16)
        if source == "folders"
        else manifest_set(tmp_path / "src", n_groups=6, per_group=2, split=True)
    )
    folder, sharded = take_in(src, tmp_path / "a", "folder"), take_in(src, tmp_path / "b", "shards")
    assert not is_sharded(folder / "set") and is_sharded(sharded / "set")
    assert sorted(p.name for p in (sharded / "set").iterdir()) == [SHARDS_DIR, SHARDS_CSV]
    manifest = pd.read_csv(sharded / "set" / SHARDS_CSV)
    assert len(manifest) == (18 if source == "folders" else 12)
    assert len(list((sharded / "set" / SHARDS_DIR).iterdir())) == -(-len(manifest) // 5)  # 5 a shard
    if source == "manifest":  # the user's split and group columns kept (the group hashed, as in the folder)
        assert {"split", "group"} <= set(manifest.columns)
    with tarfile.open(sharded / "set" / SHARDS_DIR / manifest["shard"].iat[0]) as tar:
        first = tar.getmembers()[0]
        assert (first.name, first.offset_data, first.size) == tuple(
            manifest.loc[0, ["path", "offset", "size"]]
        )
    if source == "folders":  # the shard set in worker processes, which read the members themselves
        monkeypatch.setattr(decoding, "PARALLEL_MIN_FILES", 0)
        monkeypatch.setattr(decoding, "CHUNK", 4)
    for root in (folder, sharded):
        monkeypatch.chdir(root)  # both named set/..., as a data set under paths.raw is
        ingest(Path("set"), root / "out", seed=0, data=DATA)
    for name in (CACHE_NPY, SPLITS_CSV, REPORT_JSON):
        assert filecmp.cmp(folder / "out" / name, sharded / "out" / name, shallow=False), name


def test_ingest_of_shards_takes_intake_s_decodes(tmp_path, small_shards, monkeypatch):
    src = write_class_folders(tmp_path / "src", per_class=4, size=16)
    root = take_in(src, tmp_path, "shards", validated=tmp_path / "validated")
    decoded: list[str] = []
    real = readers.read_bytes
    monkeypatch.setattr(
        readers, "read_bytes", lambda data, name, *a: decoded.append(name) or real(data, name, *a)
    )
    ingest(root / "set", tmp_path / "out", seed=0, data=DATA, reuse=tmp_path / "validated")
    assert decoded == []
    ingest(root / "set", tmp_path / "again", seed=0, data=DATA)
    assert len(decoded) == 12  # one decode per member without the store


def test_a_corrupt_truncated_or_missing_shard_is_an_error_naming_it(tmp_path, small_shards):
    src = write_class_folders(tmp_path / "src", per_class=4, size=16)
    root = take_in(src, tmp_path, "shards") / "set"
    manifest = pd.read_csv(root / SHARDS_CSV)
    row = manifest.iloc[6]
    shard = root / SHARDS_DIR / row["shard"]
    data = bytearray(shard.read_bytes())
    data[row["offset"] + 40] ^= 0xFF  # one byte of a member's content
    shard.write_bytes(bytes(data))
    with pytest.raises(
        shards.ShardError, match=rf"{shard}: member {row['path']} has sha256 .* not the manifest"
    ):
        ingest(root, tmp_path / "out", seed=0, data=DATA)
    shard.write_bytes(bytes(data[: row["offset"]]))
    with pytest.raises(shards.ShardError, match=rf"{shard}: .* bytes, but .*truncated"):
        ingest(root, tmp_path / "out", seed=0, data=DATA)
    shard.unlink()
    with pytest.raises(shards.ShardError, match=rf"{shard}: shard not found .*dvc pull {root}/shards.dvc"):
        ingest(root, tmp_path / "out", seed=0, data=DATA)
    assert not (tmp_path / "out").exists()


def dvc(*args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@localhost", *args], cwd=cwd, check=True)


@pytest.mark.slow
def test_shards_round_trip_through_a_dvc_remote_and_changes_rerun_ingest(
    repo,  # noqa: F811  (the fixture imported above)
    tmp_path,
    small_shards,
    capsys,
):
    src = write_class_folders(tmp_path / "src", per_class=4, size=16)
    assert cli(["intake", str(src), "--name", "big", "--layout", "folder"]) == 0
    subprocess.run(
        capsys.readouterr().out.split("next: ")[1].split(" && dvc repro")[0], shell=True, check=True
    )
    git("commit", "-qm", "folder layout", cwd=repo)
    assert cli(["intake", str(src), "--name", "big", "--layout", "shards"]) == 0  # the same name, now sharded
    out = capsys.readouterr().out
    assert "3 tar shards" in out  # 12 files, 5 a shard
    subprocess.run(out.split("next: ")[1].split(" && dvc repro")[0], shell=True, check=True)  # as printed
    target = repo / "data" / "raw" / "big"
    assert not (repo / "data" / "raw" / "big.dvc").exists()  # dvc remove: DVC tracks the shards instead
    # the ingest stage's dependency, as dvc.yaml declares it
    (repo / "dvc.yaml").write_text(
        'stages:\n  ingest:\n    cmd: "true"\n    deps: ["${paths.raw}/${data.dataset}"]\n'
    )
    dvc("repro", cwd=repo)
    with open(repo / ".dvc" / "config", "a") as config:  # what dvc remote add -d writes, without its start-up
        config.write(f"[core]\n    remote = local\n['remote \"local\"']\n    url = {tmp_path / 'remote'}\n")
    dvc("push", cwd=repo)
    git("add", "dvc.yaml", "dvc.lock", ".dvc/config", cwd=repo)
    git("commit", "-qm", "sharded", cwd=repo)
    tracked = subprocess.run(
        ["git", "ls-files", "data"], cwd=repo, capture_output=True, text=True
    ).stdout.split()
    assert sorted(tracked) == [f"data/raw/big/{f}" for f in (".gitignore", "shards.csv", "shards.dvc")]

    clone = tmp_path / "clone"
    git("clone", "-q", str(repo), str(clone), cwd=tmp_path)
    dvc("pull", cwd=clone)
    for shard in (target / SHARDS_DIR).iterdir():
        assert (clone / "data" / "raw" / "big" / SHARDS_DIR / shard.name).read_bytes() == shard.read_bytes()

    manifest = target / SHARDS_CSV
    manifest.write_text(manifest.read_text().replace("alpha/alpha_00.png,alpha", "alpha/alpha_00.png,beta"))
    assert "modified:           data/raw/big" in dvc("status", "ingest", cwd=repo)
    git("checkout", "--", str(manifest), cwd=repo)
    assert "up to date" in dvc("status", "ingest", cwd=repo)
    with open(next((target / SHARDS_DIR).iterdir()), "ab") as shard:
        shard.write(b"\0" * 512)
    assert "modified:           data/raw/big" in dvc("status", "ingest", cwd=repo)


def test_intake_auto_layout_keeps_small_sets_as_folders(tmp_path, monkeypatch):
    src = write_class_folders(tmp_path / "src", per_class=4, size=16)
    assert not is_sharded(take_in(src, tmp_path / "small", "auto") / "set")
    monkeypatch.setattr(shards, "AUTO_MIN_FILES", 12)
    assert is_sharded(take_in(src, tmp_path / "large", "auto") / "set")


def test_data_exclude_names_members_by_their_path_in_the_set_or_in_splits_csv(tmp_path, small_shards):
    src = write_class_folders(tmp_path / "src", per_class=4, size=16)
    root = take_in(src, tmp_path, "shards") / "set"
    listed = tmp_path / "exclude.csv"
    listed.write_text(f"path\nalpha/alpha_00.png\n{root / 'beta' / 'beta_01.png'}\n")
    report = ingest(root, tmp_path / "out", seed=0, data=DATA, exclude=str(listed))
    assert report["excluded"]["paths"] == [
        str(root / "alpha" / "alpha_00.png"),
        str(root / "beta" / "beta_01.png"),
    ]
    assert report["n_images"] == 10 and not report["warnings"]


def test_members_with_long_or_non_ascii_names_are_found_at_their_offsets(tmp_path):
    names = [
        "a/short.png",
        "b/" + "é" * 60 + ".png",
        "c/" + "x" * 150 + ".jpg",
    ]  # PAX headers for the last two
    for i, name in enumerate(names):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_bytes(bytes([i]) * (700 + i))
    (tmp_path / "set").mkdir()
    files = [(n, tmp_path / "src" / n) for n in names]
    shards.pack(files, tmp_path / "set", pd.DataFrame({"label": ["a", "b", "c"]}), per_shard=2)
    table = shards.scan(tmp_path / "set")
    assert [shards.read(m) for m in shards.members(table)] == [f.read_bytes() for _, f in files]
    with tarfile.open(tmp_path / "set" / SHARDS_DIR / "shard-00000.tar") as tar:
        assert tar.getnames() == names[:2]


def test_a_sharded_intake_packs_what_the_copy_holds_and_a_failed_one_leaves_no_trace(tmp_path, small_shards):
    from tests.test_intake import write_patient_slices

    scans = tmp_path / "scans"
    write_patient_slices(scans, n_patients=3)
    folder, sharded = take_in(scans, tmp_path / "a", "folder"), take_in(scans, tmp_path / "b", "shards")
    copy = pd.read_csv(folder / "set" / "manifest.csv", dtype=str)  # DICOM groups, hashed, in the copy
    manifest = pd.read_csv(sharded / "set" / SHARDS_CSV, dtype=str)
    assert manifest[["path", "label", "group"]].equals(copy)
    for row in manifest.itertuples():  # each member is the source file's bytes
        assert (
            shards.read(
                shards.Member(
                    str(sharded / "set" / "shards" / row.shard),
                    row.path,
                    int(row.offset),
                    int(row.size),
                    row.sha256,
                )
            )
            == (scans / row.path).read_bytes()
        )
    before = {p: p.read_bytes() for p in (sharded / "set").rglob("*") if p.is_file()}
    (scans / "pneumonia" / "stolen.dcm").write_bytes((scans / "normal" / "normal_0_0.dcm").read_bytes())
    listed = {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()}
    with pytest.raises(DataError, match=r"normal_0_0\.dcm"):  # the same bytes under two labels
        take_in(scans, tmp_path / "b", "shards")
    assert {p: p.read_bytes() for p in (sharded / "set").rglob("*") if p.is_file()} == before
    assert {p: p.read_bytes() for p in scans.rglob("*") if p.is_file()} == listed  # the source untouched
    assert sorted(p.name for p in sharded.iterdir()) == ["set"]  # no staging left
