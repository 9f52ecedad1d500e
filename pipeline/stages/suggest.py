"""suggest --budget N [--strategy auto|typical|margin|entropy|bald|random]: the pool images to label next.

Ranks the unlabelled pool (data.unlabelled, prepared by the pool stage) with the shipped model's uncertainty,
or, at a cold start (no model yet, or fewer than 10 train labels per class on average), by typicality on
pretrained features (at random on a random init's: docs/training.md); picks a diverse batch (one image per
near-duplicate set or patient, a few per feature cluster); writes paths.suggest (path, rank, score, predicted,
probability, why) and its contact sheet paths.suggest_sheet, and logs both to MLflow with the round number and
label count.
"""
# The work is pipeline.active.suggest.

import argparse
from pathlib import Path
from typing import cast

from pipeline.config import Params
from pipeline.runinfo import RUN_INFO
from pipeline.stages import stage_input
from pipeline.stages.tracked import open_tracking

STRATEGIES = (
    "auto",
    "typical",
    "margin",
    "entropy",
    "bald",
    "random",
)  # acquisition.STRATEGIES (tested equal)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=int, required=True, metavar="N", help="how many images to suggest")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="auto: at a cold start typical (pretrained features) or random (a random init's), then bald "
        "(fold members or test-time views) or margin "
        "(default: %(default)s)",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from pipeline.active import suggest as work
    from pipeline.data.pooled import load_pool
    from pipeline.data.prepared import load_prepared
    from pipeline.serve.shipped import load_trained
    from pipeline.training.model import Classifier

    paths = params.paths
    if args.budget < 1:
        raise work.SuggestError(f"suggest --budget {args.budget}: give a number of images, 1 or more")
    stage_input(Path(paths.pool) / "pool.csv", "paths.pool", "pool")
    pool, prepared = load_pool(Path(paths.pool)), load_prepared(Path(paths.prepared))
    model_dir = Path(paths.model_dir)
    members, pretrained = None, None
    if (model_dir / RUN_INFO).is_file():
        trained = load_trained(model_dir)
        members = [cast(Classifier, m) for m in trained.model.members]
        pretrained = trained.run.weights.pretrained
    suggestion, picks = work.suggest(params, args.budget, args.strategy, members, prepared, pool, pretrained)
    csv, sheet = Path(paths.suggest), Path(paths.suggest_sheet)
    work.write(suggestion, pool, picks, csv, sheet)
    open_tracking(params)
    number = work.record(suggestion, params, params.data.dataset, csv, sheet)
    print(
        f"suggest: round {number}, {len(picks)} of {len(pool)} pool images by {suggestion.strategy} "
        f"({suggestion.labels} labels so far) -> {csv}, {sheet}"
    )
