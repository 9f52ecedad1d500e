"""Classification metrics on predicted probabilities, for the test set and for bootstrap resamples of it.

Every metric is computed from per-image weights: ``weights`` (B, N) says how often each of the N test
images occurs in each of B resamples; a row of ones is the test set itself. One implementation thus
gives the point estimate and, vectorized over the rows, 1000 bootstrap resamples in milliseconds.
Written here rather than taken from torchmetrics because torchmetrics would recompute each resample
in a Python loop, and its macro averages count a class absent from the labels as 0; here macro
averages run over the classes present in the labels. tests/test_evaluation.py checks the point
estimates against torchmetrics and against values worked out by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
BINARY = ("sensitivity", "specificity")  # two-class tasks only
CALIBRATION = ("ece", "brier", "nll")
CI_LEVEL = 0.95
# Metrics that need every class of the labels: a resample that lacks one leaves them undefined (NaN).
NEED_EVERY_CLASS = ("balanced_accuracy", "macro_f1", "auroc", "sensitivity", "specificity")
PER_CLASS = ("precision", "recall", "f1", "auroc")
RESAMPLE_CHUNK = 4_000_000  # resampled images per chunk: bounds memory for large test sets


def confidence_bins(probs: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin of each image's top-class confidence: equal-width bins [k/M, (k+1)/M), the last one closed at 1."""
    return np.minimum((probs.max(1) * n_bins).astype(int), n_bins - 1)


def _weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC per row of ``weights``: the weighted share of (positive, negative) pairs
    the scores order right, ties counting half. Sorting once and summing per distinct score keeps it O(B N)."""
    order = np.argsort(scores, kind="stable")
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w = weights[:, order]
    pos = np.add.reduceat(w * positive[order], starts, axis=1)  # (B, distinct scores)
    neg = np.add.reduceat(w, starts, axis=1) - pos
    below = np.cumsum(neg, axis=1) - neg
    return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def _per_image(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """The per-image quantities every metric is a weighted sum of."""
    k = probs.shape[1]
    onehot = np.eye(k)[labels]
    predicted = probs.argmax(1)
    correct = (predicted == labels).astype(float)
    return {
        "onehot": onehot,
        "predicted": np.eye(k)[predicted],
        "correct": correct,
        "true_positive": onehot * correct[:, None],
        # ECE: (confidence - correct) placed in the image's confidence bin; |bin sums| / N summed over bins
        "calibration_gap": (probs.max(1) - correct)[:, None] * np.eye(n_bins)[confidence_bins(probs, n_bins)],
        "brier": ((probs - onehot) ** 2).sum(1),
        "nll": -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)),
    }


def weighted_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    positive: int | None = None,
    ece_bins: int = 15,
) -> dict[str, np.ndarray]:
    """Scalar metrics, each an array with one value per row of ``weights``; NaN where undefined.

    - accuracy; balanced_accuracy (mean recall) and macro_f1 over the classes present in ``labels``;
    - auroc: one-vs-rest per present class, averaged (for two classes, the binary AUROC);
    - sensitivity and specificity (only with ``positive``, a class index, for two classes): recall of the
      positive class and of the other one;
    - ece: expected calibration error, sum over ``ece_bins`` equal-width confidence bins of
      |mean confidence - accuracy| weighted by the bin's share of images (top-class confidence);
    - brier: mean over images of the sum over classes of (probability - one-hot label)^2, in [0, 2];
    - nll: mean negative log-likelihood of the true class (probabilities clipped at 1e-12).
    """
    weights = np.asarray(weights, dtype=float)
    per = _per_image(probs, labels, ece_bins)
    total = weights.sum(1)
    support, tp, predicted = (weights @ per[key] for key in ("onehot", "true_positive", "predicted"))
    present = per["onehot"].any(0)
    complete = (support[:, present] > 0).all(1)  # the resample holds every class the labels hold
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = tp / support
        f1 = 2 * tp / (support + predicted)
        auroc = np.mean(
            [_weighted_auroc(probs[:, c], labels == c, weights) for c in np.flatnonzero(present)], axis=0
        )
    out = {
        "accuracy": weights @ per["correct"] / total,
        "balanced_accuracy": recall[:, present].mean(1),
        "macro_f1": f1[:, present].mean(1),
        "auroc": auroc,
    }
    if positive is not None:
        out |= {"sensitivity": recall[:, positive], "specificity": recall[:, 1 - positive]}
    for name in NEED_EVERY_CLASS:
        if name in out:
            out[name] = np.where(complete, out[name], np.nan)
    out |= {
        "ece": np.abs(weights @ per["calibration_gap"]).sum(1) / total,
        "brier": weights @ per["brier"] / total,
        "nll": weights @ per["nll"] / total,
    }
    return out


def per_class(probs: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and one-vs-rest AUROC per class (NaN for a class absent from ``labels``), and support."""
    k = probs.shape[1]
    predicted = np.bincount(probs.argmax(1), minlength=k)
    support = np.bincount(labels, minlength=k)
    tp = np.bincount(labels[probs.argmax(1) == labels], minlength=k)
    with np.errstate(divide="ignore", invalid="ignore"):
        auroc = [_weighted_auroc(probs[:, c], labels == c, np.ones((1, len(labels))))[0] for c in range(k)]
        return {
            "precision": np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0),  # never predicted: 0
            "recall": np.where(support > 0, tp / np.maximum(support, 1), np.nan),
            "f1": np.where(support > 0, 2 * tp / (support + predicted), np.nan),
            "auroc": np.asarray(auroc),
            "support": support,
        }


def compute_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    split: str = "test",
    positive: int | None = None,
    ece_bins: int = 15,
) -> dict[str, float]:
    """Point estimates named '<split>/<metric>' and '<split>/<metric>/<class>'; undefined values are left out."""
    scalars = weighted_metrics(probs, labels, np.ones((1, len(labels))), positive, ece_bins)
    out = {f"{split}/{name}": round(float(v[0]), 6) for name, v in scalars.items() if np.isfinite(v[0])}
    for name, values in per_class(probs, labels).items():
        out |= {
            f"{split}/{name}/{c}": (int(v) if name == "support" else round(float(v), 6))
            for c, v in zip(class_names, values, strict=True)
            if np.isfinite(v)
        }
    return out


def resample_weights(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(n_resamples, n) counts: each row draws n of the n images with replacement."""
    draws = rng.integers(0, n, (n_resamples, n)) + n * np.arange(n_resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=n_resamples * n).reshape(n_resamples, n).astype(float)


def bootstrap(
    probs: np.ndarray,
    labels: np.ndarray,
    n_resamples: int,
    seed: int,
    positive: int | None = None,
    ece_bins: int = 15,
) -> tuple[dict[str, tuple[float, float]], int]:
    """Percentile bootstrap ``CI_LEVEL`` intervals of every scalar metric, resampling the images with replacement.

    Returns {metric: (low, high)} and how many resamples lacked a class of ``labels``: those leave the
    class-dependent metrics (``NEED_EVERY_CLASS``) undefined and are skipped for them; a metric with no
    defined resample gets no interval. The same ``seed`` draws the same resamples, so intervals of two
    prediction sets on the same images (with and without TTA, say) are paired.
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, RESAMPLE_CHUNK // max(1, len(labels)))
    parts = [
        weighted_metrics(
            probs,
            labels,
            resample_weights(len(labels), min(chunk, n_resamples - start), rng),
            positive,
            ece_bins,
        )
        for start in range(0, n_resamples, chunk)
    ]
    tail = 100 * (1 - CI_LEVEL) / 2
    intervals, skipped = {}, 0
    for name in parts[0] if parts else ():
        values = np.concatenate([part[name] for part in parts])
        values = values[np.isfinite(values)]
        if name in NEED_EVERY_CLASS:
            skipped = max(skipped, n_resamples - len(values))
        if len(values):
            low, high = np.percentile(values, [tail, 100 - tail])
            intervals[name] = (float(low), float(high))
    return intervals, skipped
