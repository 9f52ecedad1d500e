"""tune: Optuna study over tune.search_space; writes the best values for the train stage."""

from pathlib import Path

import mlflow
import yaml

from pipeline import augment, tracking, tune
from pipeline.config import Params, value_at
from pipeline.data.ingest import load_prepared
from pipeline.fit import datamodule
from pipeline.fsutil import atomic_file, write_json
from pipeline.stages import dataset_dir, open_tracking


def main(params: Params) -> None:
    paths = params.paths
    if not params.tune.enabled:
        best = {key: value_at(params, key) for key in params.tune.search_space}
        summary = {"enabled": False}
    else:
        tags = open_tracking(params)
        prepared = load_prepared(Path(paths.prepared))
        transform = augment.load(Path(paths.augment_pipeline), params.seed)
        name = tune.study_name(params, f"{tags['data.version']}-{prepared.digest}")
        study, summary = tune.run(params, lambda p: datamodule(p, prepared, transform), name, tags)
        best = study.best_params
        with mlflow.start_run(run_id=study.user_attrs[tune.RUN_ID_ATTR]):  # the study's parent run
            tracking.log_dataset(dataset_dir(params), tags["data.version"])
        print(f"tune: study {name}: {summary['trials_complete']} complete, {summary['trials_pruned']} pruned, "
              f"{summary['trials_failed']} failed; best {params.train.monitor}={summary['best_value']:.4f}")
    with atomic_file(paths.best_params) as tmp:
        tmp.write_text(yaml.safe_dump(best, sort_keys=True))
    write_json(paths.tune_summary, summary)
    print(f"tune: best params {best} -> {paths.best_params}")
