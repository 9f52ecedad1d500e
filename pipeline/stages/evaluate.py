"""evaluate: test-split metrics with intervals (with and without TTA, before and after temperature scaling),
plots and the report; logged to the train run in MLflow under the same names. Decisions (threshold,
conformal quantile) and the label audit come from the validation predictions, the selection set."""
# The work is pipeline.evaluating.

import argparse
from pathlib import Path

from pipeline.config import Params
from pipeline.environ import use_cpu_threads
from pipeline.stages import open_tracking, stage_input


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine);
    # runinfo imports pipeline.weights, so torch.
    from pipeline import evaluating
    from pipeline.runinfo import RUN_INFO

    paths = params.paths
    use_cpu_threads(params.train.cpu_threads)  # as the train stage: the same numbers on any machine
    stage_input(Path(paths.model_dir) / RUN_INFO, "paths.model_dir", "train")
    done = evaluating.assess(params)  # everything computed before anything is replaced
    evaluating.write(paths, done, params.evaluate.ece_bins)
    open_tracking(params)
    evaluating.log(paths, done)
    print(f"evaluate: {evaluating.headline(done.metrics)}  -> {paths.metrics}, {paths.report}")
