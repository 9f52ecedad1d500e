"""ingest: validate and split paths.raw/data.dataset, cache its decoded pixels in paths.prepared at the size the
size stage resolved (paths.image_size; data.image_size when it is a number); files intake already decoded, with
the same bytes and settings, are taken from paths.validated."""

import argparse
from pathlib import Path

from pipeline.config import Params
from pipeline.data.card import summary
from pipeline.data.ingest import ingest
from pipeline.data.size import ImageSize, set_by_params
from pipeline.stages import dataset_dir


def main(params: Params, args: argparse.Namespace) -> None:
    side = params.data.image_size
    report = ingest(
        dataset_dir(params),
        Path(params.paths.prepared),
        seed=params.seed,
        data=params.data,
        reuse=Path(params.paths.validated)
        / params.data.dataset,  # intake's decodes, where bytes are unchanged
        resolved=ImageSize.read(Path(params.paths.image_size)) if side == "auto" else set_by_params(side),
    )
    print(summary(report))
