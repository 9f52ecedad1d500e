"""demo: generate the embedded demo set into paths.raw/demo.name (a folder of PNGs per class)."""

import argparse
from pathlib import Path

from pipeline import demo
from pipeline.config import Params
from pipeline.fsutil import atomic_dir


def main(params: Params, args: argparse.Namespace) -> None:
    out = Path(params.paths.raw) / params.demo.name
    with atomic_dir(out) as staging:
        counts = demo.generate(staging, params.demo.n_per_class, params.demo.image_size, params.seed)
    print(f"demo: wrote {sum(counts.values())} PNG images in {len(counts)} classes to {out}")
