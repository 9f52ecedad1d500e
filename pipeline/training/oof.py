"""Out-of-fold predictions (``data.folds``): each train+val image scored by the fold model that did not train
on it. Cross-validation writes them beside the fold members; evaluate fits its temperature, threshold and
label audit on them (a module of its own: reading them needs none of the training code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.data.prepared import Prepared
from pipeline.evaluation.metrics import BINARY, HEADLINE, compute_metrics
from pipeline.runinfo import OOF_CSV

__all__ = ["OOF_CSV", "cv_metrics", "load_oof", "oof_logits", "oof_probs", "oof_table"]


def oof_table(prepared: Prepared, fold: int, probs: np.ndarray) -> pd.DataFrame:
    rows = prepared.table[(prepared.table["split"] != "test") & (prepared.table["fold"] == fold)]
    table = rows[["path", "label_index", "cache_index"]].reset_index(drop=True).assign(fold=fold)
    return pd.concat([table, pd.DataFrame(probs, columns=[f"prob_{c}" for c in prepared.classes])], axis=1)


def oof_probs(oof: pd.DataFrame, classes: tuple[str, ...]) -> np.ndarray:
    return oof[[f"prob_{c}" for c in classes]].to_numpy(float)


def oof_logits(oof: pd.DataFrame, classes: tuple[str, ...]) -> np.ndarray:
    """Log-probabilities: logits whose softmax is the OOF probabilities (for temperature scaling)."""
    return np.log(np.clip(oof_probs(oof, classes), 1e-12, None)).astype(np.float32)


def load_oof(model_dir: Path) -> pd.DataFrame | None:
    """The train stage's OOF predictions in ``model_dir``, or None for a model trained without folds."""
    path = model_dir / OOF_CSV
    return pd.read_csv(path) if path.is_file() else None


def cv_metrics(oof: pd.DataFrame, classes: tuple[str, ...], positive: int | None = None) -> dict[str, float]:
    """OOF scores: each headline metric over all OOF predictions (``cv/<metric>``), and its mean and standard
    deviation across the folds (``cv/<metric>_fold_mean``, ``cv/<metric>_fold_std``)."""
    names = HEADLINE + (BINARY if positive is not None else ())

    def score(t: pd.DataFrame) -> dict[str, float]:
        return compute_metrics(oof_probs(t, classes), t["label_index"].to_numpy(), classes, "cv", positive)

    overall = score(oof)
    metrics = {f"cv/{n}": overall[f"cv/{n}"] for n in names if f"cv/{n}" in overall}
    per_fold = [score(t) for _, t in oof.groupby("fold")]
    for n in names:
        values = [m[f"cv/{n}"] for m in per_fold if f"cv/{n}" in m]
        if values:
            metrics[f"cv/{n}_fold_mean"] = round(float(np.mean(values)), 6)
            metrics[f"cv/{n}_fold_std"] = round(float(np.std(values)), 6)
    return metrics
