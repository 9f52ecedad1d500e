"""Test-split evaluation: predictions, metrics with bootstrap intervals, calibration, plots and the report.

Metric names: ``test/<metric>`` for the plain predictions, ``test_tta/<metric>`` with test-time
augmentation, ``test_calibrated/<metric>`` (ece, brier, nll) after temperature scaling, each scalar
with ``<metric>_ci_low`` / ``<metric>_ci_high`` beside it; ``<split>/<metric>/<class>`` per class;
``calibration/*`` for the fitted temperature and the validation NLL before and after it.

Modules: ``predictions`` (model outputs), ``metrics`` (point estimates and the bootstrap),
``calibration`` (temperature scaling, reliability bins), ``plots`` (PNGs and DVC plot data),
``reporting`` (the Markdown report).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch

from pipeline.config import Evaluate
from pipeline.data.cache import Images
from pipeline.errors import PipelineError
from pipeline.evaluation import calibration
from pipeline.evaluation.decision import Decision, decide
from pipeline.evaluation.metrics import (
    BINARY,
    CALIBRATION,
    HEADLINE,
    NEED_EVERY_CLASS,
    bootstrap,
    compute_metrics,
)
from pipeline.evaluation.plots import IMAGES, confusion_table, plot_confusion, write_plots
from pipeline.evaluation.predictions import predict_logits, predict_proba, predict_tta
from pipeline.evaluation.reporting import report

__all__ = [
    "BINARY",
    "CALIBRATED_SPLIT",
    "CALIBRATION",
    "HEADLINE",
    "IMAGES",
    "TTA_SPLIT",
    "Decision",
    "Evaluation",
    "EvaluationError",
    "confusion_table",
    "evaluate",
    "plot_confusion",
    "positive_index",
    "predict_logits",
    "predict_proba",
    "predict_tta",
    "report",
    "split_metrics",
    "write_plots",
]

TTA_SPLIT = "test_tta"  # metrics with test-time augmentation: test_tta/accuracy, ...
CALIBRATED_SPLIT = (
    "test_calibrated"  # calibration metrics after temperature scaling: test_calibrated/ece, ...
)


class EvaluationError(PipelineError, ValueError):
    """An evaluate.* setting that does not fit the data; the message names the key."""


@dataclass(frozen=True)
class Evaluation:
    probs: np.ndarray  # test-split probabilities, plain (no TTA, no temperature)
    calibrated: np.ndarray | None  # the same after temperature scaling; None when it is off
    metrics: dict[str, float]
    selection: tuple[np.ndarray, np.ndarray] | None = None  # (probs, labels) the decisions were fitted on
    decision: Decision | None = None  # threshold and conformal quantile (pipeline.evaluation.decision)


def positive_index(class_names: Sequence[str], positive_class: str | None) -> int | None:
    """Index of the positive class for a binary task (default: the second name in sorted order); None otherwise."""
    if len(class_names) != 2:
        if positive_class is not None:
            raise EvaluationError(
                f"evaluate.positive_class: '{positive_class}' is set, but the data has "
                f"{len(class_names)} classes; sensitivity and specificity need two (set it to null)"
            )
        return None
    if positive_class is None:
        return list(class_names).index(sorted(class_names)[1])
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


def evaluate(
    model: torch.nn.Module,
    images: Images,
    labels: np.ndarray,
    class_names: Sequence[str],
    settings: Evaluate,
    seed: int,
    tta: Sequence[A.BasicTransform] = (),
    val: tuple[Images, np.ndarray] | None = None,
    held_out: tuple[np.ndarray, np.ndarray] | None = None,
    run_id: str = "",
) -> Evaluation:
    """Test-split predictions and every metric.

    Temperature scaling and the decisions (threshold, conformal sets) are fitted on held-out predictions:
    ``held_out`` (logits, labels), e.g. a fold ensemble's out-of-fold log-probabilities, else the model's
    predictions on ``val`` (images, labels).
    """
    positive = positive_index(class_names, settings.positive_class)
    if held_out is None and val is not None:
        held_out = (predict_logits(model, val[0], settings.batch_size), np.asarray(val[1]))
    logits = predict_logits(model, images, settings.batch_size)
    probs = calibration.softmax(logits)
    metrics = split_metrics(probs, labels, class_names, "test", settings, seed, positive)
    if tta:
        tta_probs = predict_tta(model, images, settings.batch_size, tta, probs)
        metrics |= split_metrics(tta_probs, labels, class_names, TTA_SPLIT, settings, seed, positive)
    calibrated = None
    if settings.temperature_scaling:
        if held_out is None:
            raise ValueError("temperature scaling needs the validation split's images and labels")
        val_logits, val_labels = held_out
        temperature = calibration.fit_temperature(val_logits, val_labels)
        calibrated = calibration.softmax(logits, temperature)
        metrics |= {
            "calibration/temperature": round(temperature, 6),
            "calibration/val_accuracy": round(float((val_logits.argmax(1) == val_labels).mean()), 6),
            "calibration/val_nll": round(calibration.nll(val_logits, val_labels), 6),
            "calibration/val_nll_calibrated": round(calibration.nll(val_logits, val_labels, temperature), 6),
        }
        metrics |= split_metrics(
            calibrated, labels, class_names, CALIBRATED_SPLIT, settings, seed, positive, only=CALIBRATION
        )
    selection = None if held_out is None else (calibration.softmax(held_out[0]), np.asarray(held_out[1]))
    made = None
    if selection is not None:
        made, decided = decide(
            selection, (probs, labels), class_names, positive, settings, seed, run_id=run_id
        )
        metrics |= decided
    return Evaluation(probs, calibrated, metrics, selection, made)
