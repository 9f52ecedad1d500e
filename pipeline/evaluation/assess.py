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

from pipeline import augment, registry, tracking
from pipeline.config import Params, Paths, flatten
from pipeline.data import rounds as active
from pipeline.data.cache import Rows
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.evaluation import audit, decision, explain, rounds
from pipeline.evaluation import evaluate as evaluation
from pipeline.evaluation.reporting import split_headline
from pipeline.fsutil import atomic_dir, atomic_file, write_json
from pipeline.runinfo import MODEL_SHA_TAG
from pipeline.serve.shipped import load_trained
from pipeline.training.oof import cv_metrics, load_oof, oof_logits


def split_arrays(prepared: Prepared, split: str) -> tuple[Rows, np.ndarray]:
    """Cached images (read when indexed, not copied: bounded memory) and label indices of one split."""
    rows = prepared.split(split)
    return Rows(prepared.images, rows["cache_index"].to_numpy()), rows["label_index"].to_numpy()


@dataclass(frozen=True)
class Assessment:
    """What the evaluate stage writes, computed and held until every part succeeded."""

    model_sha256: str  # the evaluated model's (run.json): its MLflow train run carries it as a tag
    arch: str
    classes: tuple[str, ...]
    labels: np.ndarray  # of the test split
    result: evaluation.Evaluation
    metrics: dict[str, Any]
    suspects: pd.DataFrame  # likely label errors, most suspect first
    audit_png: bytes | None
    gradcam_png: bytes | None
    curve_png: bytes | None  # test metrics by active-learning round, from the second round on
    report: str


def assess(params: Params, earlier_rounds: pd.DataFrame | None = None) -> Assessment:
    """Everything the stage writes. ``earlier_rounds``: the data set's earlier active-learning rounds
    (``rounds.earlier``, from MLflow); with them, the curve of test metrics by round."""
    paths, settings = params.paths, params.evaluate
    tta = augment.build_tta(settings.tta)  # a bad entry fails before any work
    prepared = load_prepared(Path(paths.prepared))
    positive = evaluation.positive_index(prepared.classes, settings.positive_class)  # a bad class fails early
    decision.check(settings, len(prepared.classes))  # so does a threshold on a multi-class task
    trained = load_trained(Path(paths.model_dir))
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
        model_sha256=run.model_sha256,
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
        if settings.label_audit_panel and len(audit.disputed(suspects))
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
    curve = None
    if earlier_rounds is not None:
        curve = rounds.curve_png(rounds.points(earlier_rounds, *active.current(prepared.report), metrics))
    if curve is not None:
        embedded.append(os.path.relpath(plots / rounds.CURVE_PNG, report_dir))
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
        provenance=provenance(params),
    )
    return Assessment(
        run.model_sha256,
        run.arch,
        prepared.classes,
        labels,
        result,
        metrics,
        suspects,
        audit_png,
        gradcam,
        curve,
        report,
    )


def provenance(params: Params) -> dict[str, str]:
    """The report's provenance: the data set and its DVC hash, the commit of the code the pipeline runs.

    Nothing that differs between two runs of the same inputs (the date, MLflow run ids, HEAD when a later
    commit only recorded outputs): the report is a DVC output, and dvc.lock must come out the same in a fresh
    clone. The evaluation's date and run are in MLflow, under the model's sha256 tag.
    """
    raw_dir = Path(params.paths.raw) / params.data.dataset
    commit, dirty = tracking.code_version()
    return {
        "data.dataset": raw_dir.name,
        "data.version": tracking.data_version(raw_dir),
        "code.commit": commit,
        "code.dirty": "unknown" if dirty is None else str(dirty).lower(),
        "code.paths": ", ".join(f"`{path}`" for path in tracking.CODE_PATHS),
    }


def write(paths: Paths, done: Assessment, ece_bins: int) -> None:
    """The stage's outputs, each replaced whole: plots, label audit, decision, confusion, report, metrics."""
    result = done.result
    assert result.decision is not None  # checked in assess
    with atomic_dir(paths.plots) as staging:
        made = result.decision
        positive = None if made.positive_class is None else done.classes.index(made.positive_class)
        evaluation.write_plots(
            staging,
            result.probs,
            done.labels,
            done.classes,
            result.calibrated,
            ece_bins,
            positive=positive,
            threshold=made.threshold,
        )
        if done.gradcam_png is not None:
            (staging / explain.PANEL_PNG).write_bytes(done.gradcam_png)
        if done.audit_png is not None:
            (staging / audit.PANEL_PNG).write_bytes(done.audit_png)
        if done.curve_png is not None:
            (staging / rounds.CURVE_PNG).write_bytes(done.curve_png)
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


def log(params: Params, done: Assessment, tags: dict[str, str]) -> str:
    """One MLflow run per evaluation, nested under the train run, with the metrics and files; its id.

    A nested run rather than the train run itself: an evaluate-only experiment (``dvc exp run -S
    evaluate.threshold=...``) adds a record instead of overwriting the one that matches the committed
    model and decision. ``tags`` (the lineage, ``dvc.exp_name`` included) go on it; the version the train
    run registered gets the headline metrics (``pipeline.registry``).
    """
    paths = params.paths
    trained = tracking.model_run(done.model_sha256)  # run.json names no run: the tag on the run finds it
    with mlflow.start_run(run_id=trained.info.run_id) as parent:
        name = tracking.run_name("evaluate", done.arch, tags)
        stage = {
            "stage": "evaluate",
            "evaluate.threshold": str(params.evaluate.threshold),
            MODEL_SHA_TAG: done.model_sha256,  # the report's pointer to this record: its date and run
        }
        with mlflow.start_run(run_name=name, nested=True, tags=tags | stage) as child:
            mlflow.log_params(
                {k: "" if v is None else v for k, v in flatten(params).items() if k.startswith("evaluate.")}
            )
            tracking.log_metrics(done.metrics)
            for path, artifact_dir in artifact_places(paths):
                if Path(path).is_dir():
                    mlflow.log_artifacts(str(path), artifact_path=artifact_dir)
                else:
                    mlflow.log_artifact(str(path), artifact_path=artifact_dir)
        registered = params.mlflow.model_name(params.data.dataset)
        if registered is not None:  # the latest evaluation; promote re-tags from the one the workspace holds
            client = mlflow.MlflowClient()
            evaluation = registry.evaluation_tags(client.get_run(child.info.run_id))
            headline_metrics = split_headline(done.metrics)[0]
            registry.tag_evaluated(client, registered, parent.info.run_id, headline_metrics, evaluation)
    return child.info.run_id


ARTIFACT_DIR = "evaluation"


def artifact_places(paths: Paths) -> list[tuple[str, str]]:
    """(local path, artifact folder) of each file the evaluate stage logs, placed as they lie beside the report
    so that its relative links (``plots/roc.png``) resolve in the MLflow artifact viewer; a file outside the
    report's folder goes to the top of ``evaluation/``."""
    report_dir = Path(paths.report).parent
    places = []
    for path in (
        paths.plots,
        paths.metrics,
        paths.metrics_detail,
        paths.confusion,
        paths.report,
        paths.decision,
        paths.label_audit,
    ):
        relative = Path(os.path.relpath(path, report_dir))
        inside = ".." not in relative.parts
        if Path(path).is_dir():
            folder = relative if inside else Path(Path(path).name)
        else:
            folder = relative.parent if inside else Path()
        places.append((str(path), (Path(ARTIFACT_DIR) / folder).as_posix()))
    return places


def headline(metrics: dict[str, Any]) -> str:
    """The headline metrics, with and without TTA, and at the tuned cut predict applies, as one line."""
    return "  ".join(
        f"{split}/{m}={metrics[f'{split}/{m}']:.4f}"
        for split in ("test", evaluation.TTA_SPLIT, decision.THRESHOLD_SPLIT)
        for m in (*evaluation.HEADLINE, *evaluation.BINARY)
        if f"{split}/{m}" in metrics
    )
