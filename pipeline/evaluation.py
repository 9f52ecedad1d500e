"""Test-split evaluation: predictions (with and without test-time augmentation), metrics (torchmetrics),
confusion plot and the run report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchmetrics.functional import classification as tmf

from pipeline.data.datamodule import CachedImageDataset
from pipeline.model import Classifier

HEADLINE = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")
TTA_SPLIT = "test_tta"  # metrics with test-time augmentation: test_tta/accuracy, ...


@torch.inference_mode()
def predict_proba(model: Classifier, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for a stack of cached images (N, H, W, C)."""
    model.eval()
    loader = DataLoader(CachedImageDataset(images, np.zeros(len(images))), batch_size=batch_size)
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).softmax(-1).cpu() for x, _ in loader]).numpy()


def predict_tta(model: Classifier, images: np.ndarray, batch_size: int,
                transforms: Sequence[A.BasicTransform], plain: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities averaged over the images as they are and under each (deterministic) transform.

    ``plain``: the untransformed images' probabilities when the caller already has them.
    """
    probs = [predict_proba(model, images, batch_size) if plain is None else plain]
    for transform in transforms:
        moved = np.stack([transform(image=np.asarray(image))["image"] for image in images])
        probs.append(predict_proba(model, moved, batch_size))
    return np.mean(probs, axis=0)


def evaluate(model: Classifier, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
             batch_size: int, tta: Sequence[A.BasicTransform] = ()) -> tuple[np.ndarray, dict[str, float]]:
    """Plain probabilities and the metrics: 'test/*' without TTA and, when ``tta`` is given, 'test_tta/*'."""
    probs = predict_proba(model, images, batch_size)
    metrics = compute_metrics(probs, labels, class_names)
    if tta:
        metrics |= compute_metrics(predict_tta(model, images, batch_size, tta, probs), labels, class_names, TTA_SPLIT)
    return probs, metrics


def compute_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                    split: str = "test") -> dict[str, float]:
    """Headline and per-class metrics, named '<split>/<metric>' and '<split>/<metric>/<class>'."""
    p, y, k = torch.tensor(probs, dtype=torch.float32), torch.tensor(labels, dtype=torch.long), len(class_names)
    metrics = {
        "accuracy": tmf.multiclass_accuracy(p, y, k, average="micro"),
        "balanced_accuracy": tmf.multiclass_accuracy(p, y, k, average="macro"),
        "macro_f1": tmf.multiclass_f1_score(p, y, k, average="macro"),
        "auroc": tmf.multiclass_auroc(p, y, k, average="macro"),
    }
    per_class = {
        "precision": tmf.multiclass_precision(p, y, k, average=None),
        "recall": tmf.multiclass_recall(p, y, k, average=None),
        "f1": tmf.multiclass_f1_score(p, y, k, average=None),
    }
    out = {f"{split}/{name}": round(float(v), 6) for name, v in metrics.items()}
    for name, values in per_class.items():
        out |= {f"{split}/{name}/{c}": round(float(v), 6) for c, v in zip(class_names, values, strict=True)}
    out |= {f"{split}/support/{c}": int((y == i).sum()) for i, c in enumerate(class_names)}
    return out


def confusion_table(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per test image (actual, predicted class names): DVC's confusion template input."""
    names = np.asarray(class_names)
    return pd.DataFrame({"actual": names[labels], "predicted": names[probs.argmax(1)]})


def plot_confusion(table: pd.DataFrame, class_names: Sequence[str], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(1.2 * len(class_names) + 2, 1.2 * len(class_names) + 1.5))
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(table["actual"], table["predicted"], labels=list(class_names),
                                            ax=ax, colorbar=False, xticks_rotation=45)
    ax.set_title("Test confusion matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(metrics: dict[str, Any], data_report: dict[str, Any], run: dict[str, Any], plot_files: Sequence[str],
           tta: Sequence[str] = ()) -> str:
    """The Markdown report a person reads first; ``tta`` names the test-time transforms, if any."""
    warnings = []
    if not run["weights"]["pretrained"]:
        reason = run["weights"].get("fallback_reason") or "model.weights is 'none'"
        warnings.append(f"**Random initialization, not pretrained weights** — {reason}.")
    if data_report["rejected"]:
        warnings.append(f"{len(data_report['rejected'])} unreadable image file(s) were skipped at ingest.")
    small = [c for c, n in data_report["counts"]["test"].items() if n < 10]
    if small:
        warnings.append(f"Fewer than 10 test images for: {', '.join(small)} — their metrics are very noisy.")
    counts = pd.DataFrame(data_report["counts"]).rename_axis("class")
    if tta:
        headline = "\n".join(["| metric | without TTA | with TTA |", "| --- | --- | --- |"] + [
            f"| {m} | {metrics[f'test/{m}']:.4f} | {metrics[f'{TTA_SPLIT}/{m}']:.4f} |" for m in HEADLINE])
        tta_note = (f"TTA averages the predictions over the image and {', '.join(tta)}. Per-class metrics and "
                    "the confusion matrix are without TTA.")
    else:
        headline = "\n".join(["| metric | value |", "| --- | --- |"] + [
            f"| {m} | {metrics[f'test/{m}']:.4f} |" for m in HEADLINE])
        tta_note = "No test-time augmentation (evaluate.tta is empty)."
    per_class = pd.DataFrame({
        m: {c: metrics[f"test/{m}/{c}"] for c in data_report["classes"]}
        for m in ("precision", "recall", "f1", "support")
    }).astype({"support": int}).rename_axis("class")
    lines = [
        f"# Evaluation report — {data_report['source']}",
        "",
        f"Model `{run['arch']}`, weights: `{run['weights']['source']}`; MLflow run `{run['run_id']}`; "
        f"best epoch checkpoint `{run['checkpoint']}`.",
        "",
        "## Warnings", "", *([f"- {w}" for w in warnings] or ["- none"]), "",
        "## Data", "", f"{data_report['n_images']} images, {len(data_report['classes'])} classes, "
        f"resized to {data_report['image_size']} px.", "", counts.to_markdown(), "",
        "## Test metrics", "", headline, "", tta_note, "",
        per_class.to_markdown(floatfmt=("", ".3f", ".3f", ".3f", ".0f")), "",  # support is a count
        "## Plots", "", *[f"![{Path(f).stem}]({f})" for f in plot_files], "",
    ]
    return "\n".join(lines)
