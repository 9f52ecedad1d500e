"""Evaluation plots: PNG images (report, MLflow) and the CSV data that ``dvc plots show`` renders.

Layout of the plots folder (dvc.yaml's top-level ``plots`` names the CSV folders with their x/y columns;
tests/test_evaluation_stage.py checks the two agree):

- ``confusion_matrix.png``, ``roc.png``, ``precision_recall.png``, ``reliability.png``;
- ``roc/<class>.csv`` (fpr, tpr, threshold) and ``precision_recall/<class>.csv`` (recall, precision,
  threshold): one-vs-rest curves, one file per class, so DVC draws one curve per file; a binary task has
  the positive class's only, and its PNGs mark the operating point of the threshold predict applies;
- ``reliability/test.csv`` and, with temperature scaling, ``reliability/test_calibrated.csv``: per
  confidence bin, mean confidence against accuracy.

All curves are of the plain predictions (without test-time augmentation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional import classification as tmf

from pipeline.evaluation.calibration import reliability_table
from pipeline.evaluation.metrics import per_class

CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY = "reliability"
CURVES = {"roc": ("fpr", "tpr"), "precision_recall": ("recall", "precision")}  # folder: (x, y) columns
AXES = CURVES | {RELIABILITY: ("confidence", "accuracy")}
IMAGES = (CONFUSION_PNG, *(f"{name}.png" for name in AXES))  # in the order the report shows them
CURVE_TITLES = {"roc": "ROC, one-vs-rest", "precision_recall": "precision-recall, one-vs-rest"}


def confusion_table(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per test image (actual, predicted class names): DVC's confusion template input."""
    names = np.asarray(class_names)
    return pd.DataFrame({"actual": names[labels], "predicted": names[probs.argmax(1)]})


def file_stems(class_names: Sequence[str]) -> list[str]:
    """File-name-safe class names; prefixed with the class index where two would collide."""
    stems = [re.sub(r"[^\w.-]+", "_", name).strip("._") or "class" for name in class_names]
    if len(set(stems)) < len(stems):
        stems = [f"{i}_{stem}" for i, stem in enumerate(stems)]
    return stems


def curve_tables(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> dict[str, dict[str, pd.DataFrame]]:
    """{'roc' | 'precision_recall': {class: curve}} for each class present in ``labels`` (torchmetrics, exact thresholds)."""
    p, y, k = (
        torch.as_tensor(probs, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.long),
        probs.shape[1],
    )
    fpr, tpr, roc_thresholds = tmf.multiclass_roc(p, y, k)
    precision, recall, pr_thresholds = tmf.multiclass_precision_recall_curve(p, y, k)
    present = set(np.unique(labels))
    tables: dict[str, dict[str, pd.DataFrame]] = {"roc": {}, "precision_recall": {}}
    for c, name in enumerate(class_names):
        if c not in present:
            continue
        tables["roc"][name] = pd.DataFrame(
            {"class": name, "fpr": fpr[c], "tpr": tpr[c], "threshold": roc_thresholds[c]}
        )
        # the last (recall 0, precision 1) point has no threshold
        thresholds = np.r_[pr_thresholds[c].numpy(), np.nan]
        tables["precision_recall"][name] = pd.DataFrame(
            {"class": name, "recall": recall[c], "precision": precision[c], "threshold": thresholds}
        )
    return {kind: {name: t.round(6) for name, t in per.items()} for kind, per in tables.items()}


def operating_points(
    probs: np.ndarray, labels: np.ndarray, positive: int, threshold: float
) -> dict[str, tuple[float, float, str]]:
    """Where calling ``probs[:, positive] >= threshold`` positive sits on the ROC and the PR curve."""
    called, truth = probs[:, positive] >= threshold, np.asarray(labels) == positive
    tp, fp = int((called & truth).sum()), int((called & ~truth).sum())
    tpr = tp / max(int(truth.sum()), 1)
    fpr = fp / max(int((~truth).sum()), 1)
    label = f"operating point (threshold {threshold:.3f})"
    return {"roc": (fpr, tpr, label), "precision_recall": (tpr, tp / (tp + fp) if tp + fp else 1.0, label)}


def _figure(size: tuple[float, float]):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=size)
    return fig, fig.subplots()


def plot_confusion(table: pd.DataFrame, class_names: Sequence[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = _figure((1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ConfusionMatrixDisplay.from_predictions(
        table["actual"],
        table["predicted"],
        labels=list(class_names),
        ax=ax,
        colorbar=False,
        xticks_rotation=45,
    )
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_curves(
    kind: str,
    curves: Mapping[str, pd.DataFrame],
    path: Path,
    labels: Mapping[str, str],
    point: tuple[float, float, str] | None = None,
):
    """All given classes' ``kind`` curves in one axes; ``labels``: legend text per class; ``point``: (x, y,
    label) of the operating point to mark; returns the figure."""
    x, y = CURVES[kind]
    fig, ax = _figure((5.5, 5))
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    for name, table in curves.items():
        ax.plot(
            table[x],
            table[y],
            lw=1.5,
            label=labels[name],
            drawstyle="steps-post" if kind == "roc" else "default",
        )
    if point is not None:
        ax.plot(point[0], point[1], marker="o", ms=8, c="tab:red", ls="none", label=point[2], zorder=3)
    title = CURVE_TITLES[kind]
    if point is not None and len(curves) == 1:
        title = f"{title.split(',')[0]}, positive class {next(iter(curves))}"
    ax.set(xlabel=x, ylabel=y, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=f"Test {title}")
    ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def plot_reliability(tables: Mapping[str, pd.DataFrame], path: Path, labels: Mapping[str, str]):
    """Accuracy against mean confidence per bin, for each prediction set (e.g. before and after calibration),
    each point labelled with its bin's image count (a point of 2 images says little); returns the figure."""
    fig, ax = _figure((5.5, 5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfect calibration")
    for k, (split, table) in enumerate(tables.items()):
        (line,) = ax.plot(table["confidence"], table["accuracy"], marker="o", label=labels[split])
        for x, y, n in zip(table["confidence"], table["accuracy"], table["count"], strict=True):
            ax.annotate(
                f"{n}",
                (x, y),
                textcoords="offset points",
                xytext=(0, 6 if k == 0 else -11),
                ha="center",
                fontsize=6,
                color=line.get_color(),
            )
    ax.set(
        xlabel="mean confidence (top class)",
        ylabel="accuracy",
        xlim=(0, 1.02),
        ylim=(-0.02, 1.02),
        title="Test reliability diagram (numbers: images per bin)",
    )
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return fig


def write_plots(
    folder: Path,
    probs: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    calibrated: np.ndarray | None = None,
    ece_bins: int = 15,
    positive: int | None = None,
    threshold: float | None = None,
) -> None:
    """Every image and CSV of the plots folder (layout in the module docstring) into ``folder``.

    A binary task with its ``positive`` class index: one ROC and one precision-recall curve, the positive
    class's (the other's are the same curves mirrored), with the operating point of ``threshold`` marked.
    """
    plot_confusion(confusion_table(probs, labels, class_names), class_names, folder / CONFUSION_PNG)
    stems = dict(zip(class_names, file_stems(class_names), strict=True))
    auroc = dict(zip(class_names, per_class(probs, labels)["auroc"], strict=True))
    points = (
        {} if positive is None or threshold is None else operating_points(probs, labels, positive, threshold)
    )
    for kind, curves in curve_tables(probs, labels, class_names).items():
        if positive is not None:
            curves = {n: t for n, t in curves.items() if n == class_names[positive]}
        (folder / kind).mkdir()
        for name, table in curves.items():
            table.to_csv(folder / kind / f"{stems[name]}.csv", index=False)
        legend = {name: f"{name} (AUROC {auroc[name]:.3f})" if kind == "roc" else name for name in curves}
        plot_curves(kind, curves, folder / f"{kind}.png", legend, points.get(kind))
    sets = {"test": probs} | ({"test_calibrated": calibrated} if calibrated is not None else {})
    tables = {split: reliability_table(p, labels, ece_bins) for split, p in sets.items()}
    (folder / RELIABILITY).mkdir()
    for split, table in tables.items():
        table.to_csv(folder / RELIABILITY / f"{split}.csv", index=False)
    plot_reliability(
        tables,
        folder / f"{RELIABILITY}.png",
        {"test": "uncalibrated", "test_calibrated": "temperature-scaled"},
    )
