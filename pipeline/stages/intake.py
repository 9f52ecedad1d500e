"""intake SRC [--name NAME]: copy a user's image set into paths.raw/NAME, validate it, version it, select it."""

import argparse
from pathlib import Path

from pipeline.config import Params
from pipeline.data.card import summary
from pipeline.data.intake import IntakeError, check_name, default_name, dvc_add, intake, set_dataset


def main(params: Params, argv: list[str], params_file: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline intake", description=__doc__)
    parser.add_argument("src", type=Path, help="folder with one subfolder per class, or a CSV manifest "
                                               "path,label[,split][,group] (paths relative to its folder)")
    parser.add_argument("--name", help="data set name under paths.raw (default: the source folder's name)")
    args = parser.parse_args(argv)
    name = check_name(args.name or default_name(args.src), "--name")
    if name == params.demo.name:
        raise IntakeError(f"--name {name}: that is the demo stage's output (demo.name); choose another name")
    target = Path(params.paths.raw) / name
    report = intake(args.src, target, seed=params.seed, data=params.data)
    dvc_add(target)
    set_dataset(Path(params_file), name)
    print(f"intake: {args.src} -> {target} (versioned: {target}.dvc; {params_file}: data.dataset: {name})")
    print(summary(report, target.absolute()))
    print(f"\nnext: git add {target}.dvc {target.parent}/.gitignore {params_file} && dvc repro")
