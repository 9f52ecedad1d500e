"""Predicting on image files with the shipped model: each file read with ingest's own readers and resize
(``readers.read`` + ``readers.conform``), with the image size, channel policy and DICOM window the model was
trained with, so a file gives the same pixels it would have in the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch

from pipeline.data import readers, sources
from pipeline.data.cache import cache_dtype, to_dtype
from pipeline.evaluation.decision import Decision
from pipeline.fsutil import atomic_file
from pipeline.serve.shipped import ServeError, Trained

log = logging.getLogger(__name__)


def list_images(src: Path) -> list[Path]:
    """The image files of a folder (nested or flat, sorted), or the ``path`` column of a CSV manifest.

    A manifest's rows are all kept, whatever their suffix or existence, so each gets a row in the
    output (with an error when it cannot be read); its relative paths are relative to its folder.
    Ingest's link policy holds (``sources``): a link out of the folder is an error, nothing outside is read.
    """
    if src.is_dir():
        images, others = readers.image_files(src)
        if others:
            log.info("%s: %d non-image files ignored", src, len(others))
        if not images:
            raise ServeError(f"{src}: no image files ({', '.join(sorted(readers.IMAGE_SUFFIXES))})")
        return images
    if src.is_file() and src.suffix.lower() == ".csv":
        return _manifest_paths(src)
    found = "not found" if not src.exists() else f"a {sources.non_regular(src) or 'file'}"
    raise ServeError(f"{src}: {found}; give a folder of images or a .csv manifest with a 'path' column")


def _manifest_paths(manifest: Path) -> list[Path]:
    paths = sources.path_column(manifest, ServeError)
    if not paths:
        raise ServeError(f"{manifest}: no paths listed")
    return sources.listed(manifest, paths)


def read_image(path: Path, trained: Trained, max_pixels: int = readers.MAX_PIXELS) -> np.ndarray:
    """One file as the cache would hold it: (S, S, C) after ingest's readers, channel policy and resize;
    ``max_pixels``: the pixel budget (``data.max_image_pixels``) checked before decoding."""
    if not path.exists():  # a FIFO, device or folder is named by readers.read
        raise readers.UnreadableImage("file not found")
    found = readers.read(path, trained.dicom_window, max_pixels)
    pixels = readers.conform(found, trained.image_size, cast(readers.Channels, trained.channels))
    if pixels.shape[-1] != trained.in_channels:
        raise readers.UnreadableImage(f"{pixels.shape[-1]} bands; the model takes {trained.in_channels}")
    return pixels


def load_decision(path: Path, trained: Trained) -> Decision | None:
    """The evaluate stage's decision (``paths.decision``) for this model; None when there is none, or (with a
    warning) when it was fitted for another model."""
    if not path.is_file():
        return None
    made = Decision.read(path)
    if made.model_sha256 != trained.run.model_sha256 or made.classes != trained.classes:
        log.warning(
            "%s was fitted for %s, not for this model (sha256 %s): its threshold and conformal sets are "
            "not applied; rerun the evaluate stage (dvc repro evaluate)",
            path,
            f"the model with sha256 {made.model_sha256}"
            if made.model_sha256
            else "an MLflow run (a decision.json from before model_sha256)",
            trained.run.model_sha256 or "unrecorded",
        )
        return None
    if warning := made.coverage_warning():
        log.warning(
            "%s: the %s; an empty set means no class reached the cut (send the image to a person)",
            path,
            warning,
        )
    return made


@torch.inference_mode()
def predict(
    trained: Trained,
    paths: Sequence[Path],
    batch_size: int = 64,
    decision: Decision | None = None,
    max_pixels: int = readers.MAX_PIXELS,
    device: str | None = None,
) -> pd.DataFrame:
    """A row per file, in order: path, predicted class, ``prob_<class>`` per class, ``error`` (empty when read).
    ``device``: where the model runs (None: CUDA when there is one, else the CPU).

    With a ``decision`` (see :func:`load_decision`): ``predicted`` applies its binary threshold, and with a
    conformal quantile a ``set`` column holds each image's prediction set (class names joined by '|').
    Unreadable files get their reason in ``error`` and empty probabilities; nothing is raised for them.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = trained.model.to(device)
    rows: list[dict[str, Any]] = [{"path": str(p)} for p in paths]
    for start in range(0, len(paths), batch_size):
        read, pixels = [], []
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                pixels.append(read_image(paths[i], trained, max_pixels))
                read.append(i)
            except (readers.UnreadableImage, OSError) as err:
                log.warning("cannot read %s (%s)", paths[i], err)
                rows[i]["error"] = str(err) or type(err).__name__
        if not read:
            continue
        dtype = cache_dtype({p.dtype for p in pixels})  # one batch, one dtype, as in the cache
        x = np.stack([to_dtype(p, dtype) for p in pixels]).transpose(0, 3, 1, 2)
        probs = model(torch.from_numpy(np.ascontiguousarray(x)).to(device)).softmax(-1).cpu().numpy()
        predicted = probs.argmax(1) if decision is None else decision.predicted(probs)
        sets = None if decision is None else decision.sets(probs)
        for j, (i, p) in enumerate(zip(read, probs, strict=True)):
            rows[i] |= {
                "predicted": trained.classes[int(predicted[j])],
                "error": "",
                **{f"prob_{c}": float(v) for c, v in zip(trained.classes, p, strict=True)},
            }
            if sets is not None:
                rows[i]["set"] = sets[j]
    with_sets = decision is not None and decision.conformal_quantile is not None
    columns = [
        "path",
        "predicted",
        *(f"prob_{c}" for c in trained.classes),
        *(["set"] if with_sets else []),
        "error",
    ]
    return pd.DataFrame(rows, columns=columns)


def write_predictions(table: pd.DataFrame, out: Path) -> None:
    with atomic_file(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
