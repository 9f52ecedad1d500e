"""The real thing: `dvc repro` of the whole pipeline in a copy of the repository, with tiny params."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline import tracking
from tests.conftest import kill_when_ready

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "demo": {"n_per_class": 8, "image_size": 32},
    "data": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
    "model": {"weights": "none"},  # no network in tests; the download fallback is tested in test_weights
    "train": {"max_epochs": 2, "batch_size": 8},
    "tune": {"enabled": True, "n_trials": 2, "max_epochs": 1},
}

pytestmark = pytest.mark.slow


def sh(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of the project's files (as a fresh clone would have them), with tiny params."""
    root = tmp_path_factory.mktemp("e2e") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:{env['PATH']}",
        "TORCH_HOME": str(root.parent / "torch"),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    sh(["git", "init", "-q"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "copy"], root, env)
    first = sh(["dvc", "repro"], root, env)
    return root, env, first


def test_repro_runs_every_stage_and_writes_metrics(repo):
    root, _, first = repo
    for stage in ("demo", "ingest", "pool", "augment", "tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert 0.0 <= metrics[f"test/{name}"] <= 1.0
    assert metrics["weights/pretrained"] is False
    assert len(list((root / "data" / "raw" / "demo").rglob("*.png"))) == 4 * 8
    assert (root / "models" / "best.ckpt").is_file() and (root / "data" / "augment" / "preview.png").is_file()
    assert (root / "reports" / "plots" / "confusion_matrix.png").is_file()
    assert "Random initialization" in (root / "reports" / "report.md").read_text()


def test_mlflow_holds_tune_trials_and_one_train_run_with_lineage(repo):
    root, env, _ = repo
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.get_experiment_by_name("pipeline")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    stages = ("tune", "tune-trial", "train", "evaluate")
    by_stage = {s: [r for r in runs if r.data.tags.get("stage") == s] for s in stages}
    assert [len(by_stage[s]) for s in stages] == [1, 2, 1, 1]
    train, evaluated = by_stage["train"][0], by_stage["evaluate"][0]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    demo_hash = lock["stages"]["demo"]["outs"][0]["md5"]
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    assert train.data.tags["data.version"] == demo_hash
    assert train.data.tags["git.commit"] == head and train.data.tags["weights.pretrained"] == "false"
    assert train.data.params["train.max_epochs"] == "2"
    # The evaluation is a run of its own, nested under the train run, with the test metrics and the report.
    assert "val/loss" in train.data.metrics and not any(m.startswith("test") for m in train.data.metrics)
    assert evaluated.data.tags["mlflow.parentRunId"] == train.info.run_id
    assert "test/accuracy" in evaluated.data.metrics and evaluated.data.tags["data.version"] == demo_hash
    client = mlflow.MlflowClient()
    assert {"preview.png", "params.json"} <= {a.path for a in client.list_artifacts(train.info.run_id)}
    assert "evaluation/report.md" in {
        a.path for a in client.list_artifacts(evaluated.info.run_id, "evaluation")
    }
    assert (
        mlflow.search_logged_models([exp.experiment_id], output_format="list")[0].source_run_id
        == train.info.run_id
    )
    # The registered version (one name per data set) carries its lineage and its test metrics; no alias
    # until promote moves one.
    (version,) = client.search_model_versions("name = 'pipeline-demo'")
    assert version.run_id == train.info.run_id and version.tags["data.version"] == demo_hash
    assert version.tags["git.commit"] == head and version.tags["evaluation.run_id"] == evaluated.info.run_id
    sha = json.loads((root / "models" / "run.json").read_text())["model_sha256"]
    assert version.tags["model.sha256"] == train.data.tags["model.sha256"] == sha
    assert float(version.tags["test/accuracy"]) == pytest.approx(
        evaluated.data.metrics["test/accuracy"], abs=1e-4
    )
    assert not client.get_registered_model("pipeline-demo").aliases
    out = sh([sys.executable, "-m", "pipeline", "promote"], root, env)
    assert "models:/pipeline-demo@champion is now version 1" in out


def test_second_repro_is_a_noop_and_evaluate_params_rerun_only_evaluate(repo):
    root, env, _ = repo
    assert "up to date" in sh(["dvc", "status"], root, env)
    assert "Running stage" not in sh(["dvc", "repro"], root, env)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["batch_size"] = 7
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(["dvc", "repro"], root, env)
    assert out.count("Running stage") == 1 and "Running stage 'evaluate'" in out
    assert "up to date" in sh(["dvc", "status"], root, env)
    # The re-evaluation is a second evaluate run under the same train run; the first keeps its record.
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.get_experiment_by_name("pipeline")
    evaluations = mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.stage = 'evaluate'", output_format="list"
    )
    assert len(evaluations) == 2 and len({r.data.tags["mlflow.parentRunId"] for r in evaluations}) == 1
    assert sorted(r.data.params["evaluate.batch_size"] for r in evaluations) == ["64", "7"]


def test_taking_in_a_pool_reruns_only_what_reads_it(repo, tmp_path):
    """intake --unlabelled sets data.unlabelled: the pool stage reads it (its copy of a test image is out) and the
    pretrain stage looks at it; with pretraining and train.semi off that one's output is unchanged, so nothing
    downstream (tune, train, evaluate) reruns."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    root, env, _ = repo
    splits = pd.read_csv(root / "data" / "prepared" / "splits.csv")
    src = tmp_path / "spare"
    (src / "more").mkdir(parents=True)
    shutil.copy(root / splits.loc[splits["split"] == "test", "path"].iloc[0], src / "copy_of_test.png")
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3)).astype(np.uint8)
        Image.fromarray(pixels).save(src / "more" / f"{i}.png")
    sh([sys.executable, "-m", "pipeline", "intake", str(src), "--unlabelled", "--name", "spare"], root, env)
    out = sh(["dvc", "repro"], root, env)
    assert (
        out.count("Running stage") == 2
        and "Running stage 'pool'" in out
        and "Running stage 'pretrain'" in out
    )
    report = json.loads((root / "data" / "pool" / "report.json").read_text())
    assert report["n_kept"] == 3 and report["excluded"]["by_split"] == {"test": 1}
    assert "up to date" in sh(["dvc", "status"], root, env)


def test_dvc_exp_run_tags_its_runs_with_the_experiment_name(repo):
    root, env, _ = repo
    out = sh(["dvc", "exp", "run", "-n", "short-fit", "-S", "train.max_epochs=1"], root, env)
    assert "Running stage 'train'" in out and "Running stage 'ingest'" not in out
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.get_experiment_by_name("pipeline")
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.`dvc.exp_name` = 'short-fit'", output_format="list"
    )
    stages = sorted(r.data.tags["stage"] for r in runs)
    assert stages.count("train") == 1 and stages.count("evaluate") == 1 and "tune" in stages
    train = next(r for r in runs if r.data.tags["stage"] == "train")
    assert train.data.params["train.max_epochs"] == "1" and "short-fit" in train.info.run_name
    evaluated = next(r for r in runs if r.data.tags["stage"] == "evaluate")
    assert "test/accuracy" in evaluated.data.metrics and "short-fit" in evaluated.info.run_name
    # The experiment's model is a new version, tagged with the experiment; the champion does not move.
    client = mlflow.MlflowClient()
    newest = max(client.search_model_versions("name = 'pipeline-demo'"), key=lambda v: int(v.version))
    assert newest.run_id == train.info.run_id and newest.tags["dvc.exp_name"] == "short-fit"
    champion = client.get_registered_model("pipeline-demo").aliases.get("champion")
    assert champion is None or str(champion) != str(newest.version)


def test_ddp_on_two_cpu_processes_makes_one_run_and_one_checkpoint(repo):
    root, env, _ = repo
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    exp = mlflow.get_experiment_by_name("pipeline")
    before = {r.info.run_id for r in mlflow.search_runs([exp.experiment_id], output_format="list")}
    # 'Pretrained' weights from a local file, so the recipe's frozen first epoch runs under DDP too
    # (frozen parameters have no gradients, which plain DDP would reject).
    import torch

    from pipeline.training.model import build_network

    torch.save(build_network("resnet18", 1000).state_dict(), root / "pretrained.pth")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"] |= {"weights": "pretrained.pth"}
    params["train"] |= {
        "accelerator": "cpu",
        "devices": 2,
        "strategy": "ddp",
        "max_epochs": 2,
        "freeze_epochs": 1,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh([sys.executable, "-m", "pipeline", "train"], root, env)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in out
    assert "epoch 1: training head only, backbone frozen" in out and "epoch 2: training whole network" in out
    new = [
        r
        for r in mlflow.search_runs([exp.experiment_id], output_format="list")
        if r.info.run_id not in before
    ]
    assert (
        len(new) == 1 and new[0].data.tags["stage"] == "train" and new[0].data.params["train.devices"] == "2"
    )
    assert sorted(p.name for p in (root / "models").iterdir()) == ["best.ckpt", "run.json"]
    single = next(
        r
        for r in mlflow.search_runs([exp.experiment_id], output_format="list")
        if r.data.tags.get("stage") == "train" and r.info.run_id in before
    )
    # The single run also holds what evaluate logged (test*/, calibration/); the training schema must match.
    assert set(new[0].data.metrics) == {
        m for m in single.data.metrics if not m.startswith(("test", "calibration/"))
    }


def test_a_killed_training_run_resumes_in_the_same_mlflow_run(repo):
    root, env, _ = repo
    params = yaml.safe_load((root / "params.yaml").read_text())
    epochs = 8  # killed after the first: enough left that the kill lands mid-run
    params["train"] |= {
        "accelerator": "cpu",
        "devices": 1,
        "strategy": "auto",
        "max_epochs": epochs,
        "patience": epochs,
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    resume = root / ".models.resume"
    kill_when_ready(
        [sys.executable, "-m", "pipeline", "train"], root, env, resume / "checkpoints" / "last.ckpt"
    )
    first_run = json.loads((resume / "state.json").read_text())["run_id"]

    out = sh([sys.executable, "-m", "pipeline", "train"], root, env)
    assert f"resuming MLflow run {first_run}" in out
    info = json.loads((root / "models" / "run.json").read_text())
    assert info["epochs_run"] == epochs and "run_id" not in info
    assert tracking.model_run(info["model_sha256"]).info.run_id == first_run  # the resumed run has the tag
    assert not resume.exists()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    run = mlflow.get_run(first_run)
    assert run.info.status == "FINISHED" and run.data.params["train.max_epochs"] == str(epochs)
    logged = [m.value for m in mlflow.MlflowClient().get_metric_history(first_run, "epoch")]
    assert max(logged) == epochs - 1
