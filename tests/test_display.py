"""One display rule for every picture: bands 1-3 as RGB from three bands up, band 1 gray below."""

import numpy as np

from pipeline.display import to_rgb
from pipeline.pixels import unit_max, unit_range


def test_integers_reach_unit_range_by_their_dtype():
    assert unit_range(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert unit_range(np.array([65535], np.uint16)).tolist() == [1.0]
    assert unit_range(np.array([0.25], np.float64)).dtype == np.float32


def test_unit_max_is_one_scale_for_numpy_and_torch_dtypes():
    import torch

    assert [unit_max(d) for d in (np.uint8, "uint16", np.float32)] == [255.0, 65535.0, 1.0]
    assert [unit_max(d) for d in (torch.uint8, torch.int16, torch.bfloat16)] == [255.0, 32767.0, 1.0]


def test_band_counts_follow_the_one_rule():
    six = np.arange(6, dtype=np.uint8).reshape(1, 1, 6) * 50
    assert np.allclose(to_rgb(six)[0, 0], np.array([0, 50, 100]) / 255)
    two = np.array([[[255, 0]]], np.uint8)
    assert to_rgb(two).shape == (1, 1, 3) and to_rgb(two).min() == 1.0  # band 1, gray
