"""The MLflow model registry on a real local SQLite store: a name per data set, lineage and metric tags on each
version, and the 'champion' alias that only `python -m pipeline promote` moves."""

import json
from pathlib import Path

import mlflow
import pytest

from pipeline import config, registry, tracking
from pipeline.__main__ import main as cli
from tests.conftest import run_info

SHA = "5e" * 32  # the trained model's sha256 (run.json), tagged on its train run and version
LINEAGE = {
    "model.sha256": SHA,
    "git.commit": "a" * 40,
    "git.dirty": "false",
    "data.dataset": "xray",
    "data.version": "abc123.dir",
    "dvc.exp_name": "exp-1",
}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A project folder with params.yaml pointing MLflow at a SQLite file in it; cwd is the folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("data:\n  dataset: xray\n")
    previous = mlflow.get_tracking_uri()
    tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"))
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(previous)


def new_version(client: mlflow.MlflowClient, name: str) -> tuple[str, str]:
    """A train run and the registry version it registered (as log_model's registered_model_name does)."""
    with mlflow.start_run(tags={"stage": "train", "model.sha256": SHA}) as run:
        mlflow.log_text("weights", "model/weights.txt")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    return run.info.run_id, str(version.version)


def test_one_registered_name_per_data_set_and_only_known_placeholders():
    params = config.parse({"data": {"dataset": "xray"}})
    assert params.mlflow.model_name("xray") == "pipeline-xray"
    assert config.parse({"mlflow": {"registered_model": "mine"}}).mlflow.model_name("xray") == "mine"
    assert config.parse({"mlflow": {"registered_model": None}}).mlflow.model_name("xray") is None
    for bad in ("pipeline-{data}", "a/b", "x{dataset"):
        with pytest.raises(config.ConfigError, match=r"mlflow\.registered_model"):
            config.parse({"mlflow": {"registered_model": bad}})


def evaluate_run(train_run_id: str, metrics: dict, threshold: str, exp: str | None = None) -> str:
    """An evaluate run nested under the train run, as the evaluate stage logs it; its id."""
    tags = {"stage": "evaluate"} | ({"dvc.exp_name": exp} if exp else {})
    with mlflow.start_run(run_id=train_run_id), mlflow.start_run(nested=True, tags=tags) as child:
        mlflow.log_params({"evaluate.threshold": threshold})
        mlflow.log_metrics(metrics)
    return child.info.run_id


def evaluated(client: mlflow.MlflowClient, name: str, run_id: str, metrics: dict, threshold: str, exp=None):
    """What the evaluate stage does: its nested run, then the version's tags from it (the latest wins)."""
    child = evaluate_run(run_id, metrics, threshold, exp)
    registry.tag_evaluated(client, name, run_id, metrics, registry.evaluation_tags(client.get_run(child)))
    return child


def test_versions_carry_lineage_then_metrics_and_only_promote_moves_the_alias(store, capsys):
    client, name = store, "pipeline-xray"
    run_id, version = new_version(client, name)
    registry.tag_trained(client, name, version, LINEAGE)
    tags = client.get_model_version(name, version).tags
    assert {k: tags[k] for k in registry.LINEAGE} == LINEAGE
    assert "abc123.dir" in client.get_model_version(name, version).description
    Path("models").mkdir()
    run_info(model_sha256=SHA).write(Path("models"))  # promote finds its train run by this tag
    Path("reports").mkdir()
    committed = {"test/accuracy": 0.91234, "test/sensitivity": 0.8}
    Path("reports/metrics.json").write_text(json.dumps(committed | {"weights/pretrained": True}))

    # Not evaluated yet: promote refuses, and no alias exists.
    assert cli(["promote"]) == 2
    assert "matches no evaluate run" in capsys.readouterr().err
    assert cli(["promote", "--version", version]) == 2
    assert "no test metrics" in capsys.readouterr().err
    assert not client.get_registered_model(name).aliases

    # The committed evaluation, then an evaluate-only experiment at another cut: the version's tags follow
    # the latest, each naming its evaluate run.
    first = evaluated(client, name, run_id, committed, "0.5")
    assert client.get_model_version(name, version).tags["test/accuracy"] == "0.9123"
    trial = {"test/accuracy": 0.91234, "test_threshold/sensitivity": 0.95}
    later = evaluated(client, name, run_id, trial, "sensitivity:0.95", exp="t95")
    tags = client.get_model_version(name, version).tags
    assert tags[registry.EVALUATED] == later and tags["evaluation.exp_name"] == "t95"
    assert "test/sensitivity" not in tags and tags["test_threshold/sensitivity"] == "0.9500"
    assert "sensitivity:0.95" in client.get_model_version(name, version).description

    # promote serves what the workspace holds (reports/metrics.json: the committed evaluation) and says so.
    assert cli(["promote"]) == 0
    assert f"models:/{name}@champion is now version {version}" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(name, registry.CHAMPION).version) == version
    tags = client.get_model_version(name, version).tags
    assert tags[registry.EVALUATED] == first and tags["evaluate.threshold"] == "0.5"
    assert "evaluation.exp_name" not in tags and "test_threshold/sensitivity" not in tags
    assert tags["test/sensitivity"] == "0.8000"

    # A later training registers a newer version: 'latest' moves, the champion does not.
    _, newer = new_version(client, name)
    registry.tag_trained(client, name, newer, LINEAGE | {"dvc.exp_name": "throwaway"})
    assert int(newer) > int(version)
    assert str(client.get_model_version_by_alias(name, registry.CHAMPION).version) == version
    assert cli(["promote", "--version", newer]) == 2  # not evaluated: refused
    assert str(client.get_model_version_by_alias(name, registry.CHAMPION).version) == version
    assert cli(["promote", "--version", "99"]) == 2
    assert "not found in the registry" in capsys.readouterr().err
