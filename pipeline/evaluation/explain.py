"""Grad-CAM heat maps on a residual stage of the ResNet, and a panel of them for the report.

The maps come from ``grad-cam`` (pytorch-grad-cam, MIT): maintained, and all it brings beyond what the
pipeline already installs is ``ttach``. Importable from notebooks::

    from pipeline.evaluation import explain
    maps = explain.grad_cam(model, images)          # (N, H, W) in [0, 1]
    explain.panel(images, maps, captions, "cam.png")

``layer4`` has a stride of 32: at 64 px it is a 2x2 grid (one cell per quadrant), at 32 px a single cell
that cannot localise anything, however smooth the upsampled map looks. ``grad_cam`` warns whenever its
layer's map is coarser than ``MIN_GRID`` x ``MIN_GRID``. By default it uses the deepest stage that is not
(``layer_for``: layer3 at 64 px), the one choice that the report's panel and notebook 03 share; titles state
the map's real resolution.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.display import image_grid, to_rgb

if TYPE_CHECKING:
    from pipeline.data.cache import Images

log = logging.getLogger(__name__)

STRIDES = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}  # of a torchvision ResNet's residual stages
MIN_GRID = 4  # a map coarser than 4x4 cells is drawn as smooth blobs that look like localisation but are not
PANEL_PNG = "gradcam.png"  # the evaluate stage's panel, in paths.plots


def _target_layers(model: nn.Module, layer: str = "layer4") -> list[nn.Module]:
    """``layer`` of the ResNet, or of each member of an ensemble (pytorch-grad-cam averages their maps)."""
    layers = []
    for member in getattr(model, "members", [model]):
        net = getattr(member, "net", member)  # the Classifier wraps the torchvision ResNet as .net
        if layer not in STRIDES or not hasattr(net, layer):
            raise TypeError(
                f"{type(net).__name__} has no {layer}: Grad-CAM here expects a torchvision ResNet "
                f"stage ({', '.join(STRIDES)})"
            )
        layers.append(getattr(net, layer))
    return layers


def grid(side: int, layer: str = "layer4") -> int:
    """Cells per side of ``layer``'s feature map for ``side``-pixel images: the heat map's real resolution."""
    return math.ceil(side / STRIDES[layer])


def layer_for(side: int) -> str:
    """The deepest (most class-specific) stage whose map is at least ``MIN_GRID`` cells a side: layer4 from
    128 px, layer3 from 64 px, layer2 from 32 px."""
    return next((name for name in reversed(STRIDES) if grid(side, name) >= MIN_GRID), "layer1")


def describe(side: int, layer: str) -> str:
    """'layer3: a 4x4 map, one cell per 16x16 px': what a heat map at this resolution can show."""
    g, stride = grid(side, layer), STRIDES[layer]
    return f"{layer}: a {g}x{g} map, one cell per {stride}x{stride} px, drawn smoothed"


def grad_cam(
    model: nn.Module,
    images: np.ndarray,
    target: int | Sequence[int] | None = None,
    batch_size: int = 32,
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM heat maps (N, H, W) in [0, 1] of cached images (N, H, W, C), as the prepared cache holds them.

    ``target``: the class explained: None, each image's predicted class; an int, that class for all;
    a sequence, one class per image. Each map is scaled to [0, 1] on its own (an all-zero map: no
    positive evidence for the class). ``layer``: the ResNet stage explained; None: ``layer_for``'s, fine
    enough for the image size.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images as (N, H, W, C), got shape {images.shape}")
    side = min(images.shape[1:3])
    layer = layer or layer_for(side)
    if grid(side, layer) < 2:
        log.warning(
            "Grad-CAM: at %d px %s is a single cell, so the heat maps cannot localise anything; use "
            "layer='%s' or train at a larger data.image_size to see where the model looks",
            side,
            layer,
            layer_for(side),
        )
    elif grid(side, layer) < MIN_GRID:
        log.warning(
            "Grad-CAM: at %d px %s (%s) is coarser than %dx%d: the smooth blobs are interpolated from "
            "that few cells and do not localise within one; layer='%s' is finer",
            side,
            layer,
            describe(side, layer),
            MIN_GRID,
            MIN_GRID,
            layer_for(side),
        )
    targets: list[int] | None = None
    if isinstance(target, (int, np.integer)):
        targets = [int(target)] * len(images)
    elif target is not None:
        targets = [int(t) for t in target]
        if len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images")
    was_training = model.training
    maps = []
    try:
        with torch.enable_grad(), GradCAM(model=model, target_layers=_target_layers(model, layer)) as cam:
            for start in range(0, len(images), batch_size):
                x = torch.from_numpy(
                    np.ascontiguousarray(images[start : start + batch_size].transpose(0, 3, 1, 2))
                )
                wanted = (
                    None
                    if targets is None
                    else [ClassifierOutputTarget(t) for t in targets[start : start + batch_size]]
                )
                maps.append(cam(input_tensor=x, targets=wanted))
    finally:
        model.train(was_training)
    return np.concatenate(maps).astype(np.float32)


def select(labels: np.ndarray, probs: np.ndarray, per_class: int) -> list[list[int | None]]:
    """Per true class, the ``per_class`` most confident correct and the ``per_class`` most confident wrong images.

    One row per class: ``per_class`` correct slots, then ``per_class`` wrong ones; an empty slot is None.
    """
    labels, predicted = np.asarray(labels), np.asarray(probs).argmax(1)
    confidence = np.asarray(probs).max(1)
    rows = []
    for k in range(probs.shape[1]):
        row: list[int | None] = []
        for hit in (True, False):
            idx = np.flatnonzero((labels == k) & ((predicted == k) == hit))
            best = idx[np.argsort(-confidence[idx], kind="stable")][:per_class].tolist()
            row += best + [None] * (per_class - len(best))
        rows.append(row)
    return rows


def overlay(image: np.ndarray, heatmap: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """The heat map (jet colours) blended over the image, uint8 RGB."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(to_rgb(image), np.clip(heatmap, 0, 1), use_rgb=True, image_weight=weight)


def panel(
    images: Sequence[np.ndarray | None],
    heatmaps: Sequence[np.ndarray | None],
    captions: Sequence[str],
    path: str | Path | io.BytesIO,
    columns: int = 4,
    wrong: Sequence[bool] | None = None,
    row_titles: Sequence[str] | None = None,
    title: str = "Grad-CAM",
) -> None:
    """Save a grid of (image, heat-map overlay) pairs, ``columns`` pairs per row, captioned; None leaves a gap.

    ``wrong`` marks captions in red (misclassified images).
    """
    cells: list[np.ndarray | None] = []
    for image, heatmap in zip(images, heatmaps, strict=True):  # each image, then its overlay
        if image is None:
            cells += [None, None]
        else:
            assert heatmap is not None, "a heat map for every image shown"
            cells += [image, overlay(image, heatmap)]
    fig = image_grid(
        cells,
        [t for caption in captions for t in ("", caption)],
        ncols=2 * columns,
        cell=(1.35, 1.65),
        colors=[
            "tab:red" if k % 2 and wrong is not None and wrong[k // 2] else "black" for k in range(len(cells))
        ],
        row_labels=row_titles or (),
        suptitle=title,
        suptitle_height=0.5,
        interpolation="antialiased",
    )
    fig.savefig(path, dpi=110, format="png")


def gradcam_panel(
    model: nn.Module,
    images: Images,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    per_class: int,
    path: str | Path | io.BytesIO,
    batch_size: int = 32,
) -> int:
    """The evaluate stage's panel: one row per true class, its most confident right then wrong test images.

    Each heat map explains the predicted class (what the model saw, right or wrong), on the deepest
    stage with a map of at least ``MIN_GRID`` cells a side; the title gives that map's resolution.
    Returns the number of images shown.
    """
    rows = select(labels, probs, per_class)
    chosen = sorted({i for row in rows for i in row if i is not None})
    layer = layer_for(min(images.shape[1:3]))
    maps = (
        dict(zip(chosen, grad_cam(model, images[chosen], batch_size=batch_size, layer=layer), strict=True))
        if chosen
        else {}
    )
    slots = [i for row in rows for i in row]
    predicted = np.asarray(probs).argmax(1)
    captions = [
        ""
        if i is None
        else f"true {class_names[labels[i]]}\npred {class_names[predicted[i]]} ({probs[i].max():.2f})"
        for i in slots
    ]
    panel(
        [None if i is None else images[i] for i in slots],
        [None if i is None else maps[i] for i in slots],
        captions,
        path,
        columns=2 * per_class,
        wrong=[i is not None and predicted[i] != labels[i] for i in slots],
        row_titles=[f"true {c}" for c in class_names],
        title=f"Grad-CAM ({describe(min(images.shape[1:3]), layer)}) of the predicted class:\n"
        f"the {per_class} most confident right, then wrong, test images per class",
    )
    return len(chosen)


def panel_png(
    model: nn.Module,
    images: Images,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    per_class: int,
    batch_size: int = 32,
) -> bytes | None:
    """:func:`gradcam_panel` rendered to PNG bytes, for a stage that writes its outputs last; None when off (0)."""
    if per_class == 0:
        return None
    png = io.BytesIO()
    gradcam_panel(model, images, labels, probs, class_names, per_class, png, batch_size)
    return png.getvalue()
