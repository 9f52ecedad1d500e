"""One vocabulary of metric names, shared by the Lightning logs, MLflow, the metrics files and the plots.

A logged name is ``<split>/<metric>`` (``train/loss``, ``val/auroc``, ``test/balanced_accuracy``), per
class ``<split>/<metric>/<class>``; each metric has one definition for every split
(``pipeline.evaluation.metrics``) and declares here which way is better, so checkpointing, early stopping,
tuning and the notebooks never guess it from the name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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


# --- class names -------------------------------------------------------------------------------------------
# Words that name a healthy or negative finding: such a class is never the default positive class of a binary
# task (a breast-ultrasound set's `normal_benign` once was, so "sensitivity" was the benign recall).
HEALTHY_WORDS = frozenset(
    {"normal", "benign", "negative", "healthy", "control", "nofinding", "no", "none", "absent", "unaffected"}
)
HEALTHY_PREFIXES = ("no_", "no-", "no ", "not_", "not-", "not ")  # no_tumor, no-finding, not_sick


def means_healthy(name: str) -> bool:
    """Whether a class name says healthy / negative (``normal``, ``normal_benign``, ``No_Finding``, ``healthy``)."""
    low = name.strip().lower()
    return low.startswith(HEALTHY_PREFIXES) or any(w in HEALTHY_WORDS for w in re.split(r"[^a-z0-9]+", low))


def default_positive(classes: Sequence[str]) -> tuple[str, str]:
    """The positive class of a binary task when ``evaluate.positive_class`` is null, and why: the class whose
    name does not mean healthy when exactly one does, else the second name in sorted order."""
    healthy = [c for c in classes if means_healthy(c)]
    if len(healthy) == 1:
        return next(
            c for c in classes if c != healthy[0]
        ), f"'{healthy[0]}' names a healthy or negative finding"
    which = "both" if healthy else "neither"
    return sorted(classes)[1], f"the second class name in sorted order ({which} name means healthy)"
