"""train: fine-tune with the tuned params (tune's best values over params.yaml); save the checkpoint that
train.checkpoint names (last: the schedule's end; best: the best epoch on train.monitor) in paths.model_dir,
with its sha256 (models/run.json), which tags the MLflow run it belongs to.

A killed run (even SIGKILL) resumes where it stopped, in the same MLflow run, when the stage runs
again with the same inputs (see ``pipeline.training.resume``); the work is ``pipeline.training.train``.
"""

import argparse
from typing import Any

import yaml

from pipeline.config import ConfigError, Params, with_overrides
from pipeline.environ import use_cpu_threads
from pipeline.stages import stage_input
from pipeline.stages.tracked import open_tracking


def with_best_params(params: Params) -> tuple[Params, dict[str, Any]]:
    """``params`` with the tune stage's best values (``paths.best_params``) applied, and those values."""
    path = stage_input(params.paths.best_params, "paths.best_params", "tune")
    tuned = yaml.safe_load(path.read_text()) or {}
    try:
        return with_overrides(params, tuned), tuned
    except ValueError as err:  # a key or value params.yaml no longer accepts
        raise ConfigError(f"{path}: {err}; rerun the tune stage (dvc repro tune)") from None


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.training import train as training

    params, tuned = with_best_params(params)
    use_cpu_threads(params.train.cpu_threads)  # a fixed count: the same numbers on any machine
    # A DDP worker (rank > 0) trains its shard and writes nothing: rank 0 owns the MLflow run and outputs.
    tags = open_tracking(params) if getattr(rank_zero_only, "rank", 0) == 0 else None
    info = training.train(params, tuned, tags)
    if info is not None:
        print(
            f"train: {info.checkpoint} epoch's {info.monitor}={info.best_score:.4f}"
            + (f" (mean of {len(info.folds)} folds)" if info.folds else "")
            + f" after {info.epochs_run} epochs; weights {info.weights.source}; checkpoint in "
            f"{params.paths.model_dir} (sha256 {info.model_sha256[:12]}, the MLflow run's tag model.sha256)"
        )
