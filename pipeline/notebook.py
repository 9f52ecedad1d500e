"""What the notebooks in ``notebooks/`` show, as functions: the notebooks only call these and display.

Everything reads a project folder's outputs (``data/prepared``, ``models``, the MLflow store) through
its own ``params.yaml``; nothing is written. Figures are ``matplotlib.figure.Figure`` objects (no
pyplot state): a notebook displays one by ending a cell with it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from pipeline import display, tracking, vocabulary
from pipeline.config import PARAMS_FILE, Params, load
from pipeline.data.prepared import REPORT_JSON, Prepared, load_prepared
from pipeline.errors import PipelineError

# mlflow.search_runs columns shown first, renamed to what they mean here.
RUN_COLUMNS = {
    "run_id": "run_id",
    "experiment_id": "experiment_id",
    "tags.mlflow.runName": "run_name",
    "tags.stage": "stage",
    "tags.dvc.exp_name": "dvc_exp",
    "tags.optuna.trial": "trial",
    "tags.optuna.state": "trial_state",
    "tags.mlflow.parentRunId": "parent_run_id",
    "tags.data.dataset": "dataset",
    "tags.data.version": "data_version",
    "tags.git.commit": "git_commit",
    "status": "status",
    "start_time": "start_time",
}


@dataclass(frozen=True)
class Project:
    """A project folder and its params; paths in params.yaml are relative to ``root``."""

    root: Path
    params: Params

    def path(self, name: str) -> Path:
        """``root`` / ``paths.<name>`` from params.yaml, e.g. ``project.path("prepared")``."""
        return self.root / getattr(self.params.paths, name)

    @property
    def tracking_uri(self) -> str:
        """``$MLFLOW_TRACKING_URI`` when set (as for the stages), else ``mlflow.tracking_uri`` resolved against ``root``."""
        return tracking.absolute_uri(
            os.environ.get(tracking.ENV_URI) or self.params.mlflow.tracking_uri, self.root
        )


def open_project(root: str | Path = "..") -> Project:
    """The project at ``root`` (default: the parent of ``notebooks/``, where Jupyter starts a notebook)."""
    root = Path(root).resolve()
    return Project(root, load(root / PARAMS_FILE))


# --- 01: the data -----------------------------------------------------------------------------------------


def data_report(project: Project) -> dict:
    """Ingest's ``report.json`` (counts, formats, duplicates, rejected files, warnings)."""
    path = project.path("prepared") / REPORT_JSON
    if not path.is_file():
        raise PipelineError(f"{path}: not found; run the ingest stage first (dvc repro ingest)")
    return json.loads(path.read_text())


def prepared(project: Project) -> Prepared:
    """The split table and the memory-mapped pixel cache that training reads."""
    return load_prepared(project.path("prepared"))


def class_balance(report: dict) -> pd.DataFrame:
    """Images per class (rows) and split (columns), with a total column and the share of each class."""
    table = (
        pd.DataFrame(report["counts"]).reindex(report["classes"]).fillna(0).astype(int).rename_axis("class")
    )
    table["total"] = table.sum(axis=1)
    table["share"] = (table["total"] / table["total"].sum()).round(3)
    return table


def plot_class_balance(balance: pd.DataFrame) -> Figure:
    """Stacked bars of the images per class and split."""
    fig = Figure(figsize=(1.0 * len(balance) + 3, 3.2))
    ax = fig.subplots()
    bottom = np.zeros(len(balance))
    for split in [c for c in balance.columns if c not in ("total", "share")]:
        ax.bar(balance.index, balance[split], bottom=bottom, label=split)
        bottom += balance[split].to_numpy()
    ax.set_ylabel("images")
    ax.set_title("Class balance by split")
    ax.legend()
    fig.tight_layout()
    return fig


def formats(report: dict) -> pd.DataFrame:
    """How many images had each mode, bit depth and size on disk (before the resize at ingest)."""
    rows = [
        {"property": prop, "value": value, "images": n}
        for prop, counts in report["formats"].items()
        for value, n in counts.items()
    ]
    return pd.DataFrame(rows, columns=["property", "value", "images"])


def duplicates(report: dict, root: Path | None = None) -> pd.DataFrame:
    """One row per file in an exact-duplicate set or near-duplicate pair (``bits``: dHash distance)."""

    def rel(path: str) -> str:
        return (
            str(Path(path).relative_to(root))
            if root is not None and Path(path).is_relative_to(root)
            else path
        )

    found = report["duplicates"]
    rows = [
        {"kind": kind, "set": i, "path": rel(p)}
        for kind in ("exact", "near")
        for i, paths in enumerate(found[kind])
        for p in paths
    ]
    return pd.DataFrame(rows, columns=["kind", "set", "path"])


def image_grid(
    images: Sequence[np.ndarray] | np.ndarray, titles: Sequence[str], ncols: int = 6, size: float = 1.7
) -> Figure:
    """Images (H, W, C; any cache dtype) in a grid with a title each, no more columns than images."""
    return display.image_grid(
        list(images), titles, ncols=max(1, min(ncols, len(images))), cell=(size, size + 0.3)
    )


def sample_grid(data: Prepared, per_class: int = 6, seed: int = 0) -> Figure:
    """``per_class`` random cached images of each class, one row per class (as the model sees them, resized)."""
    rng = np.random.default_rng(seed)
    picked, titles = [], []
    for name in data.classes:
        rows = data.table.loc[data.table["label"] == name, "cache_index"].to_numpy()
        chosen = np.sort(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
        picked += list(chosen) + [None] * (per_class - len(chosen))
        titles += [f"{name} #{i}" for i in chosen] + [""] * (per_class - len(chosen))
    blank = np.zeros_like(data.images[0])
    return image_grid([data.images[i] if i is not None else blank for i in picked], titles, ncols=per_class)


# --- 02: comparing runs -----------------------------------------------------------------------------------


def runs_table(project: Project, experiments: Sequence[str] | None = None) -> pd.DataFrame:
    """Every run of the experiments (default: ``mlflow.experiment``) as one row: who it is, its params
    under their params.yaml names (``train.lr``) and its latest metrics (``val/loss``), numbers as numbers."""
    import mlflow

    tracking.use_tracking_uri(project.tracking_uri)
    names = list(experiments or [project.params.mlflow.experiment])
    missing = [n for n in names if mlflow.get_experiment_by_name(n) is None]
    if missing:
        raise PipelineError(
            f"{project.tracking_uri}: no MLflow experiment {missing}; run the pipeline first (dvc repro)"
        )
    runs = mlflow.search_runs(experiment_names=names, order_by=["attributes.start_time ASC"])
    info = runs.reindex(columns=list(RUN_COLUMNS)).rename(columns=RUN_COLUMNS)
    params = runs.filter(like="params.", axis=1).rename(columns=lambda c: c.removeprefix("params."))
    params = params.apply(_numbers_where_possible)
    metrics = runs.filter(like="metrics.", axis=1).rename(columns=lambda c: c.removeprefix("metrics."))
    return with_evaluations(pd.concat([info, params, metrics], axis=1))


def with_evaluations(runs: pd.DataFrame) -> pd.DataFrame:
    """Each train run's row with the metrics of its latest evaluate run (nested under it: one run per
    evaluation) where the train run has none, so a train run is compared on its test metrics too; the
    ``evaluation_run_id`` column says which evaluation they come from. ``runs``: oldest first."""
    runs = runs.copy()
    runs["evaluation_run_id"] = None
    evaluations = runs[runs["stage"] == "evaluate"]
    metrics = [c for c in runs.columns if "/" in c]
    for parent, group in evaluations.groupby("parent_run_id"):
        latest = group.iloc[-1]
        rows = runs.index[runs["run_id"] == parent]
        taken = [c for c in metrics if pd.notna(latest[c])]
        runs.loc[rows, taken] = runs.loc[rows, taken].fillna(latest[taken])
        runs.loc[rows, "evaluation_run_id"] = latest["run_id"]
    return runs


def for_dataset(runs: pd.DataFrame, dataset: str | None) -> pd.DataFrame:
    """The runs on one data set (``data.dataset``, the ``dataset`` column), so that runs on other images are
    not ranked against them; None keeps every run. Within a set, ``data_version`` tells versions apart."""
    if dataset is None:
        return runs
    kept = runs[runs["dataset"] == dataset]
    if kept.empty:
        raise PipelineError(
            f"no run on data set '{dataset}'; data sets with runs: "
            f"{sorted(runs['dataset'].dropna().unique())} (or pass None for every run)"
        )
    return kept


def _numbers_where_possible(column: pd.Series) -> pd.Series:
    """MLflow stores params as strings; a column whose every value parses as a number becomes numeric."""
    numeric = pd.to_numeric(column, errors="coerce")
    return numeric if numeric.notna().sum() == column.notna().sum() else column


def param_columns(runs: pd.DataFrame, vary: bool = True) -> list[str]:
    """The params columns of ``runs_table`` (dotted names); ``vary``: only those that differ between runs."""
    columns = [c for c in runs.columns if "." in c and "/" not in c and c not in RUN_COLUMNS.values()]
    return [c for c in columns if not vary or runs[c].dropna().astype(str).nunique() > 1]


def plot_metric_vs_params(
    runs: pd.DataFrame, metric: str, params: Sequence[str], by: str = "stage"
) -> Figure:
    """One scatter per param: ``metric`` against it, a colour per value of ``by`` (stage, dvc_exp, ...).

    A positive param spanning more than a factor of 3 gets a log axis (learning rates, weight decay). A param
    that is not a number in every run (``augment.preset``, ``evaluate.threshold: youden`` beside 0.5) is a
    categorical axis of its values as text, unset ones shown as '(unset)'.
    """
    if metric not in runs:
        raise PipelineError(f"metric '{metric}' is in no run; metrics logged: {sorted(metric_columns(runs))}")
    runs = runs[runs[metric].notna()]
    fig = Figure(figsize=(3.6 * max(1, len(params)), 3.2))
    axes = fig.subplots(1, max(1, len(params)), squeeze=False)[0]
    groups = runs[by].fillna("(none)") if by in runs else pd.Series("(none)", index=runs.index)
    for ax, param in zip(axes, params, strict=False):
        numeric = pd.api.types.is_numeric_dtype(runs[param])
        x = runs[param] if numeric else runs[param].astype("string").fillna("(unset)").astype(str)
        for group, rows in runs.groupby(groups):
            ax.scatter(x[rows.index], rows[metric], label=str(group), alpha=0.8)
        values = runs[param].dropna() if numeric else pd.Series(dtype=float)
        span = values.max() / values.min() if len(values) and (values > 0).all() else 0
        if span > 3:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            if span < 100:  # within a decade or two, powers of ten alone would leave the axis bare
                ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
                ax.xaxis.set_major_formatter(FormatStrFormatter("%.0e"))
        elif len(values):
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 4))
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
    axes[0].legend(title=by, fontsize=7)
    fig.tight_layout()
    return fig


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The metrics columns of ``runs_table`` (slash names: ``val/loss``, ``test/accuracy``)."""
    return [c for c in runs.columns if "/" in c or c == "epoch"]


def best_run(
    runs: pd.DataFrame, metric: str, stage: str | None = None, mode: Literal["min", "max"] | None = None
) -> pd.Series:
    """The run with the best ``metric``, among ``stage``'s runs if given. ``mode`` defaults to the
    direction the metric declares (``pipeline.vocabulary``); pass it for a name outside the vocabulary."""
    pool = runs if stage is None else runs[runs["stage"] == stage]
    pool = pool[pool[metric].notna()] if metric in pool else pool.iloc[0:0]
    if pool.empty:
        raise PipelineError(f"no {stage or ''} run has the metric '{metric}'".replace("  ", " "))
    return pool.loc[
        pool[metric].idxmin() if (mode or vocabulary.better(metric)) == "min" else pool[metric].idxmax()
    ]


NO_TRIALS = (
    "No Optuna trial ran: the tune stage found tune.enabled false in params.yaml (or the study has not run "
    "yet), so there is no best trial; docs/tuning.md says how to run a study."
)


def best_trial(runs: pd.DataFrame, metric: str) -> pd.Series | None:
    """The tune trial with the best ``metric``, or None when no trial ran (``tune.enabled: false``)."""
    trials = runs[runs["stage"] == "tune-trial"] if "stage" in runs else runs.iloc[0:0]
    if trials.empty:
        return None
    return best_run(trials, metric)


# --- 03: errors on the test split -------------------------------------------------------------------------


def load_model(project: Project):
    """The trained classifier (best checkpoint in ``paths.model_dir``), on the CPU, in eval mode."""
    from pipeline.serve.shipped import load_trained

    return load_trained(project.path("model_dir")).model


def predict_test_split(model, data: Prepared, batch_size: int = 64) -> pd.DataFrame:
    """One row per test image: path, actual and predicted class, the predicted class's probability,
    the actual class's probability, and its row in the image cache."""
    from pipeline.evaluation.predictions import predict_proba

    test = data.split("test")
    probs = predict_proba(model, data.images[test["cache_index"].to_numpy()], batch_size)
    names = np.asarray(data.classes)
    actual = test["label_index"].to_numpy()
    return pd.DataFrame(
        {
            "path": test["path"].to_numpy(),
            "actual": names[actual],
            "predicted": names[probs.argmax(1)],
            "confidence": probs.max(1).round(4),
            "p_actual": probs[np.arange(len(actual)), actual].round(4),
            "cache_index": test["cache_index"].to_numpy(),
        }
    )


def misclassified(predictions: pd.DataFrame) -> pd.DataFrame:
    """The wrong predictions, most confident first (the most instructive mistakes, or label errors)."""
    wrong = predictions[predictions["actual"] != predictions["predicted"]]
    return wrong.sort_values("confidence", ascending=False).reset_index(drop=True)


def confusion_pairs(predictions: pd.DataFrame) -> pd.DataFrame:
    """(actual, predicted) pairs of the mistakes with their count and share of the actual class, commonest first."""
    wrong = misclassified(predictions)
    pairs = wrong.groupby(["actual", "predicted"]).size().rename("count").reset_index()
    support = predictions["actual"].value_counts()
    pairs["share_of_actual"] = (pairs["count"] / pairs["actual"].map(support)).round(3)
    return pairs.sort_values(["count", "actual"], ascending=[False, True]).reset_index(drop=True)


def mistakes_grid(mistakes: pd.DataFrame, data: Prepared, n: int = 18, ncols: int = 6) -> Figure:
    """The first ``n`` rows of ``misclassified`` as images titled 'actual -> predicted (confidence)'."""
    shown = mistakes.head(n)
    titles = [f"{r.actual} -> {r.predicted} ({r.confidence:.2f})" for r in shown.itertuples()]
    return image_grid(data.images[shown["cache_index"].to_numpy()], titles, ncols=ncols)


def mistakes_gradcam(model, mistakes: pd.DataFrame, data: Prepared, n: int = 8) -> bytes:
    """PNG of the first ``n`` mistakes, each with two Grad-CAM maps (``pipeline.evaluation.explain``): where the
    model found evidence for the class it predicted, and for the actual class."""
    from pipeline.evaluation import explain

    shown = mistakes.head(n)
    images = data.images[shown["cache_index"].to_numpy()]
    side = min(data.images.shape[1:3])  # grad_cam's layer, as in the report's panel: explain.layer_for
    index = {name: i for i, name in enumerate(data.classes)}
    predicted: np.ndarray | list = (
        explain.grad_cam(model, images, [index[c] for c in shown["predicted"]]) if len(shown) else []
    )
    actual: np.ndarray | list = (
        explain.grad_cam(model, images, [index[c] for c in shown["actual"]]) if len(shown) else []
    )
    slots, maps, captions = [], [], []
    for k, row in enumerate(shown.itertuples()):
        slots += [images[k], images[k]]
        maps += [predicted[k], actual[k]]
        captions += [
            f"pred {row.predicted} ({row.confidence:.2f})",
            f"true {row.actual} ({row.p_actual:.2f})",
        ]
    png = io.BytesIO()
    explain.panel(
        slots,
        maps,
        captions,
        png,
        columns=4,
        wrong=[True, False] * len(shown),
        title=f"Grad-CAM ({explain.describe(side, explain.layer_for(side))}) of misclassified test images:\n"
        "evidence for the predicted (red), then the actual class",
    )
    return png.getvalue()
