"""MLflow: where runs go, the experiment they belong to, and the lineage tags every run carries.

Nothing here runs at import time; stages call :func:`setup` once and open their own runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import mlflow
import yaml

from pipeline.config import Params, Tracking, as_dict, flatten

# The MLflow UI treats experiments with this tag as model-training experiments (runs table first).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def setup(cfg: Tracking, env_uri: str | None = None) -> str:
    """Point MLflow at the store (``env_uri`` wins over params) and its experiment; return the experiment id."""
    uri = env_uri or cfg.tracking_uri
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # A local store keeps artifacts beside it in the repository, not in MLflow's cwd-relative default.
        location = Path(cfg.artifact_root).resolve().as_uri() if _is_local(uri) else None
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(raw_dir: Path, lock_file: Path = Path("dvc.lock")) -> str:
    """The DVC hash of a data set folder: from its ``.dvc`` file (intake) or ``dvc.lock`` (a stage output)."""
    dvc_file = raw_dir.with_name(raw_dir.name + ".dvc")
    entries = []
    if dvc_file.is_file():
        entries = yaml.safe_load(dvc_file.read_text()).get("outs", [])
        entries = [dict(e, path=str(raw_dir)) for e in entries]
    elif lock_file.is_file():
        stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
        entries = [out for stage in stages.values() for out in stage.get("outs", [])]
    for out in entries:
        if Path(out["path"]) == raw_dir and "md5" in out:
            return out["md5"]
    return "unversioned"


def lineage_tags(raw_dir: Path, exp_name: str | None) -> dict[str, str]:
    """Git commit and dirtiness, DVC experiment name, data version: on every run."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "data.dataset": raw_dir.name,
        "data.version": data_version(raw_dir),
    }
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    return tags


def log_params(params: Params) -> None:
    """All params under their params.yaml names, plus the full mapping as an artifact."""
    mlflow.log_params({k: ("" if v is None else v) for k, v in flatten(params).items()})
    mlflow.log_dict(as_dict(params), "params.json")


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def log_model(model: Any, example: Any, name: str = "model") -> None:
    """Log the trained network with ``mlflow.pytorch`` (input example -> signature) on the active run."""
    import lightning
    import mlflow.pytorch
    import torch
    import torchmetrics
    import torchvision

    # Explicit requirements: MLflow's inference would reload the model in a subprocess (slow).
    requirements = [f"{m.__name__}=={m.__version__.split('+')[0]}" for m in (torch, torchvision, lightning, torchmetrics)]
    mlflow.pytorch.log_model(model, name=name, input_example=example, pip_requirements=requirements)
