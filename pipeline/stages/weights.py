"""weights import FILE --arch ARCH [--weights NAME]: check a downloaded torchvision checkpoint and place it
where offline runs find it ($TORCH_HOME/hub/checkpoints), for machines without internet access."""

import argparse
from pathlib import Path

from pipeline.config import Arch, Params
from pipeline.weights import import_checkpoint, weight_enum


def main(params: Params, argv: list[str], params_file: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline weights", description=__doc__)
    parser.add_argument("action", choices=["import"])
    parser.add_argument(
        "file", type=Path, metavar="FILE", help="the .pth file as downloaded from torchvision's URL"
    )
    parser.add_argument(
        "--arch",
        default=params.model.arch,
        choices=Arch.__args__,
        help="architecture it is for (default: model.arch, now %(default)s)",
    )
    parser.add_argument(
        "--weights",
        default="imagenet",
        metavar="NAME",
        help="'imagenet' (the arch's default weights) or an enum name like ResNet50_Weights.IMAGENET1K_V2",
    )
    args = parser.parse_args(argv)
    target = import_checkpoint(args.file, args.arch, args.weights)
    print(
        f"weights: {args.file} checked ({weight_enum(args.arch, args.weights)}: hash and keys) -> {target}\n"
        f"runs with model.arch: {args.arch}, model.weights: {args.weights} now load it offline"
    )
