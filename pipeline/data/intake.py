"""Intake: copy a user's image set into paths.raw in the layout ingest reads, validate it, then swap it in.

The source is never written to. A folder per class is copied as it is; a CSV manifest
(``path,label[,split][,group]``, paths relative to the manifest's folder) becomes a folder per class
plus ``manifest.csv`` with the copies' paths, keeping the split and group columns. The copy is
validated by a full ingest into a scratch folder and replaces an existing set of the same name
only if that succeeds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from pipeline.config import Data
from pipeline.data.ingest import MANIFEST_CSV, DataError, ingest, read_manifest
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_dir, atomic_file

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class IntakeError(PipelineError, RuntimeError):
    """Intake could not finish a step outside the data itself (DVC, params.yaml)."""


def default_name(src: Path) -> str:
    """The set's name when none is given: the folder's name, or the manifest's folder's name."""
    return (src.resolve().parent if src.is_file() else src.resolve()).name


def check_name(name: str, what: str) -> str:
    if not NAME.fullmatch(name):
        raise DataError(f"{what} '{name}' must start with a letter or digit and hold only letters, digits, '.', "
                        "'_' and '-' (it becomes a folder name)")
    return name


def copy_manifest(manifest: Path, dest: Path) -> dict[str, str]:
    """Copy each listed image into ``dest/<label>/``, write ``dest/manifest.csv``; return copy -> source paths."""
    table, _ = read_manifest(manifest)
    rows, taken, sources = [], set(), {}
    for row in table.to_dict("records"):
        src = Path(row["path"])
        label = check_name(row["label"], "label")
        name, n = src.name, 1
        while (label, name.lower()) in taken:  # same file name from two source folders
            name, n = f"{src.stem}_{n}{src.suffix}", n + 1
        taken.add((label, name.lower()))
        (dest / label).mkdir(exist_ok=True)
        shutil.copyfile(src, dest / label / name)
        sources[str(dest / label / name)] = str(src)
        rows.append(row | {"path": f"{label}/{name}"})
    pd.DataFrame(rows, columns=table.columns).to_csv(dest / MANIFEST_CSV, index=False)
    return sources


def copy_set(src: Path, dest: Path) -> dict[str, str]:
    """Copy a folder-per-class set or a manifest's images into the empty folder ``dest``; return copy -> source."""
    if src.is_dir():
        for class_dir in src.iterdir():
            if class_dir.is_dir() and not class_dir.name.startswith("."):
                check_name(class_dir.name, "class folder")
        shutil.copytree(src, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
        return {str(dest): str(src)}
    if src.is_file() and src.suffix.lower() == ".csv":
        return copy_manifest(src, dest)
    raise DataError(f"{src}: expected a folder with one subfolder per class, or a CSV manifest "
                    "(path,label[,split][,group])")


def intake(src: Path, target: Path, *, seed: int, data: Data) -> dict:
    """Copy ``src`` to ``target``, validated by a full ingest; ``target`` is replaced only on success.

    Returns the ingest report, its paths pointing into ``target``.
    """
    src, target = src.resolve(), target.absolute()
    if target == src or target in src.parents:
        raise DataError(f"{src}: already inside {target}; hand in a set from outside paths.raw")
    with atomic_dir(target) as staging, tempfile.TemporaryDirectory() as scratch:
        sources = copy_set(src, staging)
        try:
            report = ingest(staging, Path(scratch) / "prepared", seed=seed,
                            data=dataclasses.replace(data, dataset=target.name))
        except DataError as err:  # name the user's own files, not their staging copies
            message = str(err)
            for copy, source in sorted(sources.items(), key=lambda kv: -len(kv[0])):
                message = message.replace(copy, source)
            raise DataError(f"{src}: not taken in ({target} left as it was): {message}") from None
    return json.loads(json.dumps(report).replace(json.dumps(str(staging))[1:-1], json.dumps(str(target))[1:-1]))


def dvc_add(path: Path) -> None:
    """Version ``path`` with DVC (writes ``<path>.dvc``; commit it)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "add", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise IntakeError(f"dvc add {path} failed:\n{done.stderr.strip() or done.stdout.strip()}")


def set_dataset(params_file: Path, name: str) -> None:
    """Set ``data.dataset: name`` in params.yaml, changing that one line and keeping every comment."""
    value = name if yaml.safe_load(name) == name else json.dumps(name)
    lines = params_file.read_text().splitlines(keepends=True)
    section = next((i for i, line in enumerate(lines) if re.match(r"data:\s*(#.*)?$", line)), None)
    if section is None:
        lines += ["\n", "data:\n", f"  dataset: {value}\n"]
    else:
        end = next((i for i in range(section + 1, len(lines)) if re.match(r"\S", lines[i])), len(lines))
        key = next((i for i in range(section + 1, end) if re.match(r"\s+dataset:", lines[i])), None)
        if key is None:
            lines.insert(section + 1, f"  dataset: {value}\n")
        else:
            lines[key] = re.sub(r"(\s+dataset:\s*)([^#\s]+|\"[^\"]*\"|'[^']*')", lambda m: m.group(1) + value,
                                lines[key], count=1)
    text = "".join(lines)
    if (yaml.safe_load(text) or {}).get("data", {}).get("dataset") != name:
        raise IntakeError(f"{params_file}: could not set data.dataset to '{name}'; set it by hand")
    with atomic_file(params_file) as tmp:
        tmp.write_text(text)
