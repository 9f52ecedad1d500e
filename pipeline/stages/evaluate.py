"""evaluate: test-split metrics with intervals (with and without TTA, before and after temperature scaling),
plots and the report; logged to the train run in MLflow under the same names. Decisions (threshold,
conformal quantile) and the label audit come from the validation predictions, the selection set."""

import os
from pathlib import Path

import mlflow

from pipeline import augment, crossval, evaluation, explain, serve, tracking
from pipeline.config import Params
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.evaluation import audit, decision
from pipeline.evaluation.reporting import split_headline
from pipeline.fsutil import atomic_dir, atomic_file, write_json
from pipeline.runinfo import RUN_INFO
from pipeline.stages import open_tracking, stage_input


def split_arrays(prepared: Prepared, split: str) -> tuple:
    """Cached images and label indices of one split."""
    rows = prepared.split(split)
    return prepared.images[rows["cache_index"].to_numpy()], rows["label_index"].to_numpy()


def main(params: Params) -> None:
    paths, settings = params.paths, params.evaluate
    tta = augment.build_tta(settings.tta)  # a bad entry fails before any work
    stage_input(Path(paths.model_dir) / RUN_INFO, "paths.model_dir", "train")
    prepared = load_prepared(Path(paths.prepared))
    positive = evaluation.positive_index(prepared.classes, settings.positive_class)  # a bad class fails early
    decision.check(settings, len(prepared.classes))  # so does a threshold on a multi-class task
    trained = serve.load_trained(Path(paths.model_dir))
    model, run = trained.model, trained.run
    images, labels = split_arrays(prepared, "test")
    # The held-out predictions that temperature, threshold, conformal sets and the label audit are fitted
    # on: out-of-fold with data.folds (val images trained most fold members), else the val split's.
    oof = crossval.load_oof(Path(paths.model_dir))
    if oof is None:
        held_rows, held_out, held_name = prepared.split("val"), None, "validation"
    else:
        held_rows, held_name = oof, "out-of-fold"
        held_out = (crossval.oof_logits(oof, prepared.classes), oof["label_index"].to_numpy())
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
    if oof is not None:
        result.metrics.update(crossval.cv_metrics(oof, prepared.classes, positive))
    suspects = audit.label_issues(*result.selection, held_rows["path"], prepared.classes)
    audit_png = (
        audit.panel_png(
            prepared.images[held_rows["cache_index"].to_numpy()], suspects, settings.label_audit_panel
        )
        if settings.label_audit_panel and len(suspects)
        else None
    )
    metrics = result.metrics | {
        "weights/pretrained": run.weights.pretrained,
        "weights/source": run.weights.source,
    }
    plots = Path(paths.plots)
    embedded = [os.path.relpath(plots / name, Path(paths.report).parent) for name in evaluation.IMAGES]
    # The Grad-CAM panel (pipeline.explain): rendered now, written with the other plots below.
    gradcam = explain.panel_png(
        model, images, labels, result.probs, prepared.classes, settings.gradcam_per_class, settings.batch_size
    )
    if gradcam is not None:
        embedded.append(os.path.relpath(plots / explain.PANEL_PNG, Path(paths.report).parent))
    report_dir = Path(paths.report).parent
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

    # Everything is computed before anything is replaced: a failure above leaves the old outputs.
    with atomic_dir(plots) as staging:
        evaluation.write_plots(
            staging, result.probs, labels, prepared.classes, result.calibrated, settings.ece_bins
        )
        if gradcam is not None:
            (staging / explain.PANEL_PNG).write_bytes(gradcam)
        if audit_png is not None:
            (staging / audit.PANEL_PNG).write_bytes(audit_png)
    with atomic_file(paths.label_audit) as tmp:
        suspects.to_csv(tmp, index=False)
    result.decision.write(paths.decision)
    with atomic_file(paths.confusion) as tmp:
        evaluation.confusion_table(result.probs, labels, prepared.classes).to_csv(tmp, index=False)
    with atomic_file(paths.report) as tmp:
        tmp.write_text(report)
    headline, detail = split_headline(metrics)  # DVC shows the first file by default
    write_json(paths.metrics_detail, detail)
    write_json(paths.metrics, headline)

    open_tracking(params)
    with mlflow.start_run(run_id=run.run_id):
        tracking.log_metrics(metrics)
        mlflow.log_artifacts(str(plots), artifact_path="evaluation")
        for path in (
            paths.metrics,
            paths.metrics_detail,
            paths.confusion,
            paths.report,
            paths.decision,
            paths.label_audit,
        ):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
    shown = [
        f"{split}/{m}={metrics[f'{split}/{m}']:.4f}"
        for split in ("test", evaluation.TTA_SPLIT)
        for m in evaluation.HEADLINE
        if f"{split}/{m}" in metrics
    ]
    print("evaluate: " + "  ".join(shown) + f"  -> {paths.metrics}, {paths.report}")
