"""``python -m pipeline COMMAND``: the DVC stages and the tools around them, one parser each.

Every command module has one shape: ``main(params, args)`` (params loaded from --params, args the parsed
command line) and, when the command takes arguments, ``add_arguments(parser)``. A command's module is
imported only when that command runs (or shows its help): listing the others costs no torch or MLflow.
"""

import argparse
import importlib
import logging
import sys
from typing import NamedTuple

from pipeline.config import PARAMS_FILE, load
from pipeline.credentials import redact
from pipeline.errors import PipelineError, describe


class Command(NamedTuple):
    module: str
    synopsis: str  # its arguments, as listed by `python -m pipeline --help` (tests/test_main.py checks them)
    help: str


STAGES = ("demo", "size", "ingest", "pool", "augment", "pretrain", "tune", "train", "evaluate")
COMMANDS = {
    "demo": Command("pipeline.stages.demo", "", "DVC stage: generate the demo set"),
    "size": Command(
        "pipeline.stages.size", "", "DVC stage: resolve data.image_size (auto: the starting weights' size)"
    ),
    "ingest": Command("pipeline.stages.ingest", "", "DVC stage: validate, split and cache the data set"),
    "pool": Command("pipeline.stages.pool", "", "DVC stage: decode the unlabelled pool, leaving out leaks"),
    "augment": Command("pipeline.stages.augment", "", "DVC stage: the training augmentation and its preview"),
    "pretrain": Command(
        "pipeline.stages.pretrain", "", "DVC stage: self-supervised pretraining on the pool (pretrain.method)"
    ),
    "tune": Command("pipeline.stages.tune", "[--worker]", "DVC stage: the Optuna study (--worker: join it)"),
    "train": Command("pipeline.stages.train", "", "DVC stage: fine-tune with the tuned params"),
    "evaluate": Command("pipeline.stages.evaluate", "", "DVC stage: test metrics, plots and the report"),
    "summary": Command(
        "pipeline.stages.summary", "", "whether every stage is up to date, where the results are"
    ),
    "intake": Command(
        "pipeline.stages.intake",
        "SRC [--name NAME] [--domain DOMAIN] [--layout {auto,folder,shards}] [--unlabelled | --add]",
        "copy a user's image set into paths.raw (--unlabelled: a pool into paths.unlabelled), validate, version and "
        "select it; --add: SRC is labels for pool images, moved into the set",
    ),
    "predict": Command(
        "pipeline.stages.predict",
        "SRC --out CSV [--model-dir DIR] [--decision FILE]",
        "class probabilities for new images",
    ),
    "suggest": Command(
        "pipeline.stages.suggest",
        "--budget N [--strategy {auto,typical,margin,entropy,bald,random}]",
        "the pool images to label next (active learning)",
    ),
    "export": Command(
        "pipeline.stages.export",
        "--format {torchscript,onnx} [--out OUT] [--gray] [--model-dir DIR]",
        "the trained model as one TorchScript or ONNX file",
    ),
    "promote": Command(
        "pipeline.stages.promote",
        "[--version N] [--alias ALIAS] [--model-dir DIR]",
        "point the registered model's alias (champion, what serving loads) at the evaluated model",
    ),
    "weights": Command(
        "pipeline.stages.weights",
        "import FILE [--arch ARCH] [--weights NAME]",
        "check a downloaded checkpoint and place it for offline runs",
    ),
    "tracking": Command(
        "pipeline.tracking",
        "[--tracking-uri URI] [--host HOST] [--port PORT]",
        "the MLflow UI's link to the experiment's runs table (make ui)",
    ),
    "docs": Command(
        "pipeline.docs", "[--output FILE]", "rewrite docs/configuration.md from the typed params"
    ),
    "bench": Command(
        "pipeline.stages.bench",
        "[{quality,scale,transfer,unlabelled,active,gpu} ...]",
        "speed and memory of the hot paths (make bench); quality, scale, transfer, unlabelled, active: "
        "benchmarks on real data; gpu: the GPU paths executed (skipped without CUDA)",
    ),
}
# The top-level --help's description (this module's docstring is for developers).
DESCRIPTION = (
    "The pipeline's DVC stages (dvc repro runs them in order) and the tools around them. Every setting\n"
    "comes from params.yaml (--params: another file); docs/pipeline.md describes each stage."
)
NO_ARGUMENTS = "Takes no arguments: every setting comes from params.yaml (--params: another file)."


# What a Ctrl-C leaves: every output is replaced only when complete (pipeline.fsutil), a killed train resumes
# (pipeline.training.resume) and a study keeps its finished trials (the interrupted one is failed).
INTERRUPTED = "outputs are written only when complete: run the command again to continue or redo it"


class CliHandler(logging.StreamHandler):
    """The CLI's handler on the ``pipeline`` logger, added once per process."""


def build_parser(full: set[str] | frozenset[str] = frozenset()) -> argparse.ArgumentParser:
    """The CLI's parser; the commands in ``full`` get their own arguments and help (importing their modules)."""
    listing = "\n".join(
        f"  {name} {c.synopsis}".rstrip() + f"\n      {c.help}" for name, c in COMMANDS.items()
    )
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        usage="%(prog)s [-h] [--params PARAMS] COMMAND ...",  # the suppressed COMMAND would leave it out
        description=DESCRIPTION,
        epilog=f"commands and their arguments ('python -m pipeline COMMAND --help' for one's own):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default=PARAMS_FILE, help="params file (default: %(default)s)")
    # The listing is the epilog's (arguments included); argparse's own would name the commands alone.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS)
    for name, command in COMMANDS.items():
        if name not in full:
            commands.add_parser(name, prog=f"{parser.prog} {name}")
            continue
        module = importlib.import_module(command.module)
        add_arguments = getattr(module, "add_arguments", None)
        stage = f"A DVC stage: `dvc repro {name}` runs it after the stages it depends on, when its inputs changed."
        sub = commands.add_parser(
            name,
            prog=f"{parser.prog} {name}",
            description=user_help(module),
            epilog=None if add_arguments else NO_ARGUMENTS + ("\n" + stage if name in STAGES else ""),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # Also after the command (`train --params p.yaml`); SUPPRESS keeps a value given before it.
        sub.add_argument("--params", default=argparse.SUPPRESS, help=f"params file (default: {PARAMS_FILE})")
        if add_arguments:
            add_arguments(sub)
    return parser


def user_help(module: object) -> str:
    """A command's description for its --help: the module's ``HELP`` where its docstring speaks to developers,
    else the docstring; reST's double backquotes shown as Markdown's single ones."""
    text = getattr(module, "HELP", None) or getattr(module, "__doc__", None) or ""
    return text.strip().replace("``", "`")


def chosen(argv: list[str]) -> str | None:
    """The command named on the command line (the first word that is one, --params' value skipped)."""
    words = iter(argv)
    for word in words:
        if word == "--params":
            next(words, None)
        elif word in COMMANDS:
            return word
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = chosen(argv)
    parser = build_parser({name} if name else set())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.error("a command is required")
    # Our own loggers only: Lightning and Optuna already print through handlers of their own.
    # Once per process: tests call main() repeatedly, and stderr may be swapped between calls.
    ours = logging.getLogger("pipeline")
    handler = next((h for h in ours.handlers if isinstance(h, CliHandler)), None)
    if handler is None:
        handler = CliHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
    handler.stream = sys.stderr  # the current one (tests swap it); setStream would flush a closed one
    ours.setLevel(logging.INFO)
    command = importlib.import_module(COMMANDS[args.command].module)
    try:
        status = command.main(load(args.params), args)
    except PipelineError as err:  # anything else keeps its traceback
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk, a read-only folder, a damaged database: the machine, not a bug
        if (described := describe(err)) is None:
            raise
        print(f"error: {one_line(described)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: {args.command} interrupted (Ctrl-C); {INTERRUPTED}", file=sys.stderr)
        return 130
    return status if isinstance(status, int) else 0  # a command run in a process of its own: its status


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
