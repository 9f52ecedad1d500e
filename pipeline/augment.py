"""Training augmentation: built from params with albumentations, saved in its own format, previewed.

The augment stage serializes the pipeline; train and tune load that file rather than rebuilding it
from params, so what was previewed is exactly what trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np

from pipeline.errors import PipelineError


class AugmentError(PipelineError, ValueError):
    """A bad entry in augment.transforms; the message names the entry."""


def build(transforms: Sequence[dict[str, Any]], seed: int) -> A.Compose:
    """A seeded ``A.Compose`` from ``[{name: Transform, arg: value, ...}, ...]``.

    Transforms are built with ``strict=True``: albumentations 2 otherwise only warns about arguments
    it does not know (for example ones removed since 1.x), which would silently change the pipeline.
    """
    built = []
    for i, entry in enumerate(transforms):
        where = f"augment.transforms[{i}]"
        args = dict(entry)
        name = args.pop("name", None)
        cls = getattr(A, name, None) if isinstance(name, str) else None
        if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
            raise AugmentError(f"{where}: '{name}' is not an albumentations transform "
                               "(write e.g. {name: HorizontalFlip, p: 0.5})")
        try:
            built.append(cls(**args, strict=True))
        except Exception as err:  # albumentations raises ValueError or pydantic's ValidationError
            raise AugmentError(f"{where} ({name}): {err}") from None
    return A.Compose(built, seed=seed)


def save(pipeline: A.BasicTransform, path: Path) -> None:
    A.save(pipeline, str(path), data_format="json")


def load(path: Path, seed: int) -> A.Compose:
    if not Path(path).is_file():
        raise AugmentError(f"{path}: augmentation pipeline not found; run the augment stage first")
    pipeline = A.load(str(path), data_format="json")
    pipeline.set_random_seed(seed)
    return pipeline


def preview(pipeline: A.BasicTransform, images: np.ndarray, labels: Sequence[str], draws: int, path: Path) -> None:
    """Save a grid: each row one training image (first column as is) followed by ``draws`` augmented copies."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    rows, cols = len(images), draws + 1
    fig = Figure(figsize=(1.6 * cols, 1.7 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (image, label) in enumerate(zip(images, labels, strict=True)):
        panels = [image] + [pipeline(image=image)["image"] for _ in range(draws)]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel.squeeze(), cmap="gray" if panel.shape[-1] == 1 else None, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title("original" if c == 0 else f"draw {c}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=72)
