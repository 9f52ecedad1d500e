"""tune [--worker]: Optuna study over tune.search_space; writes the best values for the train stage.

With --worker it joins the study that the tune stage created in the shared tune.storage, from any
machine with the same commit, params and data: it runs trials (tune.n_jobs processes) until the study
holds tune.n_trials, nested under the study's MLflow parent run, and writes no outputs.

Started by a multi-process launcher (torchrun, srun: one process per rank), only global rank 0 is a worker:
one trial per worker, not per rank.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from pipeline.config import Params, value_at
from pipeline.data.prepared import load_prepared
from pipeline.environ import use_cpu_threads
from pipeline.fsutil import atomic_file, write_json
from pipeline.stages import dataset_dir
from pipeline.stages.tracked import open_tracking

if TYPE_CHECKING:
    from pipeline import tune


def study_of(params: Params) -> tuple[str, dict[str, str], tune.TrialData]:
    """The study these params and data name (the same on every machine), the MLflow tags of its runs,
    and the data its trials train on."""
    from pipeline import tune

    tags = open_tracking(params)
    data = tune.TrialData(Path(params.paths.prepared), Path(params.paths.augment_pipeline), params.seed)
    return (
        tune.study_name(params, f"{tags['data.version']}-{load_prepared(data.prepared).digest}"),
        tags,
        data,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", action="store_true", help="join the tune stage's study; write no outputs")


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline import tune

    # Launched once per rank (torchrun, srun, a DDP train setup): a trial is a one-device fit, so rank 0's
    # worker runs them (tune.n_jobs for more at once) and the other ranks start none and write nothing.
    rank = getattr(rank_zero_only, "rank", 0)
    if rank:
        print(f"tune: rank {rank} of a multi-process launch starts no trial (rank 0's worker runs them)")
        return
    worker = args.worker
    paths = params.paths
    study, plan = tune.planned(params)
    if study is None:
        if worker:
            raise tune.TuneError(f"{args.params}: {plan}: there is no study to join")
        print(f"tune: {plan}")
        best = {key: value_at(params, key) for key in params.tune.search_space}
        summary = {"enabled": False}
    else:
        params = study
        use_cpu_threads(params.train.cpu_threads)
        print(f"tune: {plan}")
        name, tags, data = study_of(params)
        if worker:
            ran = tune.join(params, data, name, tags)
            print(f"tune --worker: ran {ran} trials of study {name}")
            return
        done, summary = tune.run(params, data, name, tags, dataset=dataset_dir(params))
        best = done.best_params
        print(
            f"tune: study {name}: {summary['trials_complete']} complete, {summary['trials_pruned']} pruned, "
            f"{summary['trials_failed']} failed; best {params.train.monitor}={summary['best_value']:.4f}"
        )
    with atomic_file(paths.best_params) as tmp:
        tmp.write_text(yaml.safe_dump(best, sort_keys=True))
    # Kept in git (dvc.yaml: cache false): the wall time would change it on every run (MLflow has it).
    write_json(paths.tune_summary, {k: v for k, v in summary.items() if k != "wall_time_s"})
    print(f"tune: best params {best} -> {paths.best_params}")
