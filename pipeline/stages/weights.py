"""weights import FILE [--arch ARCH] [--weights NAME]: check a downloaded torchvision checkpoint, or a named
domain backbone's file, and place it where offline runs find it ($TORCH_HOME/hub/checkpoints), for machines
without internet access."""

import argparse
from pathlib import Path

from pipeline import backbones
from pipeline.config import Arch, Params
from pipeline.weights import import_checkpoint, weight_enum


def main(params: Params, argv: list[str], params_file: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline weights", description=__doc__)
    parser.add_argument("action", choices=["import"])
    parser.add_argument(
        "file", type=Path, metavar="FILE", help="the .pth file as downloaded from the weights' URL"
    )
    parser.add_argument(
        "--arch",
        default=params.model.arch,
        choices=Arch.__args__,
        help="architecture it is for (default: model.arch, now %(default)s; a named backbone has its own)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="NAME",
        help="'imagenet' (the arch's default weights), an enum name like ResNet50_Weights.IMAGENET1K_V2, "
        f"or a named domain backbone: {backbones.choices()}",
    )
    args = parser.parse_args(argv)
    target = import_checkpoint(args.file, args.arch, args.weights)
    named = backbones.NAMED.get(args.weights)
    label = f"{named.name} ({named.enum})" if named else weight_enum(args.arch, args.weights)
    arch = named.arch if named else args.arch
    print(
        f"weights: {args.file} checked ({label}: hash and keys) -> {target}\n"
        f"runs with model.arch: {arch}, model.weights: {args.weights} now load it offline"
    )
