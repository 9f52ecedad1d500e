"""Cross-validation (data.folds): fold models, out-of-fold predictions, the ensemble that ships, resume mid-fold."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import tracking
from pipeline.data.prepared import load_prepared
from pipeline.runinfo import OOF_CSV, member_name, model_sha256
from pipeline.serve import export, shipped
from tests.conftest import REPO, in_project, kill_when_ready, run_stages, write_tiny_params

FOLDS = 2
SETTINGS = {
    "data": {"folds": FOLDS},
    "tune": {"enabled": False},
    "train": {"max_epochs": 2, "patience": 2},
    "evaluate": {"bootstrap": 50, "gradcam_per_class": 1},
}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny demo project trained and evaluated with 2 folds, in process."""
    root = tmp_path_factory.mktemp("cv")
    write_tiny_params(root / "params.yaml", **SETTINGS)
    with in_project(root):
        run_stages("demo", "ingest", "augment", "tune", "train", "evaluate")
    return root


def test_oof_covers_every_train_and_val_image_once_and_no_group_spans_two_folds(project):
    prepared = load_prepared(project / "data" / "prepared")
    oof = pd.read_csv(project / "models" / OOF_CSV)
    pool = prepared.table[prepared.table["split"] != "test"]
    assert sorted(oof["cache_index"]) == sorted(pool["cache_index"])  # each exactly once, no test image
    assert oof.set_index("cache_index")["fold"].to_dict() == pool.set_index("cache_index")["fold"].to_dict()
    # Ingest's units (here: exact and near duplicates, the demo's only groups) never straddle two folds.
    by_hash = pool.groupby("sha256")["fold"].nunique()
    assert (by_hash == 1).all()
    probs = oof[[f"prob_{c}" for c in prepared.classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)


def test_the_shipped_model_is_the_mean_of_the_fold_members(project):
    run = json.loads((project / "models" / "run.json").read_text())
    assert run["checkpoints"] == [member_name(i) for i in range(FOLDS)] and len(run["folds"]) == FOLDS
    assert run["model_sha256"] == model_sha256(project / "models" / member_name(i) for i in range(FOLDS))
    trained = shipped.load_trained(project / "models")
    images = load_prepared(project / "data" / "prepared").images[:6]
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        ensemble = trained.model(x).softmax(-1)
        members = torch.stack([m(x).softmax(-1) for m in trained.model.members]).mean(0)
        assert not torch.allclose(trained.model.members[0](x), trained.model.members[1](x))  # two real models
    torch.testing.assert_close(ensemble, members, atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_the_exported_ensemble_equals_the_in_process_one(project, tmp_path):
    import onnxruntime

    trained = shipped.load_trained(project / "models")
    images = np.asarray(load_prepared(project / "data" / "prepared").images[:5])
    with torch.no_grad():
        expected = trained.model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).softmax(-1).numpy()
    scripted = torch.jit.load(str(export.export(trained, "torchscript", tmp_path / "m.pt")))
    with torch.no_grad():
        np.testing.assert_allclose(scripted(torch.from_numpy(images)).numpy(), expected, atol=1e-5)
    session = onnxruntime.InferenceSession(
        str(export.export(trained, "onnx", tmp_path / "m.onnx")), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(session.run(None, {"images": images})[0], expected, atol=1e-5)


def test_cv_metrics_reach_metrics_json_the_report_and_nested_mlflow_runs(project):
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    detail = json.loads((project / "reports" / "metrics_detail.json").read_text())
    assert {"cv/accuracy", "cv/auroc", "test/accuracy"} <= set(metrics)  # the headline file DVC shows
    assert {"cv/accuracy_fold_mean", "cv/accuracy_fold_std"} <= set(detail)
    assert "## Cross-validation" in (project / "reports" / "report.md").read_text()
    run = json.loads((project / "models" / "run.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    client = mlflow.MlflowClient()
    parent = tracking.model_run(run["model_sha256"])  # the train run, tagged with the members' sha256
    assert "cv/accuracy" in parent.data.metrics and "test/accuracy" not in parent.data.metrics
    nested = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    children = [c for c in nested if c.data.tags.get("stage") != "evaluate"]
    (evaluated,) = [c for c in nested if c.data.tags.get("stage") == "evaluate"]  # the evaluation's own run
    assert "test/accuracy" in evaluated.data.metrics and "cv/accuracy" in evaluated.data.metrics
    assert sorted(c.data.tags["fold"] for c in children) == [str(i) for i in range(FOLDS)]
    for child in children:
        assert child.info.status == "FINISHED" and child.data.params["data.folds"] == str(FOLDS)
        assert "val/loss" in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id, "checkpoint")] == [
            "checkpoint/best.ckpt"
        ]


def test_changing_only_evaluate_keys_retrains_nothing(project):
    """evaluate.* is not a param of the train stage (dvc.yaml), so DVC reruns only evaluate."""
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "data.folds" in stages["train"]["params"]
    assert not any(str(p).startswith("evaluate") for p in stages["train"]["params"])


def test_a_run_killed_mid_fold_resumes_at_that_fold(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    write_tiny_params(root / "params.yaml", **(SETTINGS | {"train": {"max_epochs": 4, "patience": 4}}))
    with in_project(root):
        run_stages("demo", "ingest", "augment", "tune")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env |= {"PYTHONPATH": str(REPO), "TORCH_HOME": str(root / "torch")}
    resume = root / ".models.resume"
    kill_when_ready(  # fold 0 done, fold 1 begun
        [sys.executable, "-m", "pipeline", "train"],
        root,
        env,
        resume / "fold_1" / "checkpoints" / "last.ckpt",
    )
    fold_run = json.loads((resume / "fold_1" / "state.json").read_text())["run_id"]
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--params", "params.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "resuming MLflow run" in out and "fold 1/2" not in out and "fold 2/2" in out  # fold 0 kept
    assert not resume.exists()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    assert mlflow.get_run(fold_run).info.status == "FINISHED"  # fold 1 went on in its own run
    assert len(pd.read_csv(root / "models" / OOF_CSV)) == len(
        load_prepared(root / "data" / "prepared").table.query("split != 'test'")
    )
