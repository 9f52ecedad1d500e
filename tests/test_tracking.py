import json
import os
import subprocess
from pathlib import Path

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


def test_long_param_values_go_to_artifacts_and_the_param_points_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp_id = tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
    transforms = [{"name": "Affine", "scale": [0.9, 1.1], "translate_percent": [-0.05, 0.05], "p": 0.5}] * 4
    params = config.parse({"augment": {"transforms": transforms}})
    with mlflow.start_run(experiment_id=exp_id) as run:
        tracking.log_params(params)
    logged = mlflow.get_run(run.info.run_id).data.params
    assert logged["augment.transforms"] == "see artifact params/augment.transforms.json"
    assert logged["evaluate.tta"] == '["HorizontalFlip", "VerticalFlip"]'  # short: stays a param
    assert all(len(v) <= tracking.MAX_PARAM_CHARS for v in logged.values())
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="params/augment.transforms.json",
                                               dst_path=str(tmp_path / "dl"))
    assert json.loads(Path(path).read_text()) == transforms


def test_log_dataset_is_the_runs_dataset_input_with_the_dvc_hash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp_id = tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
    version = "0123456789abcdef0123456789abcdef.dir"  # a DVC directory hash: 36 chars, MLflow's digest limit
    with mlflow.start_run(experiment_id=exp_id) as run:
        tracking.log_dataset(Path("data/raw/xray"), version)
    with mlflow.start_run(run_id=run.info.run_id):  # a resumed run logs it again: still one input
        tracking.log_dataset(Path("data/raw/xray"), version)
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert (dataset.name, dataset.digest, dataset.source_type) == ("xray", version, "local")
    assert json.loads(dataset.source) == {"uri": "data/raw/xray"}
    assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "training"}


def test_ui_url_opens_the_runs_table_of_the_params_experiment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tracking.ui_url("7") == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    (tmp_path / "params.yaml").write_text("mlflow: {experiment: mine}\n")
    uri = f"sqlite:///{tmp_path}/m.db"
    assert tracking.main(["--tracking-uri", uri, "--port", "5001"]) == 0
    exp_id = mlflow.get_experiment_by_name("mine").experiment_id
    assert capsys.readouterr().out.strip() == \
        f"http://127.0.0.1:5001/#/experiments/{exp_id}/runs?workflowType=machine_learning"


def test_stages_in_one_process_log_to_each_projects_own_store(tmp_path, monkeypatch):
    """A relative sqlite URI is resolved per project, and MLflow's export of the URI to the environment is
    undone (it would otherwise win over the next project's params)."""

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        tracking.setup(config.Tracking(experiment=f"exp-{name}"))
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / name / 'mlflow.db'}"
        assert "MLFLOW_TRACKING_URI" not in os.environ
    assert (tmp_path / "a" / "mlflow.db").is_file() and (tmp_path / "b" / "mlflow.db").is_file()
    assert tracking.absolute_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"  # a server: as it is
