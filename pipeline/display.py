"""Cached images as a person sees them: one rule for every picture the pipeline draws.

The rule for N bands: three or more show bands 1-3 as RGB (satellite sets put red, green, blue first);
one or two show band 1 in gray. Previews, sample grids, the label audit and Grad-CAM panels all use it,
through the one grid renderer, :func:`image_grid`. The augment stage's preview is drawn here
(:func:`augment_preview`), so that train and tune, which load the augmentation pipeline, import no drawing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.pixels import unit_range

if TYPE_CHECKING:
    import albumentations as A
    from matplotlib.figure import Figure


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An (H, W, C) image as float RGB (H, W, 3) in [0, 1], by the rule above."""
    x = unit_range(image)
    x = x[..., :3] if x.shape[-1] >= 3 else np.repeat(x[..., :1], 3, axis=-1)
    return np.clip(x, 0, 1)


def image_grid(
    images: Sequence[np.ndarray | None],
    titles: Sequence[str] = (),
    *,
    ncols: int,
    cell: tuple[float, float],
    colors: Sequence[str] = (),
    title_size: float = 7,
    row_labels: Sequence[str] = (),
    framed: bool = False,
    suptitle: str | None = None,
    suptitle_size: float = 10,
    suptitle_height: float = 0.0,
    interpolation: str = "nearest",
) -> Figure:
    """The one grid renderer: ``images`` (any cache dtype, or None for a gap) row by row, ``ncols`` a row,
    each ``cell`` inches (width, height) with its title (colored by ``colors``, default black).

    ``row_labels`` name the rows: beside a ``framed`` cell (axes kept, ticks off) as its y label, else as
    bold text left of the row. ``suptitle_height``: inches added at the top for ``suptitle``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    n_rows = max(1, math.ceil(len(images) / ncols))
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * n_rows + suptitle_height))
    axes = np.asarray(fig.subplots(n_rows, ncols, squeeze=False))
    for ax in axes.flat:
        if framed:
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_axis_off()
    for i, image in enumerate(images):
        if image is None:
            continue
        ax = axes.flat[i]
        ax.imshow(to_rgb(image), vmin=0, vmax=1, interpolation=interpolation)
        if i < len(titles) and titles[i]:
            ax.set_title(titles[i], fontsize=title_size, color=colors[i] if i < len(colors) else "black")
    for row, name in enumerate(row_labels):
        if framed:
            axes[row, 0].set_ylabel(name, fontsize=8)
        else:
            axes[row, 0].text(
                -0.06,
                0.5,
                name,
                transform=axes[row, 0].transAxes,
                rotation=90,
                fontsize=8,
                fontweight="bold",
                ha="right",
                va="center",
            )
    if suptitle is not None:
        fig.suptitle(suptitle, fontsize=suptitle_size)
    fig.tight_layout()
    return fig


def augment_preview(
    pipeline: A.BasicTransform, images: np.ndarray, labels: Sequence[str], draws: int, path: Path
) -> None:
    """The augment stage's preview: a grid, each row one training image (first column as is) followed by ``draws``
    copies drawn by ``pipeline`` (an albumentations pipeline)."""
    cells = [
        cell for image in images for cell in [image] + [pipeline(image=image)["image"] for _ in range(draws)]
    ]
    fig = image_grid(
        cells,
        ["original"] + [f"draw {c}" for c in range(1, draws + 1)],
        ncols=draws + 1,
        cell=(1.6, 1.7),
        title_size=8,
        row_labels=list(labels),
        framed=True,
    )
    fig.savefig(path, dpi=72)
