"""Model outputs on cached test images: logits, probabilities, and probabilities under test-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.datamodule import CachedImageDataset


@torch.inference_mode()
def predict_logits(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits for a stack of cached images (N, H, W, C)."""
    model.eval()
    loader = DataLoader(CachedImageDataset(images, np.zeros(len(images))), batch_size=batch_size)
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).float().cpu() for x, _ in loader]).numpy()


def predict_proba(model: torch.nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for a stack of cached images (N, H, W, C)."""
    return torch.from_numpy(predict_logits(model, images, batch_size)).softmax(-1).numpy()


def predict_tta(
    model: torch.nn.Module,
    images: np.ndarray,
    batch_size: int,
    transforms: Sequence[A.BasicTransform],
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities averaged over the images as they are and under each (deterministic) transform.

    ``plain``: the untransformed images' probabilities when the caller already has them.
    """
    probs = [predict_proba(model, images, batch_size) if plain is None else plain]
    for transform in transforms:
        moved = np.stack([transform(image=np.asarray(image))["image"] for image in images])
        probs.append(predict_proba(model, moved, batch_size))
    return np.mean(probs, axis=0)
