"""Worker processes that fill a study, and the slot accounting that stops them at exactly tune.n_trials.

Before a worker starts a trial it counts the finished and running trials in the storage, so together
they stop at exactly ``tune.n_trials`` finished ones; heartbeats free the slot of a killed worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import socket
import sys
import time
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline import tracking
from pipeline.config import Params
from pipeline.environ import environ
from pipeline.tune.study import SURPLUS_ATTR, TAKEN, TuneError, open_study
from pipeline.tune.trial import DataFor, objective

log = logging.getLogger(__name__)


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


class _NoInterruptTraceback(logging.Filter):
    """Optuna logs a failed trial with its traceback; for Ctrl-C its one line says enough (three chained
    tracebacks of Lightning's exit said nothing more), and the CLI says how to go on."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_interrupts() -> None:
    trials = logging.getLogger("optuna.study._optimize")  # where Optuna reports a failed trial
    if not any(isinstance(f, _NoInterruptTraceback) for f in trials.filters):
        trials.addFilter(_NoInterruptTraceback())


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
        _quiet_interrupts()
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
    try:
        results.put(dataclasses.replace(worker, index=index).fill())
    except KeyboardInterrupt:  # its trial is failed already; multiprocessing would print a traceback
        sys.exit(130)


def cuda_devices(accelerator: str) -> list[str]:
    """The CUDA devices this process may use (as CUDA_VISIBLE_DEVICES names them), or [] for CPU/MPS."""
    if accelerator in ("cpu", "mps"):
        return []
    import torch

    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # the set we were given, narrowed per worker
    return (visible.split(",") if visible else [str(i) for i in range(count)])[:count]
