"""The tracked stages' (tune, train, evaluate) start: MLflow pointed at the store, the run's lineage tags.

A module of its own, not in the package's ``__init__``: the stages that log nothing (demo, ingest, augment)
neither import MLflow (~5 s) nor list the tracking code among their DVC code deps.
"""

import os
from pathlib import Path

from pipeline import tracking
from pipeline.config import Params
from pipeline.data import rounds
from pipeline.stages import dataset_dir


def open_tracking(params: Params) -> dict[str, str]:
    """Point MLflow at the store and return the tags every run of this stage carries: the lineage, and the
    active-learning round and label count of the prepared set (``pipeline.data.rounds``)."""
    tracking.setup(params.mlflow, os.environ.get(tracking.ENV_URI))
    lineage = tracking.lineage_tags(dataset_dir(params), os.environ.get("DVC_EXP_NAME"))
    return lineage | rounds.tags(Path(params.paths.prepared))
