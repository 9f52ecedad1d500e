"""evaluate: test-split metrics (with and without TTA), confusion plot and report; logged to the train run in MLflow."""

import json
from pathlib import Path

import mlflow

from pipeline import augment, evaluation, tracking
from pipeline.config import Params
from pipeline.data.ingest import REPORT_JSON, load_prepared
from pipeline.fsutil import atomic_dir, atomic_file, write_json
from pipeline.model import Classifier
from pipeline.stages import open_tracking
from pipeline.stages.train import RUN_INFO

CONFUSION_PNG = "confusion_matrix.png"


def main(params: Params) -> None:
    paths = params.paths
    tta = augment.build_tta(params.evaluate.tta)  # a bad entry fails before any work
    run = json.loads((Path(paths.model_dir) / RUN_INFO).read_text())
    prepared = load_prepared(Path(paths.prepared))
    model = Classifier.load_from_checkpoint(Path(paths.model_dir) / run["checkpoint"], map_location="cpu")
    test = prepared.split("test")
    labels = test["label_index"].to_numpy()
    probs, metrics = evaluation.evaluate(model, prepared.images[test["cache_index"].to_numpy()], labels,
                                         prepared.classes, params.evaluate.batch_size, tta)
    metrics |= {"weights/pretrained": run["weights"]["pretrained"], "weights/source": run["weights"]["source"]}
    table = evaluation.confusion_table(probs, labels, prepared.classes)
    data_report = json.loads((Path(paths.prepared) / REPORT_JSON).read_text())
    plots = Path(paths.plots)
    report = evaluation.report(metrics, data_report, run, [str(Path(plots.name) / CONFUSION_PNG)],
                               [type(t).__name__ for t in tta])

    # Everything is computed before anything is replaced: a failure above leaves the old outputs.
    with atomic_dir(plots) as staging:
        evaluation.plot_confusion(table, prepared.classes, staging / CONFUSION_PNG)
    with atomic_file(paths.confusion) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_file(paths.report) as tmp:
        tmp.write_text(report)
    write_json(paths.metrics, metrics)

    open_tracking(params)
    with mlflow.start_run(run_id=run["run_id"]):
        tracking.log_metrics(metrics)
        for path in (paths.metrics, paths.confusion, paths.report, plots / CONFUSION_PNG):
            mlflow.log_artifact(str(path), artifact_path="evaluation")
    shown = [f"{split}/{m}={metrics[f'{split}/{m}']:.4f}" for split in ("test", evaluation.TTA_SPLIT)
             for m in evaluation.HEADLINE if f"{split}/{m}" in metrics]
    print("evaluate: " + "  ".join(shown) + f"  -> {paths.metrics}, {paths.report}")
