"""Pixel values and the [0, 1] scale they stand for: the one place integers meet their dtype's maximum.

Integer pixels mean value / max of their dtype (255 for uint8, 65535 for uint16), floats are already in
[0, 1]: the cache, the statistics, augmentation, the model's input and every picture agree on it.
(The exported model's TorchScript writes the two maxima out: it cannot call this module.)
"""

from __future__ import annotations

from typing import Any

import numpy as np


def unit_max(dtype: Any) -> float:
    """The pixel value that stands for 1.0: an integer dtype's maximum; 1.0 for floats.

    ``dtype``: anything ``np.dtype`` takes, or a torch dtype (``torch.uint8``).
    """
    if hasattr(dtype, "is_floating_point"):  # a torch dtype: by its name (bfloat16 has no NumPy one)
        if dtype.is_floating_point:
            return 1.0
        dtype = str(dtype).removeprefix("torch.")
    kind = np.dtype(dtype)
    return float(np.iinfo(kind).max) if kind.kind in "ui" else 1.0


def unit_range(pixels: np.ndarray) -> np.ndarray:
    """Pixels as float32 in [0, 1] units (integers divided by their dtype's maximum; floats as they are)."""
    pixels = np.asarray(pixels)
    return pixels.astype(np.float32) / np.float32(unit_max(pixels.dtype))
