"""ingest: validate and split paths.raw/data.dataset, cache its decoded pixels in paths.prepared."""

from pathlib import Path

from pipeline.config import Params
from pipeline.data.card import summary
from pipeline.data.ingest import ingest


def main(params: Params) -> None:
    report = ingest(Path(params.paths.raw) / params.data.dataset, Path(params.paths.prepared),
                    seed=params.seed, data=params.data)
    print(summary(report))
