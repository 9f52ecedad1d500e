"""Test-split evaluation (:func:`evaluate`): predictions, metrics with bootstrap intervals, calibration,
decisions, plots and the report, composed from this package's modules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch

from pipeline.config import Evaluate
from pipeline.data.cache import Images
from pipeline.evaluation import calibration
from pipeline.evaluation.decision import Decision, decide
from pipeline.evaluation.metrics import (
    BINARY,
    CALIBRATION,
    HEADLINE,
)
from pipeline.evaluation.plots import IMAGES, confusion_table, plot_confusion, write_plots
from pipeline.evaluation.predictions import predict_logits, predict_proba, predict_tta
from pipeline.evaluation.reporting import report
from pipeline.evaluation.scoring import (
    CALIBRATED_SPLIT,
    TTA_SPLIT,
    EvaluationError,
    positive_index,
    split_metrics,
)

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


@dataclass(frozen=True)
class Evaluation:
    probs: np.ndarray  # test-split probabilities, plain (no TTA, no temperature)
    calibrated: np.ndarray | None  # the same after temperature scaling; None when it is off
    metrics: dict[str, float]
    selection: tuple[np.ndarray, np.ndarray] | None = None  # (probs, labels) the decisions were fitted on
    decision: Decision | None = None  # threshold and conformal quantile (pipeline.evaluation.decision)


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
    model_sha256: str = "",
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
            selection, (probs, labels), class_names, positive, settings, seed, model_sha256=model_sha256
        )
        metrics |= decided
    return Evaluation(probs, calibrated, metrics, selection, made)
