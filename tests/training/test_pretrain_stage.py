"""The unlabelled pool through the stages, in process, in a project folder: pool -> pretrain -> train with
model.weights: pretrain and train.semi: fixmatch; the backbone loads bit for bit; a killed pretraining resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import config
from pipeline.data.prepared import load_prepared
from pipeline.runinfo import PRETRAIN_BACKBONE, Pretrained, RunInfo
from pipeline.training.fit import build_model
from tests.conftest import in_project, kill_when_ready, run_stages, write_class_folders, write_tiny_params

POOLED = {
    "data": {"dataset": "tiny", "unlabelled": "extra"},
    "pretrain": {"method": "simclr", "epochs": 2, "batch_size": 8, "knn_every": 1},
    "model": {"weights": "pretrain", "stem": "small"},
    "train": {"semi": "fixmatch", "semi_ratio": 1, "max_epochs": 1, "batch_size": 4},
    "tune": {"enabled": False},
    "evaluate": {"bootstrap": 0, "gradcam_per_class": 0, "label_audit_panel": 0},
    "mlflow": {"registered_model": None},
}


@pytest.fixture
def project(tmp_path) -> Path:
    root = tmp_path / "project"
    write_class_folders(root / "data" / "raw" / "tiny", per_class=8)
    rng = np.random.default_rng(9)
    (root / "data" / "unlabelled" / "extra" / "more").mkdir(parents=True)
    for i in range(16):
        image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "data" / "unlabelled" / "extra" / "more" / f"{i}.png")
    write_tiny_params(root / "params.yaml", **POOLED)
    return root


def test_the_pool_pretrains_a_backbone_that_train_starts_from_bit_for_bit(project):
    uri = f"sqlite:///{project}/mlflow.db"
    with in_project(project, tracking_uri=uri):
        run_stages("ingest", "pool", "augment", "pretrain")
        params = config.load(project / "params.yaml")
        record = Pretrained.read(project / "data" / "pretrain")
        assert record.method == "simclr" and record.epochs == 2
        assert record.images == 12 + 16  # the train split (half of 24) and the pool: never val or test
        assert record.knn_accuracy is not None
        prepared = load_prepared(project / "data" / "prepared")
        model, info = build_model(params, prepared.classes, dataset_stats=(prepared.mean, prepared.std))
        saved = torch.load(project / "data" / "pretrain" / PRETRAIN_BACKBONE, weights_only=True)["state_dict"]
        for key, tensor in model.net.state_dict().items():
            if not key.startswith("fc."):
                assert torch.equal(tensor, saved[f"net.{key}"]), key
        assert torch.equal(model.mean.flatten(), saved["mean"].flatten())
        assert info.pretrained and info.source.startswith("pretrain stage: simclr, 2 epochs")
        run_stages("tune", "train")
        run = RunInfo.read(project / "models")
        assert run.weights.source.startswith("pretrain stage") and run.weights.requested == "pretrain"
        runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
        pretrain = [r for r in runs if r.data.tags.get("stage") == "pretrain"]
        train = [r for r in runs if r.data.tags.get("stage") == "train"]
        assert len(pretrain) == 1 and "pretrain/knn_accuracy" in pretrain[0].data.metrics
        assert "pretrain/loss" in pretrain[0].data.metrics
        assert len(train) == 1 and "semi/confident" in train[0].data.metrics


def test_pretraining_off_writes_only_its_record_and_weights_pretrain_then_says_what_to_do(project):
    write_tiny_params(project / "params.yaml", **(POOLED | {"pretrain": {"method": "none"}}))
    with in_project(project):
        run_stages("ingest", "pool", "augment", "pretrain")
        assert Pretrained.read(project / "data" / "pretrain").method == "none"
        assert not (project / "data" / "pretrain" / PRETRAIN_BACKBONE).exists()
        from pipeline.__main__ import main as cli

        assert cli(["tune"]) == 0
        assert cli(["train"]) == 2  # one error line naming what to set


@pytest.mark.slow
def test_a_killed_pretraining_resumes_where_it_stopped(project):
    write_tiny_params(project / "params.yaml", **(POOLED | {"pretrain": POOLED["pretrain"] | {"epochs": 4}}))
    with in_project(project):
        run_stages("ingest", "pool", "augment")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    resume = project / "data" / ".pretrain.resume"
    kill_when_ready(
        [sys.executable, "-m", "pipeline", "pretrain"], project, env, resume / "checkpoints" / "last.ckpt"
    )
    state = json.loads((resume / "state.json").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "pretrain"], cwd=project, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming MLflow run {state['run_id']}" in done.stdout
    record = json.loads((project / "data" / "pretrain" / "pretrain.json").read_text())
    assert "run_id" not in record  # a DVC output: nothing that differs between two runs of the same inputs
    assert not resume.exists()  # cleared once finished
