"""Thin DVC stage entry points: load params, call library code, write the declared outputs.

Only these entry points read the environment (``MLFLOW_TRACKING_URI``, and ``DVC_EXP_NAME`` that
``dvc exp run`` sets); library code gets explicit values.
"""

from pathlib import Path

from pipeline.config import Params
from pipeline.errors import PipelineError


class MissingInput(PipelineError, FileNotFoundError):
    """A stage's input that an earlier stage writes is not there (the stage was run out of order)."""


def stage_input(path: str | Path, key: str, stage: str) -> Path:
    """``path`` (params key ``key``, written by ``stage``), or an error saying which stage to run first."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(
            f"{path} ({key}) not found; run the {stage} stage first (dvc repro {stage}), or, if a "
            f"killed run left it missing, restore the last committed one: dvc checkout {path}"
        )
    return path


def dataset_dir(params: Params) -> Path:
    """The data set folder the run trains on (its DVC hash is the ``data.version`` tag)."""
    return Path(params.paths.raw) / params.data.dataset
