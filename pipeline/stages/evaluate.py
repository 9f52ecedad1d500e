"""evaluate: test-split metrics with intervals (with and without TTA, before and after temperature scaling),
plots and the report; logged to the train run in MLflow under the same names. Decisions (threshold,
conformal quantile) and the label audit come from the validation predictions, the selection set."""

import json
import os
from pathlib import Path

import mlflow

from pipeline import augment, evaluation, explain, tracking
from pipeline.config import Params
from pipeline.data.ingest import Prepared, load_prepared
from pipeline.evaluation import audit, decision
from pipeline.fit import RUN_INFO
from pipeline.fsutil import atomic_dir, atomic_file, write_json
from pipeline.model import Classifier
from pipeline.stages import open_tracking, stage_input


def split_arrays(prepared: Prepared, split: str) -> tuple:
    """Cached images and label indices of one split."""
    rows = prepared.split(split)
    return prepared.images[rows["cache_index"].to_numpy()], rows["label_index"].to_numpy()


def main(params: Params) -> None:
    paths, settings = params.paths, params.evaluate
    tta = augment.build_tta(settings.tta)  # a bad entry fails before any work
    run = json.loads(stage_input(Path(paths.model_dir) / RUN_INFO, "paths.model_dir", "train").read_text())
    prepared = load_prepared(Path(paths.prepared))
    evaluation.positive_index(prepared.classes, settings.positive_class)  # a bad class fails before any work
    decision.check(settings, len(prepared.classes))  # so does a threshold on a multi-class task
    model = Classifier.load_from_checkpoint(Path(paths.model_dir) / run["checkpoint"], map_location="cpu")
    images, labels = split_arrays(prepared, "test")
    val_images, val_labels = split_arrays(prepared, "val")
    result = evaluation.evaluate(model, images, labels, prepared.classes, settings, params.seed, tta,
                                 val=(val_images, val_labels), run_id=run["run_id"])
    suspects = audit.label_issues(*result.selection, prepared.split("val")["path"], prepared.classes)
    audit_png = audit.panel_png(val_images, suspects, settings.label_audit_panel) \
        if settings.label_audit_panel and len(suspects) else None
    metrics = result.metrics | {"weights/pretrained": run["weights"]["pretrained"],
                                "weights/source": run["weights"]["source"]}
    plots = Path(paths.plots)
    embedded = [os.path.relpath(plots / name, Path(paths.report).parent) for name in evaluation.IMAGES]
    # The Grad-CAM panel (pipeline.explain): rendered now, written with the other plots below.
    gradcam = explain.panel_png(model, images, labels, result.probs, prepared.classes, settings.gradcam_per_class,
                                settings.batch_size)
    if gradcam is not None:
        embedded.append(os.path.relpath(plots / explain.PANEL_PNG, Path(paths.report).parent))
    report_dir = Path(paths.report).parent
    sections = decision.report_sections(metrics, result.decision)
    sections.append(("Label audit", audit.report_section(
        suspects, "validation", csv_path=os.path.relpath(paths.label_audit, report_dir), top=settings.label_audit_panel,
        panel=os.path.relpath(plots / audit.PANEL_PNG, report_dir) if audit_png else None)))
    report = evaluation.report(metrics, prepared.report, run, embedded, [type(t).__name__ for t in tta],
                               settings=settings, hparams=dict(model.hparams), extra=sections)

    # Everything is computed before anything is replaced: a failure above leaves the old outputs.
    with atomic_dir(plots) as staging:
        evaluation.write_plots(staging, result.probs, labels, prepared.classes, result.calibrated, settings.ece_bins)
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
    write_json(paths.metrics, metrics)

    open_tracking(params)
    with mlflow.start_run(run_id=run["run_id"]):
        tracking.log_metrics(metrics)
        mlflow.log_artifacts(str(plots), artifact_path="evaluation")
        for path in (paths.metrics, paths.confusion, paths.report, paths.decision, paths.label_audit):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
    shown = [f"{split}/{m}={metrics[f'{split}/{m}']:.4f}" for split in ("test", evaluation.TTA_SPLIT)
             for m in evaluation.HEADLINE if f"{split}/{m}" in metrics]
    print("evaluate: " + "  ".join(shown) + f"  -> {paths.metrics}, {paths.report}")
