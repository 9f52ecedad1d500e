"""intake SRC [--name NAME]: copy a user's image set into paths.raw/NAME, validate it, version it, select it.

A manifest's group column is stored hashed with the repository's salt: $PIPELINE_GROUP_SALT when set,
else a random one created once in .dvc/group_salt (git-ignored; keep it to reproduce hashes, share it
through the variable, never print it).
"""

import argparse
import os
from pathlib import Path

from pipeline.config import Params
from pipeline.data.card import summary
from pipeline.data.intake import IntakeError, check_name, default_name, dvc_add, group_salt, intake, set_dataset

SALT_ENV = "PIPELINE_GROUP_SALT"
SALT_FILE = Path(".dvc") / "group_salt"  # in the DVC repository, ignored by .dvc/.gitignore


def main(params: Params, argv: list[str], params_file: str) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline intake", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, metavar="SRC", help="folder with one subfolder per class, or a CSV manifest "
                                               "path,label[,split][,group] (paths relative to its folder)")
    parser.add_argument("--name", help="data set name under paths.raw (default: the source folder's name)")
    args = parser.parse_args(argv)
    name = check_name(args.name or default_name(args.src), "--name")
    if name == params.demo.name:
        raise IntakeError(f"--name {name}: that is the demo stage's output (demo.name); choose another name")
    target = Path(params.paths.raw) / name
    salt = os.environ.get(SALT_ENV) or group_salt(SALT_FILE)
    report = intake(args.src, target, seed=params.seed, data=params.data, salt=salt)
    dvc_add(target)
    set_dataset(Path(params_file), name)
    print(f"intake: {args.src} -> {target} (versioned: {target}.dvc; {params_file}: data.dataset: {name})")
    print(summary(report, target.absolute()))
    print(f"\nnext: git add {target}.dvc {target.parent}/.gitignore {params_file} && dvc repro")
