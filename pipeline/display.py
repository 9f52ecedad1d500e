"""Cached images as a person sees them: one rule for every picture the pipeline draws.

The rule for N bands: three or more show bands 1-3 as RGB (satellite sets put red, green, blue first);
one or two show band 1 in gray. Previews, sample grids, the label audit and Grad-CAM panels all use it.
"""

from __future__ import annotations

import numpy as np


def unit_range(image: np.ndarray) -> np.ndarray:
    """Integer pixels as float32 in [0, 1] (by the dtype's maximum: 255, 65535); floats as float32."""
    image = np.asarray(image)
    top = np.iinfo(image.dtype).max if image.dtype.kind in "ui" else 1.0
    return image.astype(np.float32) / np.float32(top)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """An (H, W, C) image as float RGB (H, W, 3) in [0, 1], by the rule above."""
    x = unit_range(image)
    x = x[..., :3] if x.shape[-1] >= 3 else np.repeat(x[..., :1], 3, axis=-1)
    return np.clip(x, 0, 1)
