"""intake labels.csv --add: pool images move into the labelled set's train split, both re-versioned, all or nothing."""

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from pipeline import config, tracking
from pipeline.__main__ import main as cli
from pipeline.active import loop
from pipeline.data import rounds
from pipeline.data.ingest import ingest
from pipeline.data.intake import IntakeError
from pipeline.data.pooled import KEPT, POOL_CSV
from pipeline.data.prepared import REPORT_JSON, SPLITS_CSV, load_prepared
from pipeline.evaluation import rounds as curve
from pipeline.runinfo import MODEL_SHA_TAG
from pipeline.stages import evaluate as evaluate_stage
from pipeline.stages import intake as intake_stage
from pipeline.stages.tracked import open_tracking
from tests.conftest import write_class_folders
from tests.test_evaluation_stage import save_untrained_model, tiny_params
from tests.test_ingest import tree_digest
from tests.test_intake import repo  # noqa: F401  (the fixture: a git + DVC repository as the cwd)
from tests.test_pool import error_line, write_images


def _dvc_md5(path: Path) -> str:
    return yaml.safe_load(path.read_text())["outs"][0]["md5"]


def _dvc_file(root: str, layout: str) -> Path:
    """The .dvc file of the set or pool in ``root`` in ``layout``."""
    return Path(root) / "shards.dvc" if layout == "shards" else Path(root + ".dvc")


def _project(tmp_path: Path, capsys, layout: str = "folder", pool_layout: str | None = None) -> pd.DataFrame:
    """A labelled set 'mine' (3 classes of 4) and a pool 'spare' of 8 images (one a copy of a labelled image),
    taken in with ``layout`` (the pool with ``pool_layout``, default the same), ingested and pooled; the pool
    stage's kept rows."""
    src = write_class_folders(tmp_path / "labelled", per_class=4, size=16)
    assert cli(["intake", str(src), "--name", "mine", "--layout", layout]) == 0
    pool_src = tmp_path / "unlabelled"
    write_images(pool_src, [f"ward{i % 2}/{i}.png" for i in range(7)], seed=5)
    shutil.copy(src / "alpha" / "alpha_00.png", pool_src / "copy.png")  # the pool stage leaves it out
    assert (
        cli(["intake", str(pool_src), "--unlabelled", "--name", "spare", "--layout", pool_layout or layout])
        == 0
    )
    assert cli(["ingest"]) == 0 and cli(["pool"]) == 0
    capsys.readouterr()
    table = pd.read_csv(Path("data/pool") / POOL_CSV, dtype=str, keep_default_na=False)
    return table[table["status"] == KEPT].reset_index(drop=True)


def _state() -> dict[str, str]:
    """Everything an add may touch: both folders and the .dvc files and params beside them."""
    files = [Path("params.yaml"), *Path("data/raw").glob("*.dvc"), *Path("data/unlabelled").glob("*.dvc")]
    return {
        "raw": tree_digest(Path("data/raw")),
        "unlabelled": tree_digest(Path("data/unlabelled")),
        **{str(f): f.read_text() for f in files},
    }


@pytest.mark.parametrize(
    ("layout", "pool_layout"), [("folder", "folder"), ("shards", "shards"), ("folder", "shards")]
)
def test_add_moves_images_into_the_train_split_and_versions_both(repo, tmp_path, capsys, layout, pool_layout):  # noqa: F811
    kept = _project(tmp_path, capsys, layout, pool_layout)
    before = pd.read_csv("data/prepared/" + SPLITS_CSV, dtype=str, keep_default_na=False)
    set_dvc, pool_dvc = _dvc_file("data/raw/mine", layout), _dvc_file("data/unlabelled/spare", pool_layout)
    hashes = _dvc_md5(set_dvc), _dvc_md5(pool_dvc)
    stage = {"cmd": "true", "deps": ["data/raw/mine", "data/unlabelled/spare"]}  # as ingest's and pool's deps
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"reads": stage}}))
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], check=True, capture_output=True)
    picked = kept.iloc[:3]
    (tmp_path / "labels.csv").write_text(
        "path,label\n"
        + "".join(f"{p},{c}\n" for p, c in zip(picked["path"], ["beta", "gamma", "beta"], strict=True))
    )
    assert cli(["intake", str(tmp_path / "labels.csv"), "--add"]) == 0
    out = capsys.readouterr().out
    assert "3 images from pool spare" in out and "round 2" in out and "dvc repro" in out
    assert _dvc_md5(set_dvc) != hashes[0] and _dvc_md5(pool_dvc) != hashes[1]  # both re-versioned
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "reads"], capture_output=True, text=True)
    assert "modified:           data/raw/mine" in status.stdout, status.stdout  # dvc repro reruns
    assert "modified:           data/unlabelled/spare" in status.stdout
    assert cli(["ingest"]) == 0 and cli(["pool"]) == 0
    after = pd.read_csv("data/prepared/" + SPLITS_CSV, dtype=str, keep_default_na=False)
    added = after[after["sha256"].isin(picked["sha256"])]
    assert len(added) == 3 and set(added["split"]) == {"train"}
    assert sorted(added["label"]) == ["beta", "beta", "gamma"]
    held = ["path", "label", "split", "sha256"]  # val and test exactly as they were
    assert (
        after.loc[after["split"] != "train", held]
        .sort_values("path")
        .reset_index(drop=True)
        .equals(before.loc[before["split"] != "train", held].sort_values("path").reset_index(drop=True))
    )
    pool = pd.read_csv(Path("data/pool") / POOL_CSV, dtype=str, keep_default_na=False)
    assert len(pool) == 8 - 3 and not set(pool["sha256"]) & set(picked["sha256"])  # disjoint
    report = yaml.safe_load(Path("data/prepared/" + REPORT_JSON).read_text())
    assert report["active"] == {"round": 2, "added": 3}
    assert rounds.tags(Path("data/prepared")) == {
        "active/round": "2",
        "active/labels": str(int((before["split"] == "train").sum()) + 3),
    }
    if layout == pool_layout == "folder":  # params.yaml unchanged: not in the line
        assert (
            "next: git add data/raw/mine.dvc data/raw/.gitignore data/unlabelled/spare.dvc "
            "data/unlabelled/.gitignore && dvc repro" in out
        )
    if layout == "shards":  # the set's old shards untouched: DVC stores only the new one
        assert sorted(p.name for p in Path("data/raw/mine/shards").iterdir()) == [
            "shard-00000.tar",
            "shard-00001.tar",
        ]
        assert "data/raw/mine/rounds.json" in out  # in git beside shards.csv


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ("path,label\ndata/unlabelled/elsewhere/1.png,beta\n", "is not in the pool"),
        ("path,label\n{0},delta\n", "label 'delta' is not a class of mine"),
        ("path,label\n{0},beta\n{0},gamma\n", "labelled both 'beta' and 'gamma'"),
        ("path,label\n{0},beta\n{0},beta\n", "listed twice"),
        ("path,class\n{0},beta\n", "columns must be path,label"),
        ("path,label\n{0},\n", "no label for"),
        ("path,label\n{copy},alpha\n", "the pool stage left it out"),
    ],
)
def test_a_bad_labels_csv_is_one_error_line_and_nothing_changes(repo, tmp_path, capsys, rows, named):  # noqa: F811
    kept = _project(tmp_path, capsys)
    copy = Path("data/unlabelled/spare/copy.png").as_posix()
    (tmp_path / "labels.csv").write_text(rows.format(kept["path"].iloc[0], copy=copy))
    state = _state()
    assert cli(["intake", str(tmp_path / "labels.csv"), "--add"]) == 2
    line = error_line(capsys)
    assert "labels.csv" in line and named in line
    assert _state() == state
    assert not [p for p in Path("data/raw").iterdir() if ".staging-" in p.name]


def test_a_file_changed_since_it_was_suggested_is_refused(repo, tmp_path, capsys):  # noqa: F811
    kept = _project(tmp_path, capsys)
    changed = Path(kept["path"].iloc[1])
    write_images(changed.parent, [changed.name], seed=99)  # new bytes under the suggested path
    (tmp_path / "labels.csv").write_text(f"path,label\n{kept['path'].iloc[0]},beta\n{changed},gamma\n")
    state = _state()
    assert cli(["intake", str(tmp_path / "labels.csv"), "--add"]) == 2
    line = error_line(capsys)
    assert "line 3" in line and "changed since it was suggested" in line
    assert _state() == state


def test_a_failed_dvc_add_puts_set_pool_and_dvc_files_back(repo, tmp_path, capsys, monkeypatch):  # noqa: F811
    kept = _project(tmp_path, capsys)
    (tmp_path / "labels.csv").write_text(f"path,label\n{kept['path'].iloc[0]},beta\n")
    state = _state()
    real = intake_stage.dvc_add

    def dvc_add(target: Path) -> list[Path]:  # the set is versioned, then DVC fails on the pool
        if target.parent.name == "unlabelled":
            raise IntakeError("dvc add data/unlabelled/spare failed: lock held by another process")
        return real(target)

    monkeypatch.setattr(intake_stage, "dvc_add", dvc_add)
    assert cli(["intake", str(tmp_path / "labels.csv"), "--add"]) == 2
    assert "lock held" in error_line(capsys)
    assert _state() == state
    assert not [p for p in Path("data/raw").iterdir() if p.name.startswith(".mine")]  # no staging, no .old


def test_add_needs_a_pool_and_a_set_of_ones_own(repo, tmp_path, capsys):  # noqa: F811
    (tmp_path / "labels.csv").write_text("path,label\na.png,beta\n")
    assert cli(["intake", str(tmp_path / "labels.csv"), "--add"]) == 2
    assert "demo stage's output" in error_line(capsys)
    assert cli(["intake", str(tmp_path / "labels.csv"), "--add", "--name", "x"]) == 2
    assert "takes no --name" in error_line(capsys)


# --- each round visible: MLflow tags and the curve by round -------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An MLflow store of its own in tmp_path, as the active experiment."""
    previous = mlflow.get_tracking_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.setup(config.Tracking(tracking_uri="sqlite:///m.db", experiment="e", artifact_root="art"))
    yield tmp_path
    mlflow.set_tracking_uri(previous)


def _evaluation(dataset: str, round_number: int, labels: int, accuracy: float) -> None:
    tags = {"stage": "evaluate", "data.dataset": dataset, "active/round": str(round_number)}
    with mlflow.start_run(tags=tags | {"active/labels": str(labels)}):
        mlflow.log_metrics({"test/accuracy": accuracy, "test/balanced_accuracy": accuracy - 0.1})


def test_the_curve_takes_each_rounds_latest_evaluation_and_needs_two_rounds(store):
    _evaluation("mine", 1, 6, 0.5)
    _evaluation("mine", 1, 6, 0.6)  # evaluated again: the latest counts
    _evaluation("other", 2, 9, 0.9)  # another data set
    found = curve.earlier("mine")
    assert found[["round", "labels", "accuracy"]].values.tolist() == [[1, 6, 0.6]]
    alone = curve.points(found.iloc[:0], 1, 6, {"test/accuracy": 0.6})
    assert curve.curve_png(alone) is None  # one round: nothing to draw
    table = curve.points(found, 2, 9, {"test/accuracy": 0.7, "test/balanced_accuracy": 0.65})
    assert table[["round", "labels", "accuracy"]].values.tolist() == [[1, 6, 0.6], [2, 9, 0.7]]
    png = curve.curve_png(table)
    assert png is not None and png.startswith(b"\x89PNG")


def test_the_evaluate_run_carries_round_and_labels_and_the_report_its_curve(store):
    params = tiny_params()
    raw, prepared = Path(params.paths.raw) / "tiny", Path(params.paths.prepared)
    write_class_folders(raw, per_class=8)
    ingest(raw, prepared, seed=0, data=params.data)
    tracking.setup(params.mlflow)
    sha = save_untrained_model(params, load_prepared(prepared).classes)
    with mlflow.start_run(run_name="train", tags={"stage": "train", MODEL_SHA_TAG: sha}):
        pass
    evaluate_stage.main(params, argparse.Namespace())
    plots = Path(params.paths.plots)
    assert not (plots / curve.CURVE_PNG).exists()  # round 1 only
    rounds.write(raw, [{"round": 2, "added": 0, "paths": []}])  # as intake --add leaves it
    ingest(raw, prepared, seed=0, data=params.data)
    assert open_tracking(params)["active/round"] == "2"
    evaluate_stage.main(params, argparse.Namespace())
    runs = mlflow.search_runs(filter_string="tags.stage = 'evaluate'", output_format="list")
    assert sorted(r.data.tags["active/round"] for r in runs) == ["1", "2"]
    assert {r.data.tags["active/labels"] for r in runs} == {"12"}  # 8 per class, 4 in train
    assert (plots / curve.CURVE_PNG).is_file()
    assert f"]({plots.name}/{curve.CURVE_PNG})" in Path(params.paths.report).read_text()


def test_suggest_csv_with_a_label_column_is_a_labels_csv(tmp_path):
    csv = tmp_path / "suggest.csv"
    csv.write_text("path,rank,score,predicted,probability,why,label\np/a.png,1,0.3,beta,0.6,margin, gamma \n")
    table = loop.read_labels(csv)
    assert table[["path", "label", "line"]].values.tolist() == [["p/a.png", "gamma", 2]]


def test_added_names_never_overwrite_a_file_of_the_set(tmp_path):
    (tmp_path / "beta").mkdir()
    (tmp_path / "beta" / "x.png").write_bytes(b"unlisted but there")
    table = pd.DataFrame({"path": ["beta/X_1.png"], "label": ["beta"]})
    picks = [loop._Pick(2 + i, "beta", f"ward{i}/x.png", "", tmp_path / "f") for i in range(2)]
    assert loop._names(table, picks, tmp_path) == ["beta/x_2.png", "beta/x_3.png"]
