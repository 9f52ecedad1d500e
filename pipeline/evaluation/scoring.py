"""One prediction set's metrics with their bootstrap intervals, and which class is the positive one: what
evaluate, the decisions and the report share (a module of its own so none of them imports another for it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline import vocabulary
from pipeline.config import Evaluate
from pipeline.errors import PipelineError
from pipeline.evaluation.metrics import NEED_EVERY_CLASS, bootstrap, compute_metrics

TTA_SPLIT = "test_tta"  # metrics with test-time augmentation: test_tta/accuracy, ...
CALIBRATED_SPLIT = (
    "test_calibrated"  # calibration metrics after temperature scaling: test_calibrated/ece, ...
)


class EvaluationError(PipelineError, ValueError):
    """An evaluate.* setting that does not fit the data; the message names the key."""


def positive_index(class_names: Sequence[str], positive_class: str | None) -> int | None:
    """Index of the positive class for a binary task (default: ``vocabulary.default_positive``, never a name
    that means healthy when the other does not); None otherwise."""
    if len(class_names) != 2:
        if positive_class is not None:
            raise EvaluationError(
                f"evaluate.positive_class: '{positive_class}' is set, but the data has "
                f"{len(class_names)} classes; sensitivity and specificity need two (set it to null)"
            )
        return None
    if positive_class is None:
        return list(class_names).index(vocabulary.default_positive(class_names)[0])
    if positive_class not in class_names:
        raise EvaluationError(
            f"evaluate.positive_class: '{positive_class}' is not a class of the data "
            f"(classes: {', '.join(class_names)})"
        )
    return list(class_names).index(positive_class)


def split_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    split: str,
    settings: Evaluate,
    seed: int,
    positive: int | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, float]:
    """Point metrics of one prediction set and, with ``settings.bootstrap``, their intervals and the number of
    resamples skipped for lacking a class (``<split>/bootstrap_skipped``). ``only``: keep these scalar metrics."""
    metrics = compute_metrics(probs, labels, class_names, split, positive, settings.ece_bins)
    if only is not None:
        metrics = {k: v for k, v in metrics.items() if k.removeprefix(f"{split}/") in only}
    if settings.bootstrap:
        intervals, skipped = bootstrap(probs, labels, settings.bootstrap, seed, positive, settings.ece_bins)
        for name, (low, high) in intervals.items():
            if f"{split}/{name}" in metrics:
                metrics |= {
                    f"{split}/{name}_ci_low": round(low, 6),
                    f"{split}/{name}_ci_high": round(high, 6),
                }
        if any(f"{split}/{name}" in metrics for name in NEED_EVERY_CLASS):
            metrics[f"{split}/bootstrap_skipped"] = skipped
    return metrics
