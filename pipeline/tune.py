"""Optuna study over params keys: every trial is a real ``fit`` on train, scored on val, logged to MLflow.

The study lives in ``tune.storage`` (SQLite by default, outside DVC's outputs) under a name derived
from everything that makes trials comparable, so re-running the stage resumes the same study and
only runs the trials still missing; a new search space or data version starts a new study.

Workers fill the study: the tune stage (``tune.n_jobs`` processes on its machine, each trial on one
device) and any ``python -m pipeline tune --worker`` on other machines sharing a PostgreSQL storage.
Before a worker starts a trial it counts the finished and running trials in the storage, so together
they stop at exactly ``tune.n_trials`` finished ones; heartbeats free the slot of a killed worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import optuna
import sqlalchemy
from lightning.pytorch.loggers import MLFlowLogger
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback

from pipeline import augment, credentials, tracking, vocabulary
from pipeline.config import Params, SearchDim, as_dict, with_overrides
from pipeline.data.datamodule import ImageDataModule
from pipeline.data.prepared import load_prepared
from pipeline.environ import environ
from pipeline.errors import PipelineError
from pipeline.fit import datamodule, fit

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

DataFor = Callable[[Params], ImageDataModule]


def suggest(trial: optuna.Trial, space: dict[str, SearchDim]) -> dict[str, Any]:
    """Sample one value per searched params key."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(dim.choices))
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    return values


def study_name(params: Params, data_version: str) -> str:
    """Same name <=> trials are comparable: same data, search space, fixed params, trial length and seed."""
    fixed = as_dict(params)
    key = {k: fixed[k] for k in ("seed", "model", "train", "augment")}
    key |= {"space": fixed["tune"]["search_space"], "epochs": params.tune.max_epochs, "data": data_version}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.data.dataset}-{params.model.arch}-{digest}"


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


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    """Pruning is decided on the validation metric after each epoch (optuna-integration's callback)."""
    if params.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if params.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=params.tune.max_epochs)
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


def create(params: Params, name: str, tags: dict[str, str]) -> optuna.Study:
    """The study and its MLflow parent run, made once before any worker starts (several processes
    creating the tables of a fresh PostgreSQL database at the same moment collide)."""
    study = open_study(params, name)
    if RUN_ID_ATTR not in study.user_attrs:
        with mlflow.start_run(
            run_name=tracking.run_name("tune", params.model.arch, tags),
            tags=tags | {"stage": "tune", "optuna.study": name},
        ) as parent:
            study.set_user_attr(RUN_ID_ATTR, parent.info.run_id)
            mlflow.log_dict({k: as_dict(v) for k, v in params.tune.search_space.items()}, "search_space.json")
    return study


class SlotTaken(RuntimeError):
    """Another worker started the trial that completes the study first; this one stands down."""


def objective(
    params: Params, data_for: DataFor, parent_run_id: str, experiment_id: str, tags: dict[str, str]
) -> Callable[[optuna.Trial], float]:
    """A trial: sample, fit on one device for tune.max_epochs with pruning, log to a nested MLflow run."""
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
                    max_epochs=params.tune.max_epochs,
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


def _trials(study: optuna.Study, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
    """The study's trials in ``states``, after failing those whose worker was killed (its heartbeat
    stopped, or its process on this machine is gone), so that their slot is free again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _worker_gone(trial.user_attrs.get("worker", "")):
            log.warning(
                "trial %d: its worker %s is gone; failed, its slot is free again",
                trial.number,
                trial.user_attrs["worker"],
            )
            with contextlib.suppress(ValueError, RuntimeError):  # another process reclaimed it first
                study.tell(trial.number, state=TrialState.FAIL)
    return study.get_trials(deepcopy=False, states=states)


def _worker_gone(worker: str) -> bool:
    """Whether ``worker`` ('host:pid', as trials record it) is a process of this machine that no longer
    runs: its trial is reclaimed at once instead of after the heartbeat's grace period (GRACE_S)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _open_slots(study: optuna.Study, n_trials: int) -> int:
    return n_trials - len(_trials(study, TAKEN))


@dataclasses.dataclass(frozen=True)
class Worker:
    """Everything a worker process needs to fill the study; picklable, for spawned processes."""

    params: Params
    data_for: DataFor
    study: str
    parent_run_id: str
    experiment_id: str
    tags: dict[str, str]
    tracking_uri: str
    deadline: float | None  # time.time() after which no new trial starts
    seed: int  # the sampler's, mixed with the worker's index and the trials the study already holds
    index: int = 0  # of the worker process on its machine

    def fill(self) -> int:
        """Run trials in this process until the study holds tune.n_trials finished ones, the deadline
        passes, or tune.n_trials of this worker's trials have failed; return the trials it ran."""
        n_trials = self.params.tune.n_trials
        study = open_study(self.params, self.study, create=False)
        # A sampler seeded alike in every worker, or again on resuming, would draw the values drawn before.
        key = f"{self.seed}:{self.index}:{len(study.trials)}".encode()
        study.sampler = optuna.samplers.TPESampler(
            seed=int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
        )
        run_trial = objective(self.params, self.data_for, self.parent_run_id, self.experiment_id, self.tags)
        ended: list[FrozenTrial] = []
        while self.deadline is None or time.time() < self.deadline:
            failed = [t for t in ended if t.state == TrialState.FAIL and not t.user_attrs.get(SURPLUS_ATTR)]
            if len(failed) >= n_trials:
                log.warning("worker stops: %d of its trials failed (see their errors above)", len(failed))
                break
            if _open_slots(study, n_trials) <= 0:
                break
            study.optimize(
                run_trial,
                n_trials=1,
                catch=(Exception,),
                gc_after_trial=True,
                callbacks=[lambda _, trial: ended.append(trial)],
            )
        return sum(not t.user_attrs.get(SURPLUS_ATTR) for t in ended)


def work(params: Params, worker: Worker) -> int:
    """Fill the study with ``tune.n_jobs`` worker processes (or in this process when it is 1); return
    how many trials they ran."""
    n_jobs = params.tune.n_jobs
    if n_jobs == 1:
        return worker.fill()
    devices = cuda_devices(params.train.accelerator)
    threads = max(1, len(os.sched_getaffinity(0)) // n_jobs)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    results = context.Queue()
    processes = []
    for i in range(n_jobs):
        # Worker i trains on GPU i (round robin when there are fewer); without GPUs the cores are shared.
        env = {"CUDA_VISIBLE_DEVICES": devices[i % len(devices)]} if devices else {}
        with environ(env):
            process = context.Process(
                target=_run_worker, args=(worker, i, threads, results), name=f"tune-worker-{i}"
            )
            process.start()
        processes.append(process)
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: each fails its running trial, then exits
        for process in processes:
            process.join()
        raise
    broken = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode]
    if broken:
        raise TuneError(
            f"tune worker processes failed: {', '.join(broken)}; their errors are above. "
            "The study is kept: run the stage again to continue it"
        )
    return sum(results.get() for _ in processes)


def _run_worker(worker: Worker, index: int, threads: int, results: multiprocessing.Queue) -> None:
    import torch

    torch.set_num_threads(threads)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s tune-worker-{index}: %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    tracking.use_tracking_uri(worker.tracking_uri)
    results.put(dataclasses.replace(worker, index=index).fill())


def cuda_devices(accelerator: str) -> list[str]:
    """The CUDA devices this process may use (as CUDA_VISIBLE_DEVICES names them), or [] for CPU/MPS."""
    if accelerator in ("cpu", "mps"):
        return []
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the set we were given, narrowed per worker
    return (visible.split(",") if visible else [str(i) for i in range(count)])[:count]


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


def summarize(study: optuna.Study, wall_time_s: float) -> dict[str, Any]:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    count = {
        s: sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    if not count[TrialState.COMPLETE]:
        raise TuneError(
            f"Optuna study '{study.study_name}' has no completed trial "
            f"({count[TrialState.FAIL]} failed, {count[TrialState.PRUNED]} pruned); "
            "see the failed trials' errors above"
        )
    return {
        "study": study.study_name,
        "trials_complete": count[TrialState.COMPLETE],
        "trials_pruned": count[TrialState.PRUNED],
        "trials_failed": count[TrialState.FAIL],
        "best_value": study.best_value,
        "best_trial": study.best_trial.number,
        "wall_time_s": round(wall_time_s, 1),
    }


def log_study_plots(study: optuna.Study) -> None:
    """Optimization history and parameter importances on the active (parent) run: PNG, plus HTML with plotly."""
    import importlib.util

    import matplotlib.pyplot as plt  # optuna's matplotlib plots draw with pyplot
    from optuna.visualization import matplotlib as static

    plots = {"optimization_history": "plot_optimization_history"}
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        plots["param_importances"] = "plot_param_importances"
    interactive = importlib.util.find_spec("plotly") is not None
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = getattr(static, plot)(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances of a parameter that never varied
                log.warning("study plot %s not drawn: %s", name, err)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.tight_layout()
        mlflow.log_figure(figure, f"study/{name}.png")
        plt.close(figure)
        if interactive:
            mlflow.log_figure(getattr(optuna.visualization, plot)(study), f"study/{name}.html")
