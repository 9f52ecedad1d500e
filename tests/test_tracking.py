import os
import subprocess

import mlflow
import pytest

from pipeline import config, tracking


def test_data_version_from_dvc_file_and_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "xray.dvc").write_text("outs:\n- md5: abc123.dir\n  path: xray\n")
    assert tracking.data_version(raw / "xray") == "abc123.dir"
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  demo:\n    cmd: x\n    outs:\n    - path: data/raw/demo\n      md5: def456.dir\n")
    from pathlib import Path
    assert tracking.data_version(Path("data/raw/demo")) == "def456.dir"
    assert tracking.data_version(Path("data/raw/other")) == "unversioned"


def test_lineage_tags_in_a_git_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run = lambda *a: subprocess.run(["git", *a], check=True, capture_output=True, env=os.environ | env)
    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("commit", "-qm", "x")
    tags = tracking.lineage_tags(tmp_path / "data" / "raw" / "demo", "exp-1")
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] == "false"
    assert tags["dvc.exp_name"] == "exp-1" and tags["data.dataset"] == "demo"
    (tmp_path / "f").write_text("2")
    assert tracking.lineage_tags(tmp_path / "x", None)["git.dirty"] == "true"


def test_setup_creates_a_training_experiment_with_local_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e", artifact_root="arts")
    exp_id = tracking.setup(cfg)
    assert tracking.setup(cfg) == exp_id  # idempotent
    exp = mlflow.get_experiment(exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "arts").as_uri()
    with mlflow.start_run(experiment_id=exp_id):
        tracking.log_params(config.parse({}))
    run = mlflow.search_runs([exp_id], output_format="list")[0]
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.arch"] == "resnet18"
