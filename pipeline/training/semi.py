"""FixMatch (Sohn et al., NeurIPS 2020) pieces: the strong view, the pool's two views, the masked loss.

Per training step the classifier also sees ``train.semi_ratio`` unlabelled images per labelled one: the
model's prediction on a weak view (the domain's training transforms, as a labelled image gets) becomes a
pseudo-label where its top probability reaches ``train.semi_threshold``, and a strong view of the same image
is trained to predict it. Images below the threshold contribute nothing (the mask), so early in training,
when nothing is confident, the step is the supervised one.

The strong view is RandAugment-style (two photometric or small geometric operations at random, then a cut
out square) built from albumentations, appended to the domain's own training transforms: it adds no flip or
90-degree rotation the domain forbids. Operations that accept only 1 or 3 bands (colour, equalize, posterize)
are left out so N-band images work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset


def strong_transform(weak: A.BasicTransform | None, operations: int = 2) -> A.Compose:
    """The domain's training transforms, then ``operations`` of RandAugment's list at random strengths (the
    ones every band count accepts), then Cutout (one hole, up to half the side), as FixMatch's strong view."""
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


class PoolViews(Dataset):
    """Each unlabelled image as (weak view, strong view), (C, H, W) tensors in the pixels' dtype."""

    def __init__(
        self,
        images: np.ndarray | Sequence[np.ndarray],
        weak: A.BasicTransform | None,
        strong: A.BasicTransform,
    ):
        self.images, self.weak, self.strong = images, weak, strong

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.asarray(self.images[i])
        weak = image if self.weak is None else self.weak(image=image)["image"]
        return _tensor(weak), _tensor(self.strong(image=image)["image"])


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


@dataclass(frozen=True)
class PseudoLabels:
    """One step's unlabelled part: its loss, which images were confident enough, and their pseudo-labels."""

    loss: torch.Tensor
    mask: torch.Tensor  # (N,) float: 1 where the weak view's top probability reached the threshold
    labels: torch.Tensor  # (N,) the weak view's predicted class


def fixmatch_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float) -> PseudoLabels:
    """Cross-entropy of the strong view against the weak view's prediction, counted only where that
    prediction is confident, averaged over all unlabelled images (FixMatch's normalization: a step with few
    confident images adds little). No gradient flows through the pseudo-labels."""
    confidence, labels = weak_logits.detach().softmax(-1).max(-1)
    mask = (confidence >= threshold).to(strong_logits.dtype)
    loss = (F.cross_entropy(strong_logits, labels, reduction="none") * mask).mean()
    return PseudoLabels(loss=loss, mask=mask, labels=labels)
