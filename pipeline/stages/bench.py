"""``python -m pipeline bench [quality|scale|transfer|unlabelled|active|gpu] ...``: the benchmarks, run as ``python -m benchmarks``.

The benchmarks live beside the package (``benchmarks/``) and import it; the package never imports them, so
this command runs them in a process of their own. ``python -m benchmarks --help`` lists their arguments.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import Params

# benchmarks/__main__.py's; the package does not import it
BENCHES = ("quality", "scale", "transfer", "unlabelled", "active", "gpu")
REPO = Path(__file__).resolve().parents[2]  # where benchmarks/ lies beside pipeline/


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "bench", nargs="?", choices=BENCHES, help="a bench on real data (default: the speed bench)"
    )
    parser.add_argument(
        "bench_args", nargs=argparse.REMAINDER, help="its arguments: python -m benchmarks BENCH --help"
    )


def main(params: Params, args: argparse.Namespace) -> int:
    """The bench's exit status (2 after its one ``error:`` line)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    command = [
        sys.executable,
        "-m",
        "benchmarks",
        "--params",
        str(args.params),
        *([args.bench] if args.bench else []),
        *args.bench_args,
    ]
    return subprocess.run(command, env=os.environ | {"PYTHONPATH": path}, check=False).returncode
