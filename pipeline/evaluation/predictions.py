"""Model outputs on cached test images: logits, probabilities, and probabilities under test-time augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.data.cache import Images
from pipeline.data.datamodule import CachedImageDataset


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module, images: Images, batch_size: int, transform: A.BasicTransform | None = None
) -> np.ndarray:
    """Logits for a stack of cached images (N, H, W, C), each under ``transform`` if given (read per batch)."""
    model.eval()
    loader = DataLoader(CachedImageDataset(images, np.zeros(len(images)), transform), batch_size=batch_size)
    device = next(model.parameters()).device
    return torch.cat([model(x.to(device)).float().cpu() for x, _ in loader]).numpy()


def predict_proba(
    model: torch.nn.Module, images: Images, batch_size: int, transform: A.BasicTransform | None = None
) -> np.ndarray:
    """Class probabilities for a stack of cached images (N, H, W, C)."""
    return torch.from_numpy(predict_logits(model, images, batch_size, transform)).softmax(-1).numpy()


def predict_tta(
    model: torch.nn.Module,
    images: Images,
    batch_size: int,
    transforms: Sequence[A.BasicTransform],
    plain: np.ndarray | None = None,
) -> np.ndarray:
    """Class probabilities averaged over the images as they are and under each (deterministic) transform.

    ``plain``: the untransformed images' probabilities when the caller already has them.
    """
    probs = [predict_proba(model, images, batch_size) if plain is None else plain]
    for transform in transforms:  # applied per batch: no transformed copy of the whole split
        probs.append(predict_proba(model, images, batch_size, transform))
    return np.mean(probs, axis=0)
