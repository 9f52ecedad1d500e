"""One vocabulary of metric names, shared by the Lightning logs, MLflow, the metrics files and the plots.

A logged name is ``<split>/<metric>`` (``train/loss``, ``val/auroc``, ``test/balanced_accuracy``), per
class ``<split>/<metric>/<class>``; each metric has one definition for every split
(``pipeline.evaluation.metrics``) and declares here which way is better, so checkpointing, early stopping,
tuning and the notebooks never guess it from the name.
"""

from __future__ import annotations

from typing import Literal

Better = Literal["min", "max"]

BETTER: dict[str, Better] = {
    "loss": "min",  # the training loss (class-weighted, label-smoothed cross-entropy)
    "accuracy": "max",
    "balanced_accuracy": "max",  # mean recall over the classes present in the labels
    "macro_f1": "max",  # over the classes present
    "auroc": "max",  # one-vs-rest per present class, averaged
    "sensitivity": "max",
    "specificity": "max",
    "ece": "min",
    "brier": "min",
    "nll": "min",
    "precision": "max",
    "recall": "max",
    "f1": "max",
}

# Names this project logged before one vocabulary held for every split.
RENAMED = {"val/acc": "val/accuracy", "train/acc": "train/accuracy"}


def metric_of(name: str) -> str:
    """``val/auroc`` -> ``auroc``; ``test/f1/cat`` -> ``f1``; ``tta/ece`` -> ``ece``."""
    parts = name.split("/")
    return parts[1] if len(parts) > 1 else parts[0]


def better(name: str) -> Better:
    """Which way ``name`` (a logged name or a bare metric) improves; a KeyError for a name not in the vocabulary."""
    return BETTER[metric_of(name)]
