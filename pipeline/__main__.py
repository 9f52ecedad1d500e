"""``python -m pipeline <stage>``: dispatch to the stage entry points in ``pipeline.stages``.

``intake SRC [--name NAME]`` takes arguments of its own, and ``tune --worker`` (joins a running study);
the DVC stages take none (params.yaml only).
"""

import argparse
import importlib
import logging
import sys

from pipeline.config import PARAMS_FILE, load
from pipeline.credentials import redact
from pipeline.errors import PipelineError

STAGES = ("demo", "ingest", "augment", "tune", "train", "evaluate")
COMMANDS = {
    **{s: f"pipeline.stages.{s}" for s in STAGES},
    "summary": "pipeline.summary",
    "predict": "pipeline.stages.predict",
    "export": "pipeline.stages.export",
    "intake": "pipeline.stages.intake",
    "weights": "pipeline.stages.weights",
}
WITH_ARGS = frozenset({"intake", "weights", "tune", "predict", "export"})


def command_help(command: str) -> str:
    """The help of a command without arguments of its own: its usage and its module's docstring."""
    doc = (importlib.import_module(COMMANDS[command]).__doc__ or "").strip()
    how = (
        f"A DVC stage: `dvc repro {command}` runs it after the stages it depends on, when its inputs changed."
    )
    return (
        f"usage: python -m pipeline {command} [--params PARAMS]\n\n{doc}\n\n"
        f"Takes no arguments: every setting comes from params.yaml (--params: another file).\n"
        + (how if command in STAGES else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, add_help=False)
    parser.add_argument(
        "command",
        nargs="?",
        choices=list(COMMANDS),
        help="a DVC stage, 'summary', 'intake SRC [--name]' or 'tune --worker'",
    )
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("-h", "--help", action="store_true", help="this help; 'intake --help' shows intake's")
    args, rest = parser.parse_known_args(argv)
    if args.help and args.command in WITH_ARGS:
        rest.append("--help")  # the command's own parser prints its help
    elif args.help and args.command:
        print(command_help(args.command))
        return 0
    elif args.help:
        parser.print_help()
        return 0
    elif args.command is None:
        parser.error("a command is required")
    if rest and args.command not in WITH_ARGS:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    # Our own loggers only: Lightning and Optuna already print through handlers of their own.
    # Once per process: tests call main() repeatedly, and stderr may be swapped between calls.
    ours = logging.getLogger("pipeline")
    handler = next((h for h in ours.handlers if getattr(h, "_pipeline_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._pipeline_cli = True
        ours.addHandler(handler)
    handler.stream = sys.stderr  # the current one (tests swap it); setStream would flush a closed one
    logging.getLogger("pipeline").setLevel(logging.INFO)
    command = importlib.import_module(COMMANDS[args.command])
    try:
        if args.command in WITH_ARGS:
            command.main(load(args.params), rest, args.params)
        else:
            command.main(load(args.params))
    except PipelineError as err:  # anything else keeps its traceback
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    return 0


def one_line(message: str) -> str:
    """A message as the one ``error:`` line the CLI prints (a list of bad keys, a tool's stderr joined with
    '; '), with any URI credential masked: the one place every user error passes through."""
    parts = [part.strip() for part in message.splitlines() if part.strip()]
    joined = "".join(
        part if i == 0 else (" " if parts[i - 1].endswith(":") else "; ") + part
        for i, part in enumerate(parts)
    )
    return redact(joined)


if __name__ == "__main__":
    sys.exit(main())
