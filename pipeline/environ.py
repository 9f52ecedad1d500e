"""The process's environment: variables set (or left to a library to set) for a while, then put back as
they were; the CPU threads torch uses, and a word when the machine is loaded."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def environ(values: dict[str, str] | None = None, keep: Iterable[str] = ()) -> Iterator[None]:
    """``values`` set in ``os.environ`` for the block; afterwards each of them, and each name in ``keep``
    (what the block itself may change), is as it was before, unset included."""
    names = {*(values or {}), *keep}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(values or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, as a container sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_warned_loaded = False  # said once per process, not before every trial


def warn_if_loaded(load: float, n_cores: int) -> bool:
    """Say once that the machine is loaded when the 1-minute load average exceeds the cores; True if it is."""
    global _warned_loaded
    if load <= n_cores:
        return False
    if not _warned_loaded:
        _warned_loaded = True
        log.warning(
            "the machine is loaded: load average %.1f on %d cores, so every step runs several times slower "
            "than the docs say; other processes compete for the cores (OMP_NUM_THREADS=1 in their "
            "environment helps, as does a smaller train.cpu_threads here)",
            load,
            n_cores,
        )
    return True


def cpu_threads(requested: int | None, load: float, n_cores: int) -> int:
    """torch's CPU threads: ``requested`` (train.cpu_threads, fixed so that numbers reproduce), else the cores
    the load average leaves free, at least one: two such processes share the cores instead of each taking all."""
    return requested or max(1, n_cores - math.ceil(load))


def use_cpu_threads(requested: int | None) -> int:
    """Set torch's intra-op threads (and ``OMP_NUM_THREADS`` for the worker processes a stage starts) from
    ``train.cpu_threads``, after saying once if the machine is loaded; the count set."""
    import torch  # here: the light commands that import this module need no torch

    load, n_cores = os.getloadavg()[0], cores()
    warn_if_loaded(load, n_cores)
    n = cpu_threads(requested, load, n_cores)
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # tune's worker processes: read when their torch starts
    return n
