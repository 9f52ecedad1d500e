"""Test metrics against labels over the active-learning rounds so far: the evaluate stage's learning curve.

A round (``pipeline.data.rounds``) is a labelled set between two ``intake labels.csv --add``; every tracked run
carries its ``active/round`` and ``active/labels`` (the train split's images). A round's point is its latest
evaluation: the data set's evaluate runs in MLflow for earlier rounds, and the evaluation at hand for its own
round (it is not logged yet when the curve is drawn). The figure is drawn from two rounds on; without the earlier
runs in the tracking store (a fresh clone, another store) there is one point and no figure.
"""

from __future__ import annotations

import io

import mlflow
import numpy as np
import pandas as pd

from pipeline.data.rounds import LABELS_TAG, ROUND_TAG

CURVE_PNG = "active_learning.png"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1")  # test/<metric>, as the evaluate stage logs them
COLUMNS = ("round", "labels", *METRICS)


def earlier(dataset: str) -> pd.DataFrame:
    """The latest evaluation of each round of ``dataset`` in the active MLflow experiment: round, labels and the
    test metrics (NaN where a run lacks one)."""
    runs = mlflow.search_runs(
        filter_string=f"tags.stage = 'evaluate' and tags.`data.dataset` = '{dataset}'",
        order_by=["attributes.start_time ASC"],
        output_format="pandas",
    )
    round_column, labels_column = f"tags.{ROUND_TAG}", f"tags.{LABELS_TAG}"
    if not isinstance(runs, pd.DataFrame) or runs.empty or round_column not in runs:
        return pd.DataFrame(columns=list(COLUMNS))
    runs = runs[runs[round_column].notna() & runs[labels_column].notna()]
    table = pd.DataFrame(
        {
            "round": runs[round_column].astype(int),
            "labels": runs[labels_column].astype(int),
            **{m: runs.get(f"metrics.test/{m}", pd.Series(np.nan, index=runs.index)) for m in METRICS},
        }
    )
    return table.groupby("round", as_index=False).last()[list(COLUMNS)]


def points(earlier: pd.DataFrame, round_number: int, labels: int, metrics: dict) -> pd.DataFrame:
    """One row per round, by round: the earlier rounds' latest evaluations, and this one's ``metrics``."""
    now = {"round": round_number, "labels": labels, **{m: metrics.get(f"test/{m}", np.nan) for m in METRICS}}
    others = earlier[earlier["round"] != round_number]
    table = (
        pd.concat([others, pd.DataFrame([now])], ignore_index=True) if len(others) else pd.DataFrame([now])
    )
    return table.sort_values("round").reset_index(drop=True)[list(COLUMNS)]


def curve_png(table: pd.DataFrame) -> bytes | None:
    """Test metrics against labelled training images, a point per round (PNG); None below two rounds."""
    if len(table) < 2:
        return None
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for metric in METRICS:
        if table[metric].notna().any():
            ax.plot(table["labels"], table[metric], marker="o", label=f"test/{metric}")
    for row in table.itertuples():
        ax.annotate(
            f"round {row.round}", (row.labels, row.accuracy), textcoords="offset points", xytext=(4, -12)
        )
    ax.set_xlabel("labelled training images")
    ax.set_ylabel("test metric")
    ax.set_title("Active learning: test metrics by round")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    return out.getvalue()
