"""Named domain backbones: satellite ResNets published through torchgeo's weight enums.

``model.weights: ssl4eo_s12_rgb_moco_resnet18`` (etc.) names one of the entries below. The URL (whose
file name carries the publisher's SHA-256 prefix, as torchvision's do), the band list, the in-channels
and the preprocessing come from torchgeo's own enum (``torchgeo.models.get_weight``), a dependency: it
installs from PyPI next to torch and torchvision without replacing either (28 s, 23 packages, measured
when it was added). Only the vocabulary is ours, so params.yaml can be validated without importing
torchgeo (about 3 s), and the value range, which torchgeo expresses only as the divisor inside its
transforms, is stated per entry and checked against them by tests.

Left out, on purpose: SatlasPretrain's multi-band ResNets (their RGB bands are 8-bit TCI, the other
bands 16-bit, so one pixel dtype cannot feed them), weights whose URL carries no hash (SoftCon), and
RadImageNet: no well-kept library ships it (the original release is Keras weights, shared on request;
the PyTorch copies found are third-party uploads of pickled whole models, without a published hash), so
a converted state dict goes in as a file: ``model.weights: path.pth`` with ``model.weights_sha256``.

This module imports nothing heavy: :mod:`pipeline.config` validates ``model.weights`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Named:
    """One ``model.weights`` name: which torchgeo enum it is, and the raw value its scaling maps to 1."""

    name: str
    enum: str  # torchgeo's spelling, e.g. ResNet18_Weights.SENTINEL2_RGB_MOCO
    arch: str
    # The pixel value the publisher's scaling divides by: 10000 for Sentinel-2 reflectance as distributed
    # (digital numbers, reflectance x 10,000, in 16-bit files), 255 for 8-bit imagery.
    value_range: float
    description: str


NAMED: dict[str, Named] = {
    b.name: b
    for b in (
        Named(
            "ssl4eo_s12_rgb_moco_resnet18",
            "ResNet18_Weights.SENTINEL2_RGB_MOCO",
            "resnet18",
            10000,
            "SSL4EO-S12, Sentinel-2 RGB (B4, B3, B2), MoCo v2",
        ),
        Named(
            "ssl4eo_s12_all_moco_resnet18",
            "ResNet18_Weights.SENTINEL2_ALL_MOCO",
            "resnet18",
            10000,
            "SSL4EO-S12, Sentinel-2 L1C, all 13 bands, MoCo v2",
        ),
        Named(
            "ssl4eo_s12_rgb_moco_resnet50",
            "ResNet50_Weights.SENTINEL2_RGB_MOCO",
            "resnet50",
            10000,
            "SSL4EO-S12, Sentinel-2 RGB (B4, B3, B2), MoCo v2",
        ),
        Named(
            "ssl4eo_s12_all_moco_resnet50",
            "ResNet50_Weights.SENTINEL2_ALL_MOCO",
            "resnet50",
            10000,
            "SSL4EO-S12, Sentinel-2 L1C, all 13 bands, MoCo v2",
        ),
        Named(
            "ssl4eo_s12_all_dino_resnet50",
            "ResNet50_Weights.SENTINEL2_ALL_DINO",
            "resnet50",
            10000,
            "SSL4EO-S12, Sentinel-2 L1C, all 13 bands, DINO",
        ),
        Named(
            "satlas_s2_rgb_si_resnet50",
            "ResNet50_Weights.SENTINEL2_SI_RGB_SATLAS",
            "resnet50",
            255,
            "SatlasPretrain, Sentinel-2 true-colour image (8-bit TCI), single image",
        ),
    )
}


def choices() -> str:
    return ", ".join(NAMED)


@dataclass(frozen=True)
class Spec:
    """A named backbone as torchgeo publishes it, its preprocessing as the model applies it."""

    named: Named
    url: str
    in_channels: int
    bands: tuple[str, ...]
    # Per band, on pixels scaled by value_range (raw / value_range): the model normalizes with these.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop: int | None  # the input size torchgeo's transforms resize/crop to (not applied: data.image_size is)
    dataset: str
    publication: str


def affine(transforms: Any, bands: int) -> tuple[list[float], list[float], int | None]:
    """torchgeo's preprocessing (a Sequential of torchvision v2 Resize/CenterCrop/Normalize) as one per-band
    ``(x - mean) / std`` on raw values, and the size it crops to. Anything else is refused, so that no
    preprocessing step the weights expect is silently skipped."""
    from torchvision.transforms import v2

    mean, std, crop = [0.0] * bands, [1.0] * bands, None
    for step in transforms.children() if hasattr(transforms, "children") else [transforms]:
        if isinstance(step, v2.Normalize):
            m = list(step.mean) * (bands if len(step.mean) == 1 else 1)
            s = list(step.std) * (bands if len(step.std) == 1 else 1)
            # (((x - mean) / std) - m) / s = (x - (mean + m * std)) / (std * s)
            mean = [a + b * c for a, b, c in zip(mean, m, std, strict=True)]
            std = [a * b for a, b in zip(std, s, strict=True)]
        elif isinstance(step, (v2.Resize, v2.CenterCrop)):
            size = step.size
            crop = int(size[0] if isinstance(size, (list, tuple)) else size)
        elif type(step).__name__ != "Identity":
            raise ValueError(f"a preprocessing step this pipeline cannot apply: {step}")
    return mean, std, crop


def spec(name: str) -> Spec:
    """``name``'s entry read from torchgeo's enum: URL, bands, and mean/std on ``raw / value_range``."""
    from torchgeo.models import get_weight  # ~3 s to import: only when a named backbone is asked for

    named = NAMED[name]
    enum = get_weight(named.enum)
    in_channels = int(enum.meta["in_chans"])
    mean, std, crop = affine(enum.transforms, in_channels)
    return Spec(
        named=named,
        url=enum.url,
        in_channels=in_channels,
        bands=tuple(enum.meta.get("bands") or ()),
        mean=tuple(m / named.value_range for m in mean),
        std=tuple(s / named.value_range for s in std),
        crop=crop,
        dataset=str(enum.meta.get("dataset", "")),
        publication=str(enum.meta.get("publication", "")),
    )


def statistics_for(
    mean: tuple[float, ...], std: tuple[float, ...], value_range: float, pixel_dtype: str | None
):
    """mean/std for the model, whose input is ``to_unit_range(pixels)``: 16-bit pixels are taken as the
    publisher's raw values (Sentinel-2 digital numbers as distributed), so ``raw / value_range`` is
    ``unit * 65535 / value_range``; 8-bit and float pixels span the weights' scaled range [0, 1] as they are
    (an 8-bit Sentinel-2 RGB is reflectance x 255: the SSL4EO-S12 authors trained on reflectance / 10000
    converted to 8 bits, zhu-xlab/SSL4EO-S12 issue 28)."""
    if pixel_dtype == "uint16" and value_range > 255:
        factor = value_range / 65535
        return [m * factor for m in mean], [s * factor for s in std]
    return list(mean), list(std)
