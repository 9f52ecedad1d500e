"""Thin DVC stage entry points: load params, call library code, write the declared outputs.

Only these entry points read the environment (``MLFLOW_TRACKING_URI``, and ``DVC_EXP_NAME`` that
``dvc exp run`` sets); library code gets explicit values.
"""

import os
from pathlib import Path

from pipeline import tracking
from pipeline.config import Params


def dataset_dir(params: Params) -> Path:
    """The data set folder the run trains on (its DVC hash is the ``data.version`` tag)."""
    return Path(params.paths.raw) / params.data.dataset


def open_tracking(params: Params) -> dict[str, str]:
    """Point MLflow at the store and return the lineage tags every run of this stage carries."""
    tracking.setup(params.mlflow, os.environ.get("MLFLOW_TRACKING_URI"))
    return tracking.lineage_tags(dataset_dir(params), os.environ.get("DVC_EXP_NAME"))
