"""The study itself: its name, its storage (SQLite or a database server), its pruner and the trial length.

A study's name is derived from everything that makes trials comparable, so re-running the stage resumes
the same study and only runs the trials still missing; a new search space or data version starts a new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import warnings

import optuna
import sqlalchemy
from optuna.trial import TrialState

from pipeline import credentials, vocabulary
from pipeline.config import Params, as_dict
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)


class TuneError(PipelineError, RuntimeError):
    """The study produced nothing usable, or cannot be reached."""


# Failed trials do not count towards tune.n_trials: their slot is tried again (a rerun too).
DONE = (TrialState.COMPLETE, TrialState.PRUNED)

TAKEN = (*DONE, TrialState.RUNNING)  # trials that hold one of the study's tune.n_trials slots

RUN_ID_ATTR = "mlflow_parent_run_id"

SURPLUS_ATTR = "surplus"  # on a trial that found its slot taken by another worker and never ran

# A running trial's worker refreshes its heartbeat; one silent for GRACE_S was killed, and its trial is failed.
HEARTBEAT_S, GRACE_S = 60, 180

# Several local processes on one SQLite file wait this long for its write lock instead of failing.
SQLITE_LOCK_TIMEOUT_S = 120

CONNECT_TIMEOUT_S = 10  # to a database server, before saying it cannot be reached


def planned(params: Params) -> tuple[Params | None, str]:
    """The params a study runs with (``tune.enabled: auto`` on the demo set: the demo-sized study), or None
    when no study runs; and a line saying which."""
    tune, dataset = params.tune, params.data.dataset
    if tune.enabled is False:
        return None, "tune.enabled false: no study; params.yaml's values go to train"
    if tune.enabled == "auto":
        if dataset != params.demo.name:
            return None, (
                f"tune.enabled auto: no study on data set '{dataset}' (a trial trains the whole schedule, a "
                f"study costs about tune.n_trials trainings); tune.enabled true runs one (docs/tuning.md)"
            )
        # Hyperband's first rung at a third of the trial: short trials that are still pruned.
        first = max(1, tune.demo_max_epochs // 3)
        small = dataclasses.replace(
            tune, enabled=True, n_trials=tune.demo_trials, max_epochs=tune.demo_max_epochs, min_epochs=first
        )
        return dataclasses.replace(params, tune=small), (
            f"tune.enabled auto: a demo-sized study on the demo set ({tune.demo_trials} trials of at most "
            f"{tune.demo_max_epochs} epochs, pruned from epoch {first})"
        )
    return params, f"tune.enabled true: {tune.n_trials} trials"


def study_name(params: Params, data_version: str) -> str:
    """Same name <=> trials are comparable: same data, search space, fixed params, trial length and seed."""
    fixed = as_dict(params)
    key = {k: fixed[k] for k in ("seed", "model", "train", "augment")}
    key |= {"space": fixed["tune"]["search_space"], "epochs": trial_epochs(params), "data": data_version}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.data.dataset}-{params.model.arch}-{digest}"


def trial_epochs(params: Params) -> int:
    """The epochs a trial may train: ``tune.max_epochs``, else the train stage's own schedule."""
    return params.tune.max_epochs or params.train.max_epochs


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    """Pruning is decided on train.monitor after each epoch (optuna-integration's callback).

    Hyperband is the multi-fidelity one: rungs at ``tune.min_epochs`` x 3^k epochs up to the full trial
    length, so settings are ranked by how they do on the schedule that will be used, while most trials
    stop after a few epochs. (Optuna hashes each trial into one of its brackets.)
    """
    if params.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if params.tune.pruner == "hyperband":
        epochs = trial_epochs(params)
        return optuna.pruners.HyperbandPruner(
            min_resource=min(params.tune.min_epochs, epochs), max_resource=epochs, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def storage(url: str, *, create_tables: bool = True) -> optuna.storages.RDBStorage:
    """``tune.storage`` opened with heartbeats, and for SQLite a lock timeout that lets ``tune.n_jobs``
    local processes take turns writing (each trial writes a few rows per epoch: no real contention).

    Optuna advises a server database rather than SQLite for many parallel workers; its file-based
    alternative (``JournalFileBackend``) has the same single-writer model, so a local study stays in
    the SQLite file that earlier runs resume from. ``postgresql://`` URLs use psycopg 3.
    """
    engine_kwargs = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") else {}
    if not url.startswith("sqlite"):
        check_server(url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                skip_table_creation=not create_tables,
            )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as err:
        raise TuneError(f"tune.storage {_shown(url)}: cannot open it: {err}") from err


def check_server(url: str) -> None:
    """Connect once, with a short timeout, so that a database server that is down or unreachable is said
    so (host and port) rather than read by Optuna as a missing study."""
    try:
        address = sqlalchemy.engine.make_url(url)
        args = {"connect_timeout": CONNECT_TIMEOUT_S} if address.get_backend_name() == "postgresql" else {}
        engine = sqlalchemy.create_engine(address, connect_args=args, poolclass=sqlalchemy.pool.NullPool)
    except (sqlalchemy.exc.ArgumentError, ImportError, ValueError) as err:
        raise TuneError(f"tune.storage {_shown(url)}: cannot open it: {_shown(str(err))}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as err:
        reason = _shown(str(err.orig or err).strip().splitlines()[0])
        raise TuneError(
            f"tune.storage {_shown(url)}: the database server {address.host or 'localhost'}:"
            f"{address.port or 'default port'} cannot be reached or refused the connection ({reason}); "
            "start it, or check host, port, user and PGPASSWORD"
        ) from None
    finally:
        engine.dispose()


def _shown(url: str) -> str:
    """The URL without its password or secret query values, for messages."""
    return credentials.redact(url)


def open_study(params: Params, name: str, *, create: bool = True) -> optuna.Study:
    """The study in ``tune.storage``: created when missing (``create``), else it must exist."""
    sampler, pruner = optuna.samplers.TPESampler(seed=params.seed), make_pruner(params)
    if create:
        return optuna.create_study(
            study_name=name,
            storage=storage(params.tune.storage),
            load_if_exists=True,
            sampler=sampler,
            pruner=pruner,
            direction="minimize" if vocabulary.better(params.train.monitor) == "min" else "maximize",
        )
    try:
        return optuna.load_study(
            study_name=name,
            storage=storage(params.tune.storage, create_tables=False),
            sampler=sampler,
            pruner=pruner,
        )
    except (KeyError, optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError) as err:
        raise TuneError(
            f"study '{name}' not found in tune.storage {_shown(params.tune.storage)} ({err!r}): "
            "start the tune stage first (dvc repro tune), from the same commit, params and data "
            "(dvc pull) as this worker"
        ) from None
