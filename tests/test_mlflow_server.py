"""A real `mlflow server` on 127.0.0.1: a tiny pipeline logs to it over HTTP; its REST API shows what arrived."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlencode
from urllib.request import Request, urlopen

import pytest
from conftest import in_project, run_stages, write_tiny_params

DATA_HASH = "0123456789abcdef0123456789abcdef.dir"  # as `dvc add data/raw/demo` would record it
STARTUP_S = 60

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, endpoint: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    with urlopen(
        Request(url, data=data, headers={"Content-Type": "application/json"}), timeout=30
    ) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with a SQLite store and proxied artifacts; stopped (its process group) on teardown."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/m.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert proc.poll() is None, f"mlflow server exited:\n{(root / 'server.log').read_text()[-3000:]}"
            try:
                with urlopen(f"{base}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (URLError, OSError):
                pass
            assert time.monotonic() < deadline, (
                f"no /health answer in {STARTUP_S} s:\n{(root / 'server.log').read_text()[-3000:]}"
            )
            time.sleep(0.5)
        yield base, root / "artifacts"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def pipeline_run(server, tmp_path_factory):
    """Every stage, in process, in a tmp project with tiny params, tracking to the server over HTTP."""
    base, _ = server
    root = tmp_path_factory.mktemp("project")
    write_tiny_params(root / "params.yaml")
    with in_project(root, tracking_uri=base):
        run_stages("demo", "ingest", "augment")
        (root / "data" / "raw" / "demo.dvc").write_text(f"outs:\n- md5: {DATA_HASH}\n  path: demo\n")
        run_stages("tune", "train", "evaluate")
    experiment = api(base, "experiments/get-by-name", experiment_name="pipeline")["experiment"]
    runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})[
        "runs"
    ]
    return base, experiment, runs, json.loads((root / "models" / "run.json").read_text())


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def by_stage(runs: list[dict], stage: str) -> list[dict]:
    return [r for r in runs if tags(r).get("stage") == stage]


def test_experiment_is_a_training_experiment(pipeline_run):
    _, experiment, _, _ = pipeline_run
    assert {t["key"]: t["value"] for t in experiment["tags"]}[
        "mlflow.experimentKind"
    ] == "custom_model_development"


def test_tune_parent_has_nested_trials_and_the_dataset_input(pipeline_run):
    base, _, runs, _ = pipeline_run
    [parent], trials = by_stage(runs, "tune"), by_stage(runs, "tune-trial")
    assert len(trials) == 2
    assert {tags(t)["mlflow.parentRunId"] for t in trials} == {parent["info"]["run_id"]}
    assert {tags(t)["optuna.state"] for t in trials} <= {"complete", "pruned"}
    for trial in trials:
        history = api(base, "metrics/get-history", run_id=trial["info"]["run_id"], metric_key="val/loss")
        assert len(history["metrics"]) == 1  # tune.max_epochs: 1
    [dataset_input] = parent["inputs"]["dataset_inputs"]
    dataset = dataset_input["dataset"]
    assert (dataset["name"], dataset["digest"], dataset["source_type"]) == ("demo", DATA_HASH, "local")
    assert json.loads(dataset["source"]) == {"uri": "data/raw/demo"}
    assert tags(parent)["data.version"] == DATA_HASH


def test_train_run_has_params_metric_history_and_test_metrics(pipeline_run):
    base, _, runs, info = pipeline_run
    [train] = by_stage(runs, "train")
    # run.json names the model by its sha256 (a DVC output holds no run id); the train run carries it as a tag
    assert tags(train)["model.sha256"] == info["model_sha256"] and "run_id" not in info
    info = info | {"run_id": train["info"]["run_id"]}
    params = {p["key"]: p["value"] for p in train["data"]["params"]}
    assert params["train.max_epochs"] == "2" and params["model.arch"] == "resnet18"
    latest = {m["key"]: m["value"] for m in train["data"]["metrics"]}
    assert "val/auroc" in latest
    [evaluation] = by_stage(runs, "evaluate")  # the test metrics: a run nested under the train run
    assert tags(evaluation)["mlflow.parentRunId"] == info["run_id"]
    assert 0.0 <= {m["key"]: m["value"] for m in evaluation["data"]["metrics"]}["test/accuracy"] <= 1.0
    history = api(base, "metrics/get-history", run_id=info["run_id"], metric_key="val/loss")["metrics"]
    assert len(history) == info["epochs_run"] and len({m["step"] for m in history}) == len(history)


def test_train_artifacts_arrived_through_the_server(pipeline_run, server):
    base, _, runs, info = pipeline_run
    _, artifacts_dir = server
    [train] = by_stage(runs, "train")  # run.json names the model by its sha256, the train run by its tag
    info = info | {"run_id": train["info"]["run_id"]}
    listed = {f["path"] for f in api(base, "artifacts/list", run_id=info["run_id"]).get("files", [])}
    assert {"preview.png", "params.json", "run.json"} <= listed
    [child] = by_stage(runs, "evaluate")
    evaluation = {
        f["path"]
        for f in api(base, "artifacts/list", run_id=child["info"]["run_id"], path="evaluation")["files"]
    }
    assert {
        "evaluation/metrics.json",
        "evaluation/report.md",
        "evaluation/plots",  # the report's images, where its relative links point
    } <= evaluation
    # Proxied artifacts: the bytes are in the server's --artifacts-destination, not in the client's folder.
    assert any(
        p.name == "preview.png" and info["run_id"] in str(p) for p in artifacts_dir.rglob("preview.png")
    )
