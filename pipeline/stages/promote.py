"""promote [--version N] [--alias NAME]: point the registered model's alias (default 'champion') at a version.

Default: the version registered by the train run of the model in paths.model_dir (the MLflow run tagged
model.sha256 with models/run.json's model_sha256), its
test-metric tags set from the evaluate run that wrote the workspace's paths.metrics (the evaluation whose
decision predict applies, not a later evaluate-only experiment's). Serving loads models:/<name>@champion, never
'latest' (which is whatever trained last, a throwaway experiment included): this command is the only step
that moves the alias (docs/serving.md). <name> is mlflow.registered_model with {dataset} filled in.
"""

import argparse
import json
from pathlib import Path

from pipeline import registry, tracking
from pipeline.config import ConfigError, Params
from pipeline.runinfo import RUN_INFO, RunInfo
from pipeline.stages import stage_input
from pipeline.stages.tracked import open_tracking


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", metavar="N", help="this registered version (default: models/run.json's)")
    parser.add_argument("--alias", default=registry.CHAMPION, help="the alias to move (default: %(default)s)")
    parser.add_argument(
        "--model-dir", type=Path, metavar="DIR", help="the train stage's output (default: paths.model_dir)"
    )


def main(params: Params, args: argparse.Namespace) -> None:
    from mlflow import MlflowClient  # here: `--help` costs no MLflow import

    name = params.mlflow.model_name(params.data.dataset)
    if name is None:
        raise ConfigError("mlflow.registered_model is null: the model is not registered, nothing to promote")
    run_id = None
    if args.version is None:
        model_dir = args.model_dir or Path(params.paths.model_dir)
        sha256 = RunInfo.read(
            stage_input(model_dir / RUN_INFO, "paths.model_dir", "train").parent
        ).model_sha256
        metrics = stage_input(params.paths.metrics, "paths.metrics", "evaluate")
    open_tracking(params)
    client = MlflowClient()
    if args.version is None:
        run_id = tracking.model_run(sha256).info.run_id  # the train run tagged with the model's sha256
        headline = json.loads(metrics.read_text())
        evaluation = registry.evaluation_of(client, run_id, headline)
        if evaluation is None:
            raise registry.RegistryError(
                f"{metrics} matches no evaluate run of MLflow run {run_id} (the model in {model_dir}): "
                "rerun the evaluate stage (dvc repro evaluate), then promote"
            )
        registry.tag_evaluated(client, name, run_id, headline, registry.evaluation_tags(evaluation))
    chosen = registry.promote(client, name, run_id=run_id, version=args.version, alias=args.alias)
    print(
        f"promote: models:/{name}@{args.alias} is now version {chosen.version} (MLflow run {chosen.run_id}); "
        f"load it with mlflow.pyfunc.load_model('models:/{name}@{args.alias}')"
    )
