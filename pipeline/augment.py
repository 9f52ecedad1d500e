"""Training augmentation: domain presets and params entries built with albumentations, saved (previewed by
``display.augment_preview``).

The augment stage serializes the pipeline; train and tune load that file rather than rebuilding it
from params, so what was previewed is exactly what trains. The same module builds the deterministic
test-time transforms (``evaluate.tta``) and the optional offline copies.

Every preset works on 1-, 3- and N-band images (tested): transforms that accept only 1 or 3 channels
are left out and named in a comment. albumentations 2 supports uint8 and float32 images only (on
uint16 some transforms crash and RandomGamma returns out-of-range float64), so ``build`` runs
16-bit images through float32 in [0, 1] with an explicit ``ToFloat`` ... ``FromFloat`` pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import Preset
from pipeline.errors import PipelineError
from pipeline.pixels import unit_max

if TYPE_CHECKING:
    from pipeline.data.cache import Images

if (
    TYPE_CHECKING
):  # imported where a pipeline is built: intake reads DOMAINS without PyTorch's import (5-10 s)
    import albumentations as A

PRESETS: dict[str, tuple[dict[str, Any], ...]] = {
    "none": (),
    # Grayscale-safe, no hue or colour jitter. No flips: a radiograph's left and right are anatomy
    # (add {name: SquareSymmetry, p: 1.0} for orientation-free images such as histology tiles).
    # CLAHE is left out: it accepts only 1- or 3-channel images (TypeError on N bands); add
    # {name: CLAHE, p: 0.3} as an override for grayscale or RGB data.
    "medical": (
        {
            "name": "Affine",
            "rotate": [-10, 10],
            "scale": [0.9, 1.1],
            "translate_percent": [-0.05, 0.05],
            "border_mode": 4,
            "p": 0.5,
        },  # 4: cv2.BORDER_REFLECT_101, no black corners
        {"name": "ElasticTransform", "alpha": 15, "sigma": 6, "border_mode": 4, "p": 0.25},
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.1, "contrast_limit": 0.1, "p": 0.5},
        {"name": "RandomGamma", "gamma_limit": [90, 110], "p": 0.3},
    ),
    # D4: all eight flips and 90-degree rotations, uniformly (one transform instead of flips +
    # RandomRotate90). Per-band gain: one brightness factor per band, as sensor/atmosphere differences.
    "satellite": (
        {"name": "SquareSymmetry", "p": 1.0},
        {
            "name": "MultiplicativeNoise",
            "multiplier": [0.9, 1.1],
            "per_channel": True,
            "elementwise": False,
            "p": 0.5,
        },
    ),
    # ImageNet-style: flip, scale/shift/rotate (in place of RandomResizedCrop, which needs the image
    # size), brightness/contrast. ColorJitter/HueSaturationValue are left out: they accept only 1 or
    # 3 channels; add {name: ColorJitter, saturation: 0.2, hue: 0.05, p: 0.5} for RGB data.
    "natural": (
        {"name": "HorizontalFlip", "p": 0.5},
        {
            "name": "Affine",
            "rotate": [-15, 15],
            "scale": [0.8, 1.2],
            "translate_percent": [-0.1, 0.1],
            "border_mode": 4,
            "p": 0.7,
        },
        {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "contrast_limit": 0.2, "p": 0.5},
    ),
}


@dataclass(frozen=True)
class DomainSettings:
    """What ``intake --domain`` writes to params.yaml: augment.preset, augment.transforms, evaluate.tta."""

    preset: Preset
    transforms: tuple[dict[str, Any], ...]
    tta: tuple[str, ...]


# Which invariances each kind of image has decides its flips and rotations, for training and for TTA alike
# (a test-time view is only useful if training taught the model it is the same image).
DOMAINS: dict[str, DomainSettings] = {
    # Chest films, bone radiographs: left and right are anatomy (the heart is on the left; side markers are
    # text), and up is up; no flips or 90-degree rotations, so no TTA either.
    "xray": DomainSettings("medical", (), ()),
    # Axial CT and MRI slices are displayed in a fixed radiological convention (patient's left on the
    # image's right); a flip makes a different, mislabelled patient. Same as radiographs.
    "ct": DomainSettings("medical", (), ()),
    "mri": DomainSettings("medical", (), ()),
    # The probe sits at the top of a sector image, so no vertical flip or rotation; which side is the
    # probe marker varies between machines and operators, so a horizontal flip is a plausible image.
    "ultrasound": DomainSettings("medical", ({"name": "HorizontalFlip", "p": 0.5},), ("HorizontalFlip",)),
    # A skin lesion seen from above and a tissue tile have no orientation: every flip and 90-degree
    # rotation is the same image (SquareSymmetry draws them uniformly); TTA may use flips.
    "dermoscopy": DomainSettings(
        "medical", ({"name": "SquareSymmetry", "p": 1.0},), ("HorizontalFlip", "VerticalFlip")
    ),
    "pathology": DomainSettings(
        "medical", ({"name": "SquareSymmetry", "p": 1.0},), ("HorizontalFlip", "VerticalFlip")
    ),
    # Nadir views: north-up is a convention, not content; the satellite preset already has SquareSymmetry.
    "satellite": DomainSettings("satellite", (), ("HorizontalFlip", "VerticalFlip")),
    # Photographs: a mirror image is still the same scene, an upside-down one is not (sky above ground).
    "natural": DomainSettings("natural", (), ("HorizontalFlip",)),
}

# Training transforms that teach the invariance a deterministic TTA view relies on.
_TEACHES = {
    "HorizontalFlip": {"HorizontalFlip", "SquareSymmetry", "D4"},
    "VerticalFlip": {"VerticalFlip", "SquareSymmetry", "D4"},
    "Transpose": {"Transpose", "SquareSymmetry", "D4"},
}


def tta_conflicts(
    preset: Preset, transforms: Sequence[dict[str, Any]], tta: Sequence[str | dict[str, Any]]
) -> list[str]:
    """Each ``evaluate.tta`` flip or transpose that the training augmentation never applies (p > 0), described.

    Averaging in a view the model never saw in training (an upside-down chest film) mixes in predictions
    on images unlike any it learned from. Transforms other than flips and transposes are not judged.
    """
    trained = {e.get("name") for _, e in resolve(preset, transforms) if e.get("p", 0.5) > 0}
    out = []
    for entry in tta:
        name = entry if isinstance(entry, str) else entry.get("name")
        if name in _TEACHES and not trained & _TEACHES[name]:
            out.append(
                f"evaluate.tta has {name}, but training never applies it (augment.preset {preset} with "
                f"augment.transforms has no {' / '.join(sorted(_TEACHES[name]))}): the TTA average mixes in "
                "views the model never learned; remove it from evaluate.tta or add it to augment.transforms"
            )
    return out


class AugmentError(PipelineError, ValueError):
    """A bad entry in augment.transforms, augment.preset or evaluate.tta; the message names the entry."""


def resolve(preset: Preset, transforms: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The preset's entries with ``transforms`` applied, each with where it came from (for errors).

    Override rule: an entry whose ``name`` is in the preset updates that preset entry's arguments
    (the others keep the preset's values; ``p: 0`` switches it off); any other entry is appended, in
    order. A name may override the preset only once.
    """
    if preset not in PRESETS:
        raise AugmentError(f"augment.preset: '{preset}' is not a preset (valid: {', '.join(PRESETS)})")
    entries = [(f"augment.preset {preset}[{i}]", dict(e)) for i, e in enumerate(PRESETS[preset])]
    in_preset = {e["name"]: i for i, (_, e) in enumerate(entries)}
    overridden: set[str] = set()
    for i, entry in enumerate(transforms):
        where, name = f"augment.transforms[{i}]", entry.get("name")
        if isinstance(name, str) and name in in_preset:
            if name in overridden:
                raise AugmentError(
                    f"{where}: '{name}' overrides preset '{preset}' a second time; "
                    "merge the two entries into one"
                )
            overridden.add(name)
            k = in_preset[name]
            entries[k] = (f"{where} (overriding preset '{preset}')", entries[k][1] | dict(entry))
        else:
            entries.append((where, dict(entry)))
    return entries


def _transform(where: str, entry: dict[str, Any]) -> A.BasicTransform:
    """One transform from ``{name: Transform, arg: value, ...}``, built strictly.

    albumentations 2 otherwise only warns about arguments it does not know (for example ones removed
    since 1.x), which would silently change the pipeline. The few classes without an ``InitSchema``
    (e.g. RandomRotate90) take no ``strict`` argument but reject unknown ones with a TypeError anyway.
    """
    import albumentations as A

    args = dict(entry)
    name = args.pop("name", None)
    cls = getattr(A, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform)):
        raise AugmentError(
            f"{where}: '{name}' is not an albumentations transform "
            "(write e.g. {name: HorizontalFlip, p: 0.5})"
        )
    owner = next(k for k in cls.__mro__ if "__init__" in k.__dict__)
    strict = {"strict": True} if "InitSchema" in owner.__dict__ else {}
    try:
        return cls(**args, **strict)
    except Exception as err:  # albumentations raises ValueError, TypeError or pydantic's ValidationError
        raise AugmentError(f"{where} ({name}): {err}") from None


def build(
    transforms: Sequence[dict[str, Any]],
    seed: int,
    *,
    preset: Preset = "none",
    dtype: np.dtype | str = "uint8",
) -> A.Compose:
    """A seeded ``A.Compose`` of ``preset`` overridden by ``transforms`` (see ``resolve``), for ``dtype`` images."""
    import albumentations as A

    built = [_transform(where, entry) for where, entry in resolve(preset, transforms)]
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype != np.uint8:
        top = unit_max(dtype)
        built = [A.ToFloat(max_value=top), *built, A.FromFloat(dtype=dtype.name, max_value=top)]
    return A.Compose(built, seed=seed)


def build_tta(entries: Sequence[str | dict[str, Any]]) -> list[A.BasicTransform]:
    """The deterministic test-time transforms of ``evaluate.tta`` (names, or entries with arguments).

    Each always applies (``p`` is 1); one whose output depends on the random seed is refused.
    """
    import albumentations as A

    built = []
    probe = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for i, entry in enumerate(entries):
        where, entry = f"evaluate.tta[{i}]", {"name": entry} if isinstance(entry, str) else dict(entry)
        if entry.setdefault("p", 1.0) != 1.0:
            raise AugmentError(
                f"{where} ({entry.get('name')}): test-time transforms always apply; remove 'p'"
            )
        transform = _transform(where, entry)
        outputs = [A.Compose([transform], seed=s)(image=probe)["image"] for s in range(8)]
        if any(not np.array_equal(outputs[0], o) for o in outputs[1:]):
            raise AugmentError(
                f"{where} ({entry['name']}): random, not deterministic; test-time augmentation "
                "needs fixed transforms such as HorizontalFlip, VerticalFlip or Transpose"
            )
        built.append(transform)
    return built


def save(pipeline: A.BasicTransform, path: Path) -> None:
    import albumentations as A

    A.save(pipeline, str(path), data_format="json")


def load(path: Path, seed: int) -> A.Compose:
    import albumentations as A

    if not Path(path).is_file():
        raise AugmentError(f"{path}: augmentation pipeline not found; run the augment stage first")
    pipeline = A.load(str(path), data_format="json")
    pipeline.set_random_seed(seed)
    return pipeline


def offline_copies(
    pipeline: A.BasicTransform, images: np.ndarray, labels: np.ndarray, copies: int
) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` augmented draws of every image (image-major order), and their labels."""
    if copies == 0:
        return np.empty((0, *images.shape[1:]), images.dtype), np.empty(0, np.int64)
    drawn = [pipeline(image=np.asarray(image))["image"] for image in images for _ in range(copies)]
    return np.stack(drawn), np.repeat(np.asarray(labels, dtype=np.int64), copies)


def write_offline_copies(
    pipeline: A.BasicTransform,
    images: Images,
    labels: np.ndarray,
    copies: int,
    images_npy: Path,
    labels_npy: Path,
) -> int:
    """``offline_copies`` (the same draws, in the same order) streamed to two .npy files one image at a time,
    so memory stays bounded however large the train split (``images`` may be a lazy ``datamodule.Rows``).
    Returns the number of copies written."""
    from pipeline.data.cache import CacheWriter

    labels_out = np.repeat(np.asarray(labels, dtype=np.int64), copies)
    np.save(labels_npy, labels_out)
    if not len(labels_out):
        np.save(images_npy, np.empty((0, *images.shape[1:]), images.dtype))
        return 0
    with CacheWriter(images_npy, len(labels_out)) as writer:
        for image in images:
            for _ in range(copies):
                writer.append(pipeline(image=np.asarray(image))["image"])
        writer.finish()  # trims and closes the file; the memory map it returns is not needed
    return len(labels_out)


def strong_transform(weak: A.BasicTransform | None, operations: int = 2) -> A.Compose:
    """FixMatch's strong view (``train.semi``): the domain's training transforms, then ``operations`` of
    RandAugment's list at random strengths (those every band count accepts), then Cutout (one hole, up to half
    the side). It adds no flip or 90-degree rotation the domain forbids: those come from ``weak`` alone."""
    import albumentations as A

    pool = [
        A.RandomBrightnessContrast(brightness_limit=0.5, contrast_limit=0.0, p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.0, contrast_limit=0.5, p=1.0),
        A.Sharpen(alpha=(0.2, 0.8), p=1.0),
        A.Solarize(threshold_range=(0.5, 1.0), p=1.0),
        A.RandomGamma(gamma_limit=(60, 160), p=1.0),
        A.Affine(shear={"x": (-15, 15), "y": (0, 0)}, border_mode=4, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-15, 15)}, border_mode=4, p=1.0),
        A.Affine(translate_percent={"x": (-0.2, 0.2), "y": (0, 0)}, border_mode=4, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-0.2, 0.2)}, border_mode=4, p=1.0),
    ]
    steps: list[A.BasicTransform] = [] if weak is None else [weak]
    steps += [
        A.SomeOf(pool, n=operations, replace=False, p=1.0),
        A.CoarseDropout(
            num_holes_range=(1, 1), hole_height_range=(0.1, 0.5), hole_width_range=(0.1, 0.5), fill=0, p=1.0
        ),
    ]
    return A.Compose(steps)
