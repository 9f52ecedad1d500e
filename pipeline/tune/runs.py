"""The study under its MLflow parent run: create it, fill it (the tune stage) or join it (``tune --worker``)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline import tracking
from pipeline.config import Params, as_dict
from pipeline.credentials import redact
from pipeline.tune.study import RUN_ID_ATTR, TuneError, open_study
from pipeline.tune.summary import log_study_plots, summarize
from pipeline.tune.trial import DataFor
from pipeline.tune.workers import Worker, _open_slots, _trials, work

log = logging.getLogger(__name__)


def create(params: Params, name: str, tags: dict[str, str]) -> optuna.Study:
    """The study and its MLflow parent run, made once before any worker starts (several processes
    creating the tables of a fresh PostgreSQL database at the same moment collide)."""
    study = open_study(params, name)
    if RUN_ID_ATTR in study.user_attrs:
        _check_parent(params, name, study.user_attrs[RUN_ID_ATTR])
    else:
        with mlflow.start_run(
            run_name=tracking.run_name("tune", params.model.arch, tags),
            tags=tags | {"stage": "tune", "optuna.study": name},
        ) as parent:
            study.set_user_attr(RUN_ID_ATTR, parent.info.run_id)
            mlflow.log_dict({k: as_dict(v) for k, v in params.tune.search_space.items()}, "search_space.json")
    return study


def _check_parent(params: Params, name: str, run_id: str) -> None:
    """The study's MLflow parent run must still be there: its trials nest under it (a store replaced or a run
    deleted since the study began would stop the stage with MLflow's traceback)."""
    try:
        stage = mlflow.get_run(run_id).info.lifecycle_stage
    except mlflow.exceptions.MlflowException:
        stage = "gone"
    if stage == "active":
        return
    storage = redact(params.tune.storage)
    restore = f"restore it (mlflow runs restore --run-id {run_id}), or " if stage == "deleted" else ""
    raise TuneError(
        f"study '{name}' in tune.storage {storage}: its MLflow parent run {run_id} is {stage} in the tracking "
        f"store {redact(mlflow.get_tracking_uri())}: {restore}start the study again: "
        f"optuna delete-study --study-name {name} --storage {storage}"
    )


def run(
    params: Params, data_for: DataFor, name: str, tags: dict[str, str], dataset: Path | None = None
) -> tuple[optuna.Study, dict[str, Any]]:
    """Fill the study under its MLflow parent run (tune.n_jobs processes); return the study and a summary.

    ``dataset``: the data set folder, logged as the parent run's MLflow dataset input.
    """
    study = create(params, name, tags)
    start = time.monotonic()
    with mlflow.start_run(run_id=study.user_attrs[RUN_ID_ATTR]) as parent:
        if dataset is not None:
            tracking.log_dataset(dataset, tags["data.version"])
        if _open_slots(study, params.tune.n_trials) > 0:
            work(params, _worker(params, data_for, name, parent.info, tags, seed=params.seed))
        else:
            log.info(
                "study %s already holds %d finished or running trials; nothing to run",
                name,
                params.tune.n_trials,
            )
        _wait_for_running(study)
        summary = summarize(study, time.monotonic() - start)
        tracking.log_metrics({f"study/{k}": v for k, v in summary.items()})
        log_study_plots(study)
    return study, summary


def _wait_for_running(study: optuna.Study, poll_s: float = 5.0) -> None:
    """Wait for trials that ``tune --worker`` processes elsewhere are still running: the best params
    are chosen from all of them. A worker that died is noticed by its heartbeat (GRACE_S)."""
    if running := _trials(study, (TrialState.RUNNING,)):
        log.info("waiting for %d trials still running on other workers", len(running))
    while _trials(study, (TrialState.RUNNING,)):
        time.sleep(poll_s)


def join(params: Params, data_for: DataFor, name: str, tags: dict[str, str]) -> int:
    """Help fill a study that the tune stage created (``tune --worker``, on any machine sharing its
    storage and MLflow server); its trials nest under the study's parent run. Returns the trials run."""
    study = open_study(params, name, create=False)
    parent_id = study.user_attrs.get(RUN_ID_ATTR, "(none recorded)")
    try:
        parent = mlflow.get_run(parent_id).info
    except mlflow.exceptions.MlflowException as err:
        raise TuneError(
            f"study '{name}': its MLflow parent run {parent_id} is not in the tracking store "
            f"{mlflow.get_tracking_uri()}: workers need the tune stage's store (set MLFLOW_TRACKING_URI "
            f"to its tracking server) ({err.message})"
        ) from None
    # The stage's workers seed their samplers from params.seed; a joining one must not draw their values.
    return work(
        params, _worker(params, data_for, name, parent, tags, seed=int.from_bytes(os.urandom(4), "big"))
    )


def _worker(
    params: Params,
    data_for: DataFor,
    name: str,
    parent: mlflow.entities.RunInfo,
    tags: dict[str, str],
    seed: int,
) -> Worker:
    timeout = params.tune.timeout_s
    return Worker(
        params,
        data_for,
        name,
        parent.run_id,
        parent.experiment_id,
        tags,
        mlflow.get_tracking_uri(),
        deadline=None if timeout is None else time.time() + timeout,
        seed=seed,
    )
