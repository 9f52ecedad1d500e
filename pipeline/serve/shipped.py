"""What the train stage ships, loaded back and packaged: the model in ``models/`` with the preprocessing its
training data had (:class:`Trained`), and that network behind ingest's preprocessing (:class:`Packaged`), as the
exports are written (``serve.export``) and as the train stage logs and registers it in MLflow (``log_model``).
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.fsutil import not_replaceable
from pipeline.runinfo import RUN_INFO, RunInfo
from pipeline.training.model import Classifier, Ensemble

Format = Literal["torchscript", "onnx"]


class ServeError(PipelineError, ValueError):
    """No trained model, an unusable source of images, or nothing readable; the message names the path."""


@dataclass(frozen=True)
class Trained:
    """A trained model with the preprocessing its training data had."""

    model: Ensemble  # one member, or one per fold (data.folds)
    classes: tuple[str, ...]
    image_size: int
    channels: str  # data.channels: rgb or keep (readers.Channels)
    dicom_window: tuple[float, float] | None
    dtype: str  # of the training cache: uint8, uint16 or float32
    run: RunInfo

    @property
    def in_channels(self) -> int:
        return int(self.model.mean.shape[1])


def load_trained(model_dir: Path) -> Trained:
    """The train stage's model in ``model_dir`` (its best checkpoint, or one per fold), on CPU, in eval mode,
    with the preprocessing its ``run.json`` records."""
    run = RunInfo.read(model_dir)
    members = []
    for name in run.checkpoints:
        checkpoint = model_dir / name
        if not checkpoint.is_file():
            raise ServeError(
                f"{checkpoint}: checkpoint named in {model_dir / RUN_INFO} not found; rerun the train stage"
            )
        try:
            members.append(Classifier.load_from_checkpoint(checkpoint, map_location="cpu"))
        # torch's reader of a cut-short file, a pickle of something else, another architecture's weights
        except (RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise ServeError(
                f"{checkpoint}: cannot be loaded as the model {model_dir / RUN_INFO} describes ({reason}); "
                "rerun the train stage, or restore the model folder (dvc checkout)"
            ) from None
    pre = run.preprocessing
    return Trained(
        model=Ensemble(members).eval(),
        classes=run.classes,
        image_size=pre.image_size,
        channels=pre.channels,
        dicom_window=pre.dicom_window,
        dtype=pre.dtype,
        run=run,
    )


def check_out(out: Path, what: str = "--out") -> None:
    """Refuse, before any work, an output path that is not a regular file or a new path."""
    if why := not_replaceable(out):
        raise ServeError(f"{what} {out}: is {why}, which is never replaced; name a new file or a regular one")


def _resize_matrix(n: int, size: int, shrink: torch.Tensor) -> torch.Tensor:
    """(size, n) weights that resize n source pixels as ``readers.conform`` does with OpenCV.

    Shrinking: INTER_AREA (each output pixel averages the source pixels it covers, by overlap);
    otherwise INTER_LINEAR (half-pixel centres, edges clamped). Both are built and one is picked by a
    tensor condition, so the graph has no shape-dependent branch and exports to ONNX with dynamic sizes.
    """
    source = torch.ones((), dtype=torch.float32) * n
    scale = source / size
    i = torch.arange(size, dtype=torch.float32).unsqueeze(1)
    j = torch.arange(n, dtype=torch.float32).unsqueeze(0)
    area = (torch.minimum((i + 1) * scale, j + 1) - torch.maximum(i * scale, j)).clamp(min=0) / scale
    centre = torch.minimum(((i + 0.5) * scale - 0.5).clamp(min=0), source - 1)
    linear = (1 - (centre - j).abs()).clamp(min=0)
    return torch.where(shrink, area, linear)


class Packaged(nn.Module):
    """The trained network with ingest's channel policy, resize, scaling and normalization in front.

    Input (TorchScript and the registered MLflow model): an image batch in any documented layout,
    (N, H, W, C), (N, C, H, W) or, for one band, (N, H, W); any H and W; C the model's band count,
    or 1 for an RGB model (``data.channels: rgb``), replicated as ingest replicates gray files.
    Integer pixels (uint8; other integer types are taken as 16-bit) or floats in [0, 1]. Any other
    shape is refused with a message naming it. Output: class probabilities (N, classes).
    Integer pixels are resized, rounded back to integers as the cache stores them, then scaled to [0, 1]
    (``model.to_unit_range``). Resized pixels are within one grey level of OpenCV's (its fixed-point
    bilinear rounds differently); an image already at ``image_size`` passes unchanged.
    """

    def __init__(
        self, model: Ensemble, image_size: int, class_names: Sequence[str], gray_to_rgb: bool = False
    ):
        super().__init__()
        self.class_names = list(class_names)  # a TorchScript attribute: scripted.class_names
        # The plain networks, not the LightningModules (which TorchScript cannot compile), each with its
        # own normalization; the tests check that this forward equals the Ensemble's.
        members = [cast(Classifier, m) for m in model.members]  # nn.ModuleList typing
        self.nets = nn.ModuleList([m.net for m in members])
        self.register_buffer("mean", torch.stack([m.mean.detach().clone() for m in members]))
        self.register_buffer("std", torch.stack([m.std.detach().clone() for m in members]))
        self.image_size = image_size
        self.channels = int(model.mean.shape[1])
        self.gray_to_rgb = gray_to_rgb and self.channels == 3
        self.accepted = [self.channels, 1] if self.gray_to_rgb else [self.channels]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        shrink = (
            torch.minimum(torch.ones((), dtype=torch.int64) * h, torch.ones((), dtype=torch.int64) * w)
            > self.image_size
        )
        rows = _resize_matrix(h, self.image_size, shrink)
        cols = _resize_matrix(w, self.image_size, shrink)
        return rows @ x @ cols.transpose(0, 1)

    def _as_nchw(self, images: torch.Tensor) -> torch.Tensor:
        """The batch as (N, C, H, W) with the model's C, or an error naming the shape it got."""
        expected = "(N, H, W, C) or (N, C, H, W) with C in " + str(self.accepted)
        if images.dim() == 3 and 1 in self.accepted:
            images = images.unsqueeze(1)  # (N, H, W): one band
        elif images.dim() != 4:
            raise ValueError("images of shape " + str(list(images.shape)) + ": expected " + expected)
        elif images.shape[3] in self.accepted and images.shape[1] not in self.accepted:
            images = images.permute(0, 3, 1, 2)
        elif images.shape[1] not in self.accepted:
            raise ValueError(
                "images of shape "
                + str(list(images.shape))
                + " have no axis of "
                + str(self.accepted)
                + " bands: expected "
                + expected
            )
        if images.shape[1] != self.channels:  # a gray batch for an RGB model
            images = images.expand(-1, self.channels, -1, -1)
        return images

    def _classify(self, images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for ``x`` (N, C, H, W) cut from ``images`` (whose dtype says how to scale)."""
        x = self._resize(x.float())
        if not images.is_floating_point():
            top = (
                255.0 if images.dtype == torch.uint8 else 65535.0
            )  # pixels.unit_max: TorchScript cannot call it
            x = torch.round(x) / top  # resizing only averages: no clamp needed
        probs: list[torch.Tensor] = []
        for i, net in enumerate(self.nets):  # a loop, not a comprehension: TorchScript unrolls it
            probs.append(net((x - self.mean[i]) / self.std[i]).softmax(-1))
        return torch.stack(probs).mean(0)  # an ensemble's mean probabilities; one member's own

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._classify(images, self._as_nchw(images))


class PackagedNHWC(Packaged):
    """:class:`Packaged` for ONNX: one layout, (N, H, W, C) with the model's C fixed in the graph.

    An ONNX graph cannot raise a message of its own, so the input is declared with a static band
    axis, and onnxruntime refuses any other band count or rank by naming the axis (``index: 3``).
    ``gray``: an RGB model takes one band, replicated inside as ingest replicates gray files (a model
    trained on X-rays then takes their pixels as they are).
    """

    gray: bool = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        if self.gray:
            x = x.expand(-1, self.channels, -1, -1)
        return self._classify(images, x)


def example_batch(trained: Trained, gray: bool = False) -> torch.Tensor:
    """The export's example batch: uint8 for 8-bit sets; floats in [0, 1] for 16-bit, DICOM and float sets."""
    dtype = torch.uint8 if trained.dtype == "uint8" else torch.float32
    bands = 1 if gray else trained.in_channels
    return torch.zeros((2, trained.image_size + 3, trained.image_size + 5, bands), dtype=dtype)


def package(trained: Trained, onnx: bool = False, gray: bool = False) -> Packaged:
    """The trained model with its preprocessing in front, in eval mode: what is exported and registered.
    ``gray`` (ONNX): one-band input for an RGB model (:class:`PackagedNHWC`)."""
    kind = PackagedNHWC if onnx else Packaged
    packaged = kind(trained.model, trained.image_size, trained.classes, gray_to_rgb=trained.channels == "rgb")
    if gray:
        if not (isinstance(packaged, PackagedNHWC) and packaged.gray_to_rgb):
            raise ServeError(
                f"--gray: only an ONNX export of an RGB model (data.channels: rgb) takes one band in place of "
                f"3; this model takes {packaged.channels} (data.channels: {trained.channels})"
            )
        packaged.gray = True
    return packaged.eval()


def metadata(trained: Trained, fmt: Format, gray: bool = False) -> dict[str, str]:
    """What an exported file carries beside the weights: class names and the input contract (ONNX's is the
    registered MLflow model's too: one traced layout)."""
    bands = 1 if gray else trained.in_channels
    accepted = f"{bands}" + (
        " (or 1: a gray image, replicated as at ingest)" if trained.channels == "rgb" else ""
    )
    layout = (
        "(N, H, W, C)"
        if fmt == "onnx"
        else "(N, H, W, C) or (N, C, H, W)"
        + (" or (N, H, W)" if bands == 1 or trained.channels == "rgb" else "")
    )
    dtype = (
        str(example_batch(trained).dtype).removeprefix("torch.")
        if fmt == "onnx"
        else "uint8, uint16 or float32"
    )
    return {
        "class_names": json.dumps(list(trained.classes)),
        "image_size": str(trained.image_size),
        "channels": str(bands),
        "layout": layout + f", any H and W, C = {accepted if fmt != 'onnx' else bands}",
        "dtype": dtype,
        "value_range": "integers: 0-255 (uint8) or 0-65535 (uint16); floats: [0, 1]",
        "input": f"{dtype} images, {layout}, any H and W; resized to {trained.image_size} px inside",
        "output": "class probabilities (N, classes), in class_names order",
        "arch": trained.run.arch,
        "model_sha256": trained.run.model_sha256,  # its MLflow runs carry it as the tag model.sha256
    }


def log_model(trained: Trained, registered_model: str | None = None) -> str | None:
    """Log :func:`package` of ``trained`` to the active MLflow run (and register it as ``registered_model``,
    returning the new version).

    The logged model is the exported one: eval mode, preprocessing inside, probabilities out, so
    ``mlflow.pyfunc.load_model(...).predict(images)`` answers as predict and the exports do, for one
    image as for a batch. MLflow saves it with ``torch.export`` (its "pt2" format, no pickle), which
    traces one layout: (N, H, W, C) like the ONNX export, any N, H and W (the signature says so).
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipeline import tracking  # here: predict and export need no MLflow

    packaged = package(trained, onnx=True)
    example = example_batch(trained)  # batch 2 and sizes off image_size: traced with every dimension dynamic
    signature = ModelSignature(
        inputs=Schema([TensorSpec(example.numpy().dtype, (-1, -1, -1, trained.in_channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(trained.classes)))]),
    )
    return tracking.log_model(
        packaged,
        example.numpy(),
        signature=signature,
        registered_model=registered_model,
        metadata=metadata(trained, "onnx"),
    )
