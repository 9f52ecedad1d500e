"""``python -m pipeline <stage>``: dispatch to the stage entry points in ``pipeline.stages``.

``intake SRC [--name NAME]`` takes arguments of its own; the DVC stages take none (params.yaml only).
"""

import argparse
import importlib
import logging
import sys

from pipeline.config import PARAMS_FILE, load
from pipeline.errors import PipelineError

STAGES = ("demo", "ingest", "augment", "tune", "train", "evaluate")
COMMANDS = {**{s: f"pipeline.stages.{s}" for s in STAGES}, "summary": "pipeline.summary",
            "intake": "pipeline.stages.intake"}
WITH_ARGS = frozenset({"intake"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    parser.add_argument("command", choices=list(COMMANDS), help="a DVC stage, 'summary', or 'intake SRC [--name]'")
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in WITH_ARGS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # Our own loggers only: Lightning and Optuna already print through handlers of their own.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    command = importlib.import_module(COMMANDS[args.command])
    try:
        if args.command in WITH_ARGS:
            command.main(load(args.params), rest, args.params)
        else:
            command.main(load(args.params))
    except PipelineError as err:  # anything else keeps its traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
