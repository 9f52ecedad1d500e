"""Optuna study over params keys: every trial is a real ``fit`` on train, scored on val, logged to MLflow.

Multi-fidelity: a trial trains with the schedule the train stage will use (``tune.max_epochs`` null:
``train.max_epochs``) and is judged on ``train.monitor``, the metric the checkpoint is chosen on; the
Hyperband pruner stops the unpromising ones at its rungs (``tune.min_epochs`` x 3^k epochs), so most
trials cost a few epochs and the survivors are ranked on the full schedule.

The study lives in ``tune.storage`` (SQLite by default, outside DVC's outputs). Workers fill it: the
tune stage (``tune.n_jobs`` processes on its machine, each trial on one device) and any
``python -m pipeline tune --worker`` on other machines sharing a PostgreSQL storage.

Rooms: ``study`` (name, storage, pruner), ``trial`` (the objective), ``workers`` (processes and slot
accounting), ``runs`` (MLflow parent run; fill or join), ``summary`` (counts and plots).
"""

from pipeline.tune.runs import create, join, run
from pipeline.tune.study import (
    DONE,
    RUN_ID_ATTR,
    SURPLUS_ATTR,
    TAKEN,
    TuneError,
    make_pruner,
    open_study,
    planned,
    storage,
    study_name,
    trial_epochs,
)
from pipeline.tune.summary import log_study_plots, summarize
from pipeline.tune.trial import SlotTaken, TrialData, objective, suggest
from pipeline.tune.workers import Worker, cuda_devices, work

__all__ = [
    "DONE",
    "RUN_ID_ATTR",
    "SURPLUS_ATTR",
    "TAKEN",
    "SlotTaken",
    "TrialData",
    "TuneError",
    "Worker",
    "create",
    "cuda_devices",
    "join",
    "log_study_plots",
    "make_pruner",
    "objective",
    "open_study",
    "planned",
    "run",
    "storage",
    "study_name",
    "suggest",
    "summarize",
    "trial_epochs",
    "work",
]
