import hashlib
import json
import os
import subprocess
from pathlib import Path

import mlflow
import pytest

from pipeline import config, tracking
from pipeline.__main__ import main as cli


def test_data_version_from_dvc_file_and_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "xray.dvc").write_text("outs:\n- md5: abc123.dir\n  path: xray\n")
    assert tracking.data_version(raw / "xray") == "abc123.dir"
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  demo:\n    cmd: x\n    outs:\n    - path: data/raw/demo\n      md5: def456.dir\n"
    )
    assert tracking.data_version(Path("data/raw/demo")) == "def456.dir"
    assert tracking.data_version(Path("data/raw/other")) == "unversioned"
    (raw / "big").mkdir()
    (raw / "big" / "shards.csv").write_text("path,label,sha256,shard,offset,size\n")
    assert (
        tracking.data_version(raw / "big")
        == "md5:" + hashlib.md5(b"path,label,sha256,shard,offset,size\n").hexdigest()
    )


def test_lineage_tags_in_a_git_repo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def run(*a: str) -> None:
        subprocess.run(["git", *a], check=True, capture_output=True, env=os.environ | env)

    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("commit", "-qm", "x")
    tags = tracking.lineage_tags(tmp_path / "data" / "raw" / "demo", "exp-1")
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] == "false"
    assert tags["dvc.exp_name"] == "exp-1" and tags["data.dataset"] == "demo"
    (tmp_path / "f").write_text("2")
    assert tracking.lineage_tags(tmp_path / "x", None)["git.dirty"] == "true"


def test_the_code_version_is_the_last_commit_of_the_code_not_of_the_outputs(tmp_path, monkeypatch):
    """The report names the commit of what the pipeline runs: a later commit of dvc.lock or reports/ (the demo's
    outputs recorded) leaves it as it was, so a fresh clone's make demo writes the same report."""
    monkeypatch.chdir(tmp_path)
    env = os.environ | {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@t"}

    def run(*a: str) -> str:
        return subprocess.run(["git", *a], check=True, capture_output=True, text=True, env=env).stdout.strip()

    run("init", "-q")
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "stage.py").write_text("1")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    run("add", ".")
    run("commit", "-qm", "code")
    code = run("rev-parse", "HEAD")
    (tmp_path / "dvc.lock").write_text("stages: {}\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "report.md").write_text("# r\n")
    run("add", ".")
    run("commit", "-qm", "outputs")
    assert run("rev-parse", "HEAD") != code
    assert tracking.code_version() == (code, False)
    (tmp_path / "dvc.lock").write_text("stages: {x: 1}\n")  # outputs changing: still the clean code
    assert tracking.code_version() == (code, False)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    assert tracking.code_version() == (code, True)
    run("checkout", "-q", "params.yaml")
    (tmp_path / "pipeline" / "new.py").write_text("2")  # a new module not yet committed
    assert tracking.code_version() == (code, True)
    monkeypatch.chdir(tmp_path.parent)  # no repository here
    assert tracking.code_version() == ("unknown", None)


def test_model_run_is_the_newest_train_run_tagged_with_the_sha_and_names_both_when_none(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    try:
        tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
        sha = "ab" * 32
        with mlflow.start_run(tags={"stage": "train", "model.sha256": sha}):
            pass
        with (
            mlflow.start_run(tags={"stage": "train", "model.sha256": sha}) as newest,
            mlflow.start_run(nested=True, tags={"stage": "evaluate", "model.sha256": sha}),
        ):
            pass
        with mlflow.start_run(tags={"stage": "train", "model.sha256": "cd" * 32}):
            pass
        assert tracking.model_run(sha).info.run_id == newest.info.run_id
        with pytest.raises(
            tracking.TrackingError, match=f"model.sha256 = {'ef' * 32} in the store sqlite:///{tmp_path}/m.db"
        ):
            tracking.model_run("ef" * 32)
        with pytest.raises(tracking.TrackingError, match=r"records no model_sha256.*dvc repro train"):
            tracking.model_run("")
    finally:
        mlflow.set_tracking_uri(previous)


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
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="params/augment.transforms.json", dst_path=str(tmp_path / "dl")
    )
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
    assert cli(["tracking", "--tracking-uri", uri, "--port", "5001"]) == 0
    exp_id = mlflow.get_experiment_by_name("mine").experiment_id
    assert (
        capsys.readouterr().out.strip()
        == f"http://127.0.0.1:5001/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    )


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


def test_a_moved_project_keeps_its_store_and_artifacts_in_its_own_folder(tmp_path, monkeypatch):
    """The experiment's artifact location follows the project: new runs write into the moved folder, and
    the runs logged before the move are read from it (the old folder is gone)."""
    cfg = config.Tracking(tracking_uri="sqlite:///mlflow.db", experiment="e", artifact_root="mlartifacts")
    old = tmp_path / "project"
    old.mkdir()
    monkeypatch.chdir(old)
    exp_id = tracking.setup(cfg)
    with mlflow.start_run(experiment_id=exp_id) as before:
        mlflow.log_text("logged before the move", "note.txt")
    monkeypatch.chdir(tmp_path)
    new = tmp_path / "moved"
    old.rename(new)
    monkeypatch.chdir(new)
    exp_id = tracking.setup(cfg)
    assert mlflow.get_experiment(exp_id).artifact_location == (new / "mlartifacts").as_uri()
    with mlflow.start_run(experiment_id=exp_id) as after:
        mlflow.log_text("logged after", "note.txt")
    assert after.info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    assert mlflow.get_run(before.info.run_id).info.artifact_uri.startswith((new / "mlartifacts").as_uri())
    assert mlflow.artifacts.load_text(f"runs:/{before.info.run_id}/note.txt") == "logged before the move"
    assert not old.exists()
    elsewhere = tmp_path / "temporary_copy"  # dvc queue: a copy of the project logging to the shared store
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    tracking.setup(cfg, env_uri=f"sqlite:///{new}/mlflow.db")
    assert mlflow.get_experiment(exp_id).artifact_location == (new / "mlartifacts").as_uri()


def test_an_unreachable_tracking_server_is_one_quick_error_naming_it(tmp_path, monkeypatch, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(
        tracking.TrackingError, match=rf"{uri} \(from MLFLOW_TRACKING_URI\) cannot be reached"
    ):
        tracking.setup(config.Tracking(), env_uri=uri)
    with pytest.raises(tracking.TrackingError, match=r"from mlflow.tracking_uri in params.yaml"):
        tracking.setup(config.Tracking(tracking_uri=uri))
    assert time.monotonic() - start < 2 * tracking.PROBE_TIMEOUT_S
    from tests.conftest import write_tiny_params

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    write_tiny_params(tmp_path / "params.yaml")
    assert cli(["tune"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("error: MLflow tracking server")
        and "MLFLOW_TRACKING_URI" in err[0]
    )


def test_no_credential_reaches_mlflow_params_or_messages(tmp_path, monkeypatch):
    from pipeline.credentials import redact

    for secret, text in (
        ("hunter2", "postgresql://u:hunter2@127.0.0.1:5432/optuna"),
        ("pw", "http://u:pw@127.0.0.1:5000"),
        ("abc", "https://127.0.0.1/x?token=abc&n=1"),
        ("s3cr3t", "x?a=1&api_key=s3cr3t"),
        ("hunter2", "model.weights: file 'https:/u:hunter2@example.org/w.pth' not found"),  # via Path
    ):
        assert secret not in redact(text) and "***" in redact(text)
    assert redact("postgresql://postgres@127.0.0.1:5432/db") == "postgresql://postgres@127.0.0.1:5432/db"
    monkeypatch.chdir(tmp_path)
    exp_id = tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
    # A params object built around the params.yaml check (which refuses these, see test_config.py).
    params = config.parse({})
    tune = object.__new__(config.Tune)
    object.__setattr__(
        tune, "__dict__", {**params.tune.__dict__, "storage": "postgresql://u:hunter2@db/optuna"}
    )
    object.__setattr__(params, "tune", tune)
    with mlflow.start_run(experiment_id=exp_id) as run:
        tracking.log_params(params)
    logged = mlflow.get_run(run.info.run_id).data.params
    assert logged["tune.storage"] == "postgresql://u:***@db/optuna"
    assert "hunter2" not in mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/params.json")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "locked"])
def test_a_damaged_or_locked_local_store_is_one_error_naming_it(tmp_path, monkeypatch, damage):
    import sqlite3

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    cfg = config.Tracking(tracking_uri=f"sqlite:///{store}", experiment="e")
    holder = None
    if damage == "garbage":
        store.write_bytes(b"not a database at all, " * 400)
    else:
        tracking.setup(cfg)  # a real store, then cut short or held by another writer
        if damage == "truncated":
            store.write_bytes(store.read_bytes()[: store.stat().st_size // 3])
        else:
            holder = sqlite3.connect(store, isolation_level=None, timeout=0)
            holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(tracking.TrackingError) as err:
            tracking.setup(cfg)
    finally:
        if holder is not None:
            holder.close()
    words = {"garbage": "damaged or not a database", "truncated": "damaged", "locked": "another process"}
    assert str(err.value).startswith(f"MLflow tracking store sqlite:///{store} (from mlflow.tracking_uri)")
    assert words[damage] in str(err.value)
