import numpy as np
import pytest
from PIL import Image

from pipeline import augment

SPEC = [
    {"name": "HorizontalFlip", "p": 0.5},
    {"name": "Affine", "rotate": [-10, 10], "p": 0.7},
    {"name": "RandomBrightnessContrast", "brightness_limit": 0.2, "p": 0.5},
]


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def draws(pipeline, images):
    return np.stack([pipeline(image=img)["image"] for img in images for _ in range(3)])


def test_build_keeps_shape_and_dtype(images):
    out = draws(augment.build(SPEC, seed=1), images)
    assert out.shape == (12, 32, 32, 3) and out.dtype == np.uint8


def test_serialization_round_trips_to_the_same_pipeline(images, tmp_path):
    built = augment.build(SPEC, seed=1)
    augment.save(built, tmp_path / "t.json")
    loaded = augment.load(tmp_path / "t.json", seed=1)
    assert loaded.to_dict() == built.to_dict()
    built.set_random_seed(1)
    assert np.array_equal(draws(loaded, images), draws(built, images))


@pytest.mark.parametrize("entry, words", [
    ({"name": "NoSuchTransform"}, "augment.transforms[1]: 'NoSuchTransform' is not an albumentations transform"),
    ({"name": "Compose"}, "'Compose' is not an albumentations transform"),
    ({"p": 0.5}, "'None' is not an albumentations transform"),
    ({"name": "Affine", "rotate_limit": 10}, "augment.transforms[1] (Affine)"),
    ({"name": "HorizontalFlip", "p": 3}, "augment.transforms[1] (HorizontalFlip)"),
])
def test_bad_entries_are_named(entry, words):
    with pytest.raises(augment.AugmentError) as err:
        augment.build([SPEC[0], entry], seed=0)
    assert words in str(err.value)


def test_preview_is_written_and_seeded(images, tmp_path):
    for name in ("a.png", "b.png"):
        augment.preview(augment.build(SPEC, seed=5), images, ["x", "y", "x", "y"], 3, tmp_path / name)
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size[0] > 200 and np.array_equal(np.asarray(a), np.asarray(b))


def test_missing_pipeline_file_says_what_to_run(tmp_path):
    with pytest.raises(augment.AugmentError, match="run the augment stage"):
        augment.load(tmp_path / "missing.json", seed=0)
