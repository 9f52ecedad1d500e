"""intake SRC [--name NAME] [--domain DOMAIN] [--layout auto|folder|shards] [--unlabelled | --add]: copy a user's image set into
paths.raw/NAME, validate it, version it, select it. A set of 2,000 images or more is stored as tar shards of
~1,000 files with a per-file manifest (paths.raw/NAME/shards.csv, for git) unless --layout says otherwise.
--domain sets augment.preset, augment.transforms and evaluate.tta in params.yaml to what fits that kind of
image (pipeline/augment.py DOMAINS: no flips for radiographs, any flip for tissue tiles, ...).

--unlabelled: SRC is an unlabelled pool (a folder of images, subfolders allowed, or a CSV with a path column
and an optional group column), copied into paths.unlabelled/NAME, validated, versioned and selected as
data.unlabelled (pipeline/data/pool.py; the pool stage then leaves out what duplicates the labelled set).

--add: SRC is a CSV of labels for pool images (path,label; paths as suggest.csv names them): those images move
from the pool (data.unlabelled) into the labelled set (data.dataset), into its train split, as a new DVC version
of both, all or nothing (pipeline/active/loop.py); the set's rounds.json records the round.

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
from pipeline.data.rounds import ROUNDS_JSON
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
        "path,label[,split][,group] (paths relative to its folder); with --unlabelled a pool, with --add a CSV "
        "of labels for pool images",
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
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument(
        "--unlabelled",
        action="store_true",
        help="SRC is an unlabelled pool (a folder of images, subfolders allowed, or a CSV with a path column): "
        "stored under paths.unlabelled and selected as data.unlabelled, for self- and semi-supervised training",
    )
    kind.add_argument(
        "--add",
        action="store_true",
        help="SRC is a CSV of labels for pool images (path,label; paths as suggest.csv names them, or suggest.csv "
        "with a label column): move them from the pool (data.unlabelled) into the labelled set (data.dataset), "
        "train split, as a new DVC version of both; all or nothing",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    params_file = args.params
    if args.add:
        _add(params, args)
        return
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


def _add(params: Params, args: argparse.Namespace) -> None:
    """intake labels.csv --add: the labelled set and the pool are params.yaml's (data.dataset, data.unlabelled)."""
    given = [
        f
        for f, on in (
            ("--name", args.name),
            ("--domain", args.domain),
            ("--layout", args.layout != "auto"),
        )
        if on
    ]
    if given:
        raise IntakeError(
            f"intake --add takes no {given[0]}: the set and the pool are data.dataset and data.unlabelled in "
            f"{args.params}, and each keeps its layout"
        )
    from pipeline.active.loop import labels_added  # here: the other intakes need none of it

    dataset, pool = params.data.dataset, params.data.unlabelled
    raw = Path(params.paths.raw) / dataset
    if dataset == params.demo.name:
        raise IntakeError(
            f"data.dataset: {dataset} is the demo stage's output; take your own set in first (python -m pipeline "
            "intake SRC), then add labels to it"
        )
    if not raw.is_dir():
        raise IntakeError(
            f"data.dataset: {dataset}: no set {raw}; take one in first (python -m pipeline intake SRC)"
        )
    if pool is None:
        raise IntakeError(
            "data.unlabelled: null: no pool to take labelled images from; take one in first "
            "(python -m pipeline intake SRC --unlabelled), dvc repro pool, then suggest"
        )
    pool_dir = Path(params.paths.unlabelled) / pool
    with labels_added(
        args.src,
        raw,
        pool_dir,
        Path(params.paths.pool),
        seed=params.seed,
        data=params.data,
        validated=Path(params.paths.validated) / dataset,
    ) as added:  # a failed dvc add puts both folders and their .dvc files back
        versioned, pool_versioned = dvc_add(raw), dvc_add(pool_dir)
    commit = versioned + pool_versioned
    if is_sharded(
        raw
    ):  # beside shards.csv, in git (in the folder layout it is inside the DVC-tracked folder)
        commit.append(raw / ROUNDS_JSON)
    n = sum(added.per_class.values())
    counts = ", ".join(f"{k}: {v}" for k, v in added.per_class.items())
    print(
        f"intake --add: {n} images from pool {pool} -> {raw} train split ({counts}); round {added.round}; "
        f"{added.pool_left} images left in the pool; versioned: {versioned[0]}, {pool_versioned[0]}"
    )
    if added.split_frozen:
        print(
            f"the split ingest drew is now the split column of {raw}'s manifest: val and test stay as they are"
        )
    _print_next(commit, None)  # params.yaml unchanged: the set and the pool stay selected


def _print_next(commit: list[Path], params_file: str | None) -> None:
    gone = " ".join(str(p) for p in commit if not p.exists())
    removed = f"git rm -q --cached --ignore-unmatch {gone} && " if gone else ""
    added = " ".join([str(p) for p in commit if p.exists()] + ([params_file] if params_file else []))
    print(f"\nnext: {removed}git add {added} && dvc repro")
