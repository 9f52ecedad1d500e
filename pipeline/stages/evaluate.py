"""evaluate: test-split metrics with intervals (with and without TTA, before and after temperature scaling),
plots and the report; logged to MLflow in a run nested under the train run (one per evaluation). Decisions (threshold,
conformal quantile) and the label audit come from the validation predictions, the selection set. From the second
active-learning round on (intake labels.csv --add), a figure of test metrics against labels by round."""
# The work is pipeline.evaluation.assess.

import argparse
from pathlib import Path

from pipeline.config import Params
from pipeline.environ import use_cpu_threads
from pipeline.runinfo import RUN_INFO
from pipeline.stages import stage_input
from pipeline.stages.tracked import open_tracking


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from pipeline.evaluation import assess as evaluating
    from pipeline.evaluation import rounds

    paths = params.paths
    use_cpu_threads(params.train.cpu_threads)  # as the train stage: the same numbers on any machine
    stage_input(Path(paths.model_dir) / RUN_INFO, "paths.model_dir", "train")
    tags = open_tracking(params)
    earlier = rounds.earlier(params.data.dataset)  # the curve by active-learning round (intake --add)
    done = evaluating.assess(params, earlier)  # everything computed before anything is replaced
    evaluating.write(paths, done, params.evaluate.ece_bins)
    run_id = evaluating.log(params, done, tags)
    print(
        f"evaluate: {evaluating.headline(done.metrics)}  -> {paths.metrics}, {paths.report} (MLflow run {run_id})"
    )
