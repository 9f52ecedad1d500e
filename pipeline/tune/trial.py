"""One trial: sample the searched keys, fit on one device with pruning, log a nested MLflow run."""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
from lightning.pytorch.loggers import MLFlowLogger
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from pipeline import augment, tracking
from pipeline.config import Params, SearchDim, with_overrides
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import load_prepared
from pipeline.training.fit import datamodule, fit
from pipeline.tune.study import SURPLUS_ATTR, TAKEN, trial_epochs

DataFor = Callable[[Params], ImageDataModule]


def suggest(trial: optuna.Trial, space: dict[str, SearchDim]) -> dict[str, Any]:
    """Sample one value per searched params key."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(dim.choices or ()))
        elif dim.type == "int":
            low, high = dim.bounds()
            values[key] = trial.suggest_int(key, int(low), int(high), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, *dim.bounds(), log=dim.log)
    return values


@dataclasses.dataclass(frozen=True)
class TrialData:
    """The data every trial trains on, named by its files: picklable, so each worker process loads it
    itself (the pixel cache memory-mapped) instead of being sent a copy."""

    prepared: Path
    augment_pipeline: Path
    seed: int

    def __call__(self, params: Params) -> ImageDataModule:
        prepared, transform = _load(self)
        return datamodule(params, prepared, transform)


@functools.cache
def _load(data: TrialData) -> tuple:
    return load_prepared(data.prepared), augment.load(data.augment_pipeline, data.seed)


class SlotTaken(RuntimeError):
    """Another worker started the trial that completes the study first; this one stands down."""


def objective(
    params: Params, data_for: DataFor, parent_run_id: str, experiment_id: str, tags: dict[str, str]
) -> Callable[[optuna.Trial], float]:
    """A trial: sample, fit on one device for ``trial_epochs`` with pruning on train.monitor (its
    objective: the shipped weights' value, as the train stage picks its checkpoint: the best epoch's, or the
    last's with train.checkpoint: last), in a nested MLflow run."""
    monitor = params.train.monitor

    def run_trial(trial: optuna.Trial) -> float:
        try:
            return _run_trial(trial)
        except SystemExit as err:
            # Lightning answers Ctrl-C with sys.exit(1), which Optuna does not catch: the trial would stay
            # RUNNING (and block a rerun). As a KeyboardInterrupt, Optuna fails it, then re-raises.
            raise KeyboardInterrupt(f"trial {trial.number} interrupted") from err

    def _run_trial(trial: optuna.Trial) -> float:
        if _slot_taken(trial, params.tune.n_trials):
            trial.set_user_attr(SURPLUS_ATTR, True)
            raise SlotTaken(f"tune.n_trials={params.tune.n_trials} trials were already finished or running")
        values = suggest(trial, params.tune.search_space)
        worker = f"{socket.gethostname()}:{os.getpid()}"
        trial.set_user_attr("worker", worker)
        pruned = None
        name = tracking.run_name(f"trial-{trial.number}", params.model.arch, tags)
        with mlflow.start_run(
            run_name=name,
            nested=True,
            parent_run_id=parent_run_id,
            experiment_id=experiment_id,
            tags=tags | {"stage": "tune-trial", "optuna.trial": str(trial.number), "optuna.worker": worker},
        ) as run:
            mlflow.log_params(values)
            state = "failed"
            try:
                # Trial-level parallelism: one device per trial; the train stage may then use several.
                trial_params = with_overrides(params, values | {"train.devices": 1, "train.strategy": "auto"})
                logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)
                result = fit(
                    trial_params,
                    data_for(trial_params),
                    logger=logger,
                    max_epochs=trial_epochs(params),
                    callbacks=[PyTorchLightningPruningCallback(trial, monitor=monitor)],
                )
                state = "complete"
                mlflow.log_metric(f"best_{monitor}", result.best_score)
                return result.best_score
            except optuna.TrialPruned as err:  # a deliberate early stop: the MLflow run ends FINISHED
                state, pruned = "pruned", err
            except Exception as err:  # recorded; Optuna marks the trial FAIL and the study goes on
                mlflow.set_tag("optuna.error", f"{type(err).__name__}: {err}"[:1000])
                raise
            finally:
                mlflow.set_tag("optuna.state", state)
        raise pruned

    return run_trial


def _slot_taken(trial: optuna.Trial, n_trials: int) -> bool:
    """Whether the finished trials and the running ones started before this one fill the study.

    Workers count before they start a trial; two that counted at the same moment both start one,
    and the later-numbered of them stands down here.
    """
    taken = trial.study.get_trials(deepcopy=False, states=TAKEN)
    return sum(t.state != TrialState.RUNNING or t.number < trial.number for t in taken) >= n_trials
