"""pool: decode the unlabelled pool paths.unlabelled/data.unlabelled into paths.pool, leaving out its duplicates
of labelled images and its groups (patients) in val or test (pipeline/data/pool.py); data.unlabelled null: an
empty paths.pool. Files intake already decoded, with the same bytes and settings, are taken from paths.validated.
"""

import argparse
from pathlib import Path

from pipeline.config import Params
from pipeline.data.card import pool_summary
from pipeline.data.pool import no_pool, prepare_pool, validated_store
from pipeline.data.prepared import DataError
from pipeline.stages import stage_input


def main(params: Params, args: argparse.Namespace) -> None:
    name, out = params.data.unlabelled, Path(params.paths.pool)
    if name is None:
        no_pool(out)
        print("pool: no unlabelled pool selected (data.unlabelled: null)")
        return
    raw = Path(params.paths.unlabelled) / name
    if not raw.is_dir():
        found = sorted(p.name for p in raw.parent.iterdir() if p.is_dir()) if raw.parent.is_dir() else []
        raise DataError(
            f"data.unlabelled: {name}: no pool {raw} (pools in {raw.parent}: {', '.join(found) or 'none'}); "
            f"take one in with python -m pipeline intake SRC --unlabelled --name {name}, or set it to null"
        )
    report = prepare_pool(
        raw,
        out,
        data=params.data,
        labelled=stage_input(params.paths.prepared, "paths.prepared", "ingest"),
        reuse=validated_store(Path(params.paths.validated), name),
    )
    print(pool_summary(report))
