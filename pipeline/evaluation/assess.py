"""The evaluate stage's work: test metrics, decisions, label audit, plots and report for the trained model.

Everything is computed (:func:`assess`) before anything is replaced (:func:`write`): a failure leaves the old
outputs. Temperature, threshold, conformal sets and the label audit are fitted on held-out predictions:
out-of-fold with ``data.folds`` (val images trained most fold members), else the val split's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from pipeline import augment, explain, serve, tracking
from pipeline.config import Params, Paths
from pipeline.data.cache import Rows
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.evaluation import audit, decision
from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation.reporting import split_headline
from pipeline.fsutil import atomic_dir, atomic_file, write_json
from pipeline.training.oof import cv_metrics, load_oof, oof_logits


def split_arrays(prepared: Prepared, split: str) -> tuple[Rows, np.ndarray]:
    """Cached images (read when indexed, not copied: bounded memory) and label indices of one split."""
    rows = prepared.split(split)
    return Rows(prepared.images, rows["cache_index"].to_numpy()), rows["label_index"].to_numpy()


@dataclass(frozen=True)
class Assessment:
    """What the evaluate stage writes, computed and held until every part succeeded."""

    run_id: str
    classes: tuple[str, ...]
    labels: np.ndarray  # of the test split
    result: evaluation.Evaluation
    metrics: dict[str, Any]
    suspects: pd.DataFrame  # likely label errors, most suspect first
    audit_png: bytes | None
    gradcam_png: bytes | None
    report: str


def assess(params: Params) -> Assessment:
    paths, settings = params.paths, params.evaluate
    tta = augment.build_tta(settings.tta)  # a bad entry fails before any work
    prepared = load_prepared(Path(paths.prepared))
    positive = evaluation.positive_index(prepared.classes, settings.positive_class)  # a bad class fails early
    decision.check(settings, len(prepared.classes))  # so does a threshold on a multi-class task
    trained = serve.load_trained(Path(paths.model_dir))
    model, run = trained.model, trained.run
    images, labels = split_arrays(prepared, "test")
    oof = load_oof(Path(paths.model_dir))
    if oof is None:
        held_rows, held_out, held_name = prepared.split("val"), None, "validation"
    else:
        held_rows, held_name = oof, "out-of-fold"
        held_out = (oof_logits(oof, prepared.classes), oof["label_index"].to_numpy())
    result = evaluation.evaluate(
        model,
        images,
        labels,
        prepared.classes,
        settings,
        params.seed,
        tta,
        val=split_arrays(prepared, "val"),
        held_out=held_out,
        run_id=run.run_id,
    )
    if result.selection is None or result.decision is None:  # evaluate() fits both whenever it has val
        raise RuntimeError("evaluation.evaluate returned no selection set or decision")
    if oof is not None:
        result.metrics.update(cv_metrics(oof, prepared.classes, positive))
    suspects = audit.label_issues(*result.selection, held_rows["path"], prepared.classes)
    audit_png = (
        audit.panel_png(
            Rows(prepared.images, held_rows["cache_index"].to_numpy()), suspects, settings.label_audit_panel
        )
        if settings.label_audit_panel and len(suspects)
        else None
    )
    metrics = result.metrics | {
        "weights/pretrained": run.weights.pretrained,
        "weights/source": run.weights.source,
    }
    gradcam = explain.panel_png(
        model, images, labels, result.probs, prepared.classes, settings.gradcam_per_class, settings.batch_size
    )
    report_dir, plots = Path(paths.report).parent, Path(paths.plots)
    embedded = [os.path.relpath(plots / name, report_dir) for name in evaluation.IMAGES]
    if gradcam is not None:
        embedded.append(os.path.relpath(plots / explain.PANEL_PNG, report_dir))
    sections = decision.report_sections(metrics, result.decision)
    sections.append(
        (
            "Label audit",
            audit.report_section(
                suspects,
                held_name,
                csv_path=os.path.relpath(paths.label_audit, report_dir),
                top=settings.label_audit_panel,
                panel=os.path.relpath(plots / audit.PANEL_PNG, report_dir) if audit_png else None,
            ),
        )
    )
    report = evaluation.report(
        metrics,
        prepared.report,
        run,
        embedded,
        [type(t).__name__ for t in tta],
        settings=settings,
        hparams=dict(model.hparams),
        extra=sections,
    )
    return Assessment(
        run.run_id, prepared.classes, labels, result, metrics, suspects, audit_png, gradcam, report
    )


def write(paths: Paths, done: Assessment, ece_bins: int) -> None:
    """The stage's outputs, each replaced whole: plots, label audit, decision, confusion, report, metrics."""
    result = done.result
    assert result.decision is not None  # checked in assess
    with atomic_dir(paths.plots) as staging:
        evaluation.write_plots(staging, result.probs, done.labels, done.classes, result.calibrated, ece_bins)
        if done.gradcam_png is not None:
            (staging / explain.PANEL_PNG).write_bytes(done.gradcam_png)
        if done.audit_png is not None:
            (staging / audit.PANEL_PNG).write_bytes(done.audit_png)
    with atomic_file(paths.label_audit) as tmp:
        done.suspects.to_csv(tmp, index=False)
    result.decision.write(paths.decision)
    with atomic_file(paths.confusion) as tmp:
        evaluation.confusion_table(result.probs, done.labels, done.classes).to_csv(tmp, index=False)
    with atomic_file(paths.report) as tmp:
        tmp.write_text(done.report)
    headline, detail = split_headline(done.metrics)  # DVC shows the first file by default
    write_json(paths.metrics_detail, detail)
    write_json(paths.metrics, headline)


def log(paths: Paths, done: Assessment) -> None:
    """Metrics, plots and files logged to the train run, under the names the files use."""
    with mlflow.start_run(run_id=done.run_id):
        tracking.log_metrics(done.metrics)
        mlflow.log_artifacts(str(paths.plots), artifact_path="evaluation")
        for path in (
            paths.metrics,
            paths.metrics_detail,
            paths.confusion,
            paths.report,
            paths.decision,
            paths.label_audit,
        ):
            mlflow.log_artifact(str(path), artifact_path="evaluation")


def headline(metrics: dict[str, Any]) -> str:
    """The headline metrics, with and without TTA, as one line."""
    return "  ".join(
        f"{split}/{m}={metrics[f'{split}/{m}']:.4f}"
        for split in ("test", evaluation.TTA_SPLIT)
        for m in evaluation.HEADLINE
        if f"{split}/{m}" in metrics
    )
