"""``python -m benchmarks [quality|scale|transfer|unlabelled|active|gpu] ...`` (``make bench``, ``python -m pipeline bench``): the
speed bench of the hot paths, or the one named, on real data (minutes each, not part of ``make bench``)."""

import argparse
import importlib
import sys

from pipeline.__main__ import one_line
from pipeline.config import PARAMS_FILE, load
from pipeline.errors import PipelineError

BENCHES = {  # minutes on real data each, not part of make bench
    "quality": "benchmarks.quality",
    "scale": "benchmarks.scale",
    "transfer": "benchmarks.transfer",
    "unlabelled": "benchmarks.unlabelled",
    "active": "benchmarks.active",
    "gpu": "benchmarks.gpu",  # about 8 minutes on one GPU; one line, skipped, without CUDA
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    benches = parser.add_subparsers(dest="bench", title="on real data (default: the speed bench)")
    for name, module_name in BENCHES.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip()
        sub = benches.add_parser(
            name,
            help=doc.split("\n")[0].split(": ", 1)[-1],
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(BENCHES[args.bench] if args.bench else "benchmarks.speed")
    try:
        module.main(load(args.params), args)
    except PipelineError as err:  # as python -m pipeline prints it
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
