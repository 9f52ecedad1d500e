"""intake SRC [--name NAME] [--domain DOMAIN] [--layout auto|folder|shards] [--unlabelled]: copy a user's image set into
paths.raw/NAME, validate it, version it, select it. A set of 2,000 images or more is stored as tar shards of
~1,000 files with a per-file manifest (paths.raw/NAME/shards.csv, for git) unless --layout says otherwise.
--domain sets augment.preset, augment.transforms and evaluate.tta in params.yaml to what fits that kind of
image (pipeline/augment.py DOMAINS: no flips for radiographs, any flip for tissue tiles, ...).

--unlabelled: SRC is an unlabelled pool (a folder of images, subfolders allowed, or a CSV with a path column
and an optional group column), copied into paths.unlabelled/NAME, validated, versioned and selected as
data.unlabelled (pipeline/data/pool.py; the pool stage then leaves out what duplicates the labelled set).

A manifest's group column (or, without one, each DICOM file's data.dicom_group element) is stored hashed
with the repository's salt: $PIPELINE_GROUP_SALT when set, else a random one created once in
.dvc/group_salt (git-ignored; keep it to reproduce hashes, share it through the variable, never print it).
"""

import argparse
import os
from pathlib import Path

from pipeline.augment import DOMAINS, tta_conflicts
from pipeline.config import Params
from pipeline.data.card import augmentation, pool_summary, summary
from pipeline.data.intake import (
    IntakeError,
    check_name,
    default_name,
    dvc_add,
    group_salt,
    intake,
    intake_pool,
    set_dataset,
)
from pipeline.data.layout import SHARDS_DIR, is_sharded
from pipeline.data.pool import validated_store
from pipeline.data.shards import AUTO_MIN_FILES
from pipeline.paramsfile import set_values

SALT_ENV = "PIPELINE_GROUP_SALT"
SALT_FILE = Path(".dvc") / "group_salt"  # in the DVC repository, ignored by .dvc/.gitignore


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "src",
        type=Path,
        metavar="SRC",
        help="folder with one subfolder per class, or a CSV manifest "
        "path,label[,split][,group] (paths relative to its folder)",
    )
    parser.add_argument("--name", help="data set name under paths.raw (default: the source folder's name)")
    parser.add_argument(
        "--domain",
        choices=list(DOMAINS),
        metavar="DOMAIN",
        help=f"the kind of image, one of {', '.join(DOMAINS)}: sets augment.preset/transforms and "
        "evaluate.tta to fit it (default: keep params.yaml's, which may be the previous set's)",
    )
    parser.add_argument(
        "--layout",
        choices=["auto", "folder", "shards"],
        default="auto",
        help="store the set as its files (folder), or as tar shards of ~1,000 files with a per-file manifest "
        f"in git (shards: DVC handles tens of files faster than tens of thousands); auto: shards from "
        f"{AUTO_MIN_FILES} images on (default)",
    )
    parser.add_argument(
        "--unlabelled",
        action="store_true",
        help="SRC is an unlabelled pool (a folder of images, subfolders allowed, or a CSV with a path column): "
        "stored under paths.unlabelled and selected as data.unlabelled, for self- and semi-supervised training",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    params_file = args.params
    name = check_name(args.name or default_name(args.src), "--name")
    salt = os.environ.get(SALT_ENV) or group_salt(SALT_FILE)
    if args.unlabelled:
        if args.domain:
            raise IntakeError("--domain describes the labelled set: give it when taking that in, not a pool")
        _intake_pool(params, args, name, salt)
        return
    if name == params.demo.name:
        raise IntakeError(f"--name {name}: that is the demo stage's output (demo.name); choose another name")
    target = Path(params.paths.raw) / name
    report = intake(
        args.src,
        target,
        seed=params.seed,
        data=params.data,
        salt=salt,
        validated=Path(params.paths.validated) / name,
        layout=args.layout,
    )
    commit = dvc_add(target)
    set_dataset(Path(params_file), name)
    chosen = (params.augment.preset, params.augment.transforms, params.evaluate.tta)
    if args.domain:
        domain = DOMAINS[args.domain]
        chosen = (domain.preset, domain.transforms, domain.tta)
        set_values(
            Path(params_file),
            dict(zip(("augment.preset", "augment.transforms", "evaluate.tta"), chosen, strict=True)),
        )
    stored = f"{len(list((target / SHARDS_DIR).iterdir()))} tar shards, " if is_sharded(target) else ""
    print(
        f"intake: {args.src} -> {target} ({stored}versioned: {commit[0]}; {params_file}: data.dataset: {name})"
    )
    print(summary(report, target.absolute(), params.evaluate.positive_class))
    print(augmentation(args.domain, *chosen, conflicts=tta_conflicts(*chosen)))
    _print_next(commit, params_file)


def _intake_pool(params: Params, args: argparse.Namespace, name: str, salt: str) -> None:
    target = Path(params.paths.unlabelled) / name
    report = intake_pool(
        args.src,
        target,
        data=params.data,
        salt=salt,
        validated=validated_store(Path(params.paths.validated), name),
        layout=args.layout,
    )
    commit = dvc_add(target)
    set_values(Path(args.params), {"data.unlabelled": name})
    stored = f"{len(list((target / SHARDS_DIR).iterdir()))} tar shards, " if is_sharded(target) else ""
    print(
        f"intake: {args.src} -> {target} (unlabelled pool; {stored}versioned: {commit[0]}; "
        f"{args.params}: data.unlabelled: {name})"
    )
    print(pool_summary(report, target.absolute()))
    _print_next(commit, args.params)


def _print_next(commit: list[Path], params_file: str) -> None:
    gone = " ".join(str(p) for p in commit if not p.exists())
    removed = f"git rm -q --cached --ignore-unmatch {gone} && " if gone else ""
    added = " ".join(str(p) for p in commit if p.exists())
    print(f"\nnext: {removed}git add {added} {params_file} && dvc repro")
