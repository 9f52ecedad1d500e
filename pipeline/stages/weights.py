"""weights import FILE [--arch ARCH] [--weights NAME]: check a downloaded torchvision checkpoint, or a named
domain backbone's file, and place it where offline runs find it ($TORCH_HOME/hub/checkpoints), for machines
without internet access."""

import argparse
from pathlib import Path
from typing import get_args

from pipeline import backbones
from pipeline.config import Arch, Params


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["import"], metavar="import", help="the one action")
    parser.add_argument(
        "file", type=Path, metavar="FILE", help="the .pth file as downloaded from the weights' URL"
    )
    parser.add_argument(
        "--arch",
        choices=get_args(Arch),
        metavar="ARCH",
        help=f"architecture it is for, one of {', '.join(get_args(Arch))} (default: model.arch; a named "
        "backbone has its own)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="NAME",
        help="'imagenet' (the arch's default weights), an enum name like ResNet50_Weights.IMAGENET1K_V2, "
        f"or a named domain backbone: {backbones.choices()}",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    # Here, not at the top: `--help` of this command then costs no torch import (20-38 s on a busy machine).
    from pipeline.training.weights import import_checkpoint, weight_enum

    arch = args.arch or params.model.arch
    target = import_checkpoint(args.file, arch, args.weights)
    named = backbones.NAMED.get(args.weights)
    label = f"{named.name} ({named.enum})" if named else weight_enum(arch, args.weights)
    print(
        f"weights: {args.file} checked ({label}: hash and keys) -> {target}\n"
        f"runs with model.arch: {named.arch if named else arch}, model.weights: {args.weights} now load it offline"
    )
