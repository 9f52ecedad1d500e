"""``data.image_size`` resolved: the side ingest resizes to, and why (``paths.image_size``).

``auto`` gives pretrained weights the input size they were trained at (their *native* size, decided where the
weights are: :func:`pipeline.training.pretrained.native_size`), and a randomly initialized network the images'
own size, capped at :data:`RANDOM_INIT_CAP` so that a CPU run costs what it cost before ``auto`` existed.
Published reasons for the first rule: frozen ImageNet features on EuroSAT gain 11 points when 64 px tiles
are resized to 224 px (Corley et al. 2023), and an ImageNet ResNet-18 fine-tuned on PneumoniaMNIST goes
from 83.1 to 91.1 accuracy from 28 to 224 px (MedMNIST+).

The size stage writes the record; the ingest stage's DVC dependency is on its ``image_size`` value only, so
changing the weights reruns ingest exactly when the size changes. This module is the record's one reader and
writer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from pipeline import backbones
from pipeline.config import MAX_SIDE, MIN_SIDE
from pipeline.data.prepared import DataError

RANDOM_INIT_CAP = 64  # px: auto without pretrained weights never trains above this (the CPU demo's size)
SMALL_FOR_PRETRAINED = 128  # px: below this, ImageNet-type weights lose accuracy (the report warns)
Basis = Literal["set", "weights", "images"]

EVIDENCE = (
    "frozen ImageNet features on EuroSAT gain 11 points from 64 to 224 px (Corley et al. 2023); an "
    "ImageNet ResNet-18 on PneumoniaMNIST goes 83.1 -> 91.1 accuracy from 28 to 224 px (MedMNIST+)"
)


@dataclass(frozen=True)
class ImageSize:
    """The side every image is resized to, what decided it (a number in params.yaml, the starting weights,
    or the images themselves), and the sentence the data card, report and MLflow show."""

    image_size: int
    basis: Basis
    reason: str

    def write(self, path: Path) -> None:
        """Write the record; an unchanged record is left untouched (its bytes and time stamp)."""
        text = yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)
        if path.is_file() and path.read_text() == text:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    @classmethod
    def read(cls, path: Path) -> ImageSize:
        if not path.is_file():
            raise DataError(
                f"{path} (paths.image_size) not found: data.image_size is auto; run the size stage first "
                "(dvc repro size, or python -m pipeline size), or set data.image_size to a number"
            )
        try:
            return cls(**yaml.safe_load(path.read_text()))
        except (TypeError, yaml.YAMLError) as err:
            raise DataError(f"{path}: not a size stage's record ({err}); rerun dvc repro size") from None


def set_by_params(side: int) -> ImageSize:
    return ImageSize(side, "set", f"{side} px: data.image_size in params.yaml")


def from_weights(side: int) -> ImageSize:
    # The text names no weights: other weights of the same size leave the ingest stage (and its card) as is.
    side = min(max(side, MIN_SIDE), MAX_SIDE)
    return ImageSize(
        side, "weights", f"{side} px (auto): the input size the starting weights were trained at"
    )


def from_images(own: int) -> ImageSize:
    side = min(max(own, MIN_SIDE), RANDOM_INIT_CAP)
    return ImageSize(
        side,
        "images",
        f"{side} px (auto): the images' own size ({own} px), capped at {RANDOM_INIT_CAP} px as no pretrained "
        "weights load (random init)",
    )


def small_for_pretrained(side: int, weights_requested: str, pretrained: bool) -> str | None:
    """The report's warning when ImageNet-type weights (torchvision's or a torchgeo backbone, trained at 224
    px) train on images smaller than :data:`SMALL_FOR_PRETRAINED`, else None."""
    if not pretrained or side >= SMALL_FOR_PRETRAINED or not imagenet_type(weights_requested):
        return None
    return (
        f"the images are {side} px, but the starting weights ({weights_requested}) were trained at 224 px: "
        f"pretrained features lose accuracy on small inputs ({EVIDENCE}); set data.image_size: auto (224 px "
        "for these weights) unless compute forbids it"
    )


def imagenet_type(weights: str) -> bool:
    """torchvision's ImageNet weights (``imagenet``, an enum name) or a named torchgeo backbone."""
    return weights == "imagenet" or "_Weights." in weights or weights in backbones.NAMED
