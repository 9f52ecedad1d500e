import albumentations as A
import numpy as np
import pytest
from PIL import Image

from pipeline import augment, display

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


@pytest.mark.parametrize(
    "entry, words",
    [
        (
            {"name": "NoSuchTransform"},
            "augment.transforms[1]: 'NoSuchTransform' is not an albumentations transform",
        ),
        ({"name": "Compose"}, "'Compose' is not an albumentations transform"),
        ({"p": 0.5}, "'None' is not an albumentations transform"),
        ({"name": "Affine", "rotate_limit": 10}, "augment.transforms[1] (Affine)"),
        ({"name": "HorizontalFlip", "p": 3}, "augment.transforms[1] (HorizontalFlip)"),
    ],
)
def test_bad_entries_are_named(entry, words):
    with pytest.raises(augment.AugmentError) as err:
        augment.build([SPEC[0], entry], seed=0)
    assert words in str(err.value)


def test_preview_is_written_and_seeded(images, tmp_path):
    for name in ("a.png", "b.png"):
        display.augment_preview(augment.build(SPEC, seed=5), images, ["x", "y", "x", "y"], 3, tmp_path / name)
    with Image.open(tmp_path / "a.png") as a, Image.open(tmp_path / "b.png") as b:
        assert a.size[0] > 200 and np.array_equal(np.asarray(a), np.asarray(b))


def test_missing_pipeline_file_says_what_to_run(tmp_path):
    with pytest.raises(augment.AugmentError, match="run the augment stage"):
        augment.load(tmp_path / "missing.json", seed=0)


# --- presets, overrides, dtypes and channel counts -------------------------------------------------

PRESETS = ("medical", "satellite", "natural")
KINDS = [(dtype, channels) for dtype in (np.uint8, np.uint16) for channels in (1, 3, 13)]


def test_presets_are_the_params_choices():
    from typing import get_args

    from pipeline.config import Preset

    assert set(augment.PRESETS) == set(get_args(Preset))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype, channels", KINDS, ids=[f"{np.dtype(d).name}x{c}" for d, c in KINDS])
def test_each_preset_keeps_shape_dtype_and_range(preset, dtype, channels):
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(0)
    images = rng.integers(top // 10, top - top // 10, (3, 24, 24, channels), endpoint=True).astype(dtype)
    pipeline = augment.build([], seed=0, preset=preset, dtype=dtype)
    out = np.stack([pipeline(image=image)["image"] for image in images for _ in range(4)])
    assert out.shape == (12, 24, 24, channels) and out.dtype == dtype
    # Still spread over the source's range (16-bit not squashed to 8-bit), and something was changed.
    assert out.max() > 0.8 * top and out.min() < 0.2 * top
    assert not np.array_equal(out, np.repeat(images, 4, axis=0))


def test_sixteen_bit_runs_through_float_and_back_explicitly():
    names = [
        type(t).__name__ for t in augment.build([], seed=0, preset="satellite", dtype="uint16").transforms
    ]
    assert names == ["ToFloat", "SquareSymmetry", "MultiplicativeNoise", "FromFloat"]
    assert "ToFloat" not in [
        type(t).__name__ for t in augment.build([], seed=0, preset="satellite").transforms
    ]


def test_overrides_update_preset_arguments_and_new_names_append():
    entries = [
        e
        for _, e in augment.resolve(
            "medical", [{"name": "Affine", "rotate": [-3, 3]}, {"name": "CLAHE", "p": 0.3}]
        )
    ]
    names = [e["name"] for e in entries]
    assert names == [e["name"] for e in augment.PRESETS["medical"]] + ["CLAHE"]
    affine = entries[names.index("Affine")]
    assert affine["rotate"] == [-3, 3] and affine["scale"] == [0.9, 1.1]  # the rest kept from the preset
    assert augment.PRESETS["medical"][0]["rotate"] == [-10, 10]  # the preset itself untouched


def test_override_errors_name_the_entry():
    with pytest.raises(
        augment.AugmentError, match=r"augment.transforms\[1\]: 'Affine' overrides preset 'medical' a second"
    ):
        augment.resolve("medical", [{"name": "Affine", "p": 0.1}, {"name": "Affine", "p": 0.2}])
    with pytest.raises(
        augment.AugmentError, match=r"augment.transforms\[0\] \(overriding preset 'natural'\) \(Affine\)"
    ):
        augment.build([{"name": "Affine", "rotate_limit": 5}], seed=0, preset="natural")
    with pytest.raises(augment.AugmentError, match="'xray' is not a preset"):
        augment.resolve("xray", [])


def test_transforms_without_a_strict_argument_still_build_and_still_reject_unknown_arguments():
    assert isinstance(augment.build([{"name": "RandomRotate90"}], seed=0).transforms[0], A.RandomRotate90)
    with pytest.raises(augment.AugmentError, match=r"\(RandomRotate90\)"):
        augment.build([{"name": "RandomRotate90", "angle": 90}], seed=0)


def test_a_preset_pipeline_round_trips_with_its_dtype_conversion(tmp_path):
    built = augment.build([{"name": "CoarseDropout"}], seed=2, preset="medical", dtype="uint16")
    augment.save(built, tmp_path / "t.json")
    loaded = augment.load(tmp_path / "t.json", seed=2)
    images = np.random.default_rng(1).integers(0, 65536, (2, 24, 24, 13)).astype(np.uint16)
    built.set_random_seed(2)
    assert loaded.to_dict() == built.to_dict() and np.array_equal(draws(loaded, images), draws(built, images))


def test_preview_of_sixteen_bit_n_band_images(tmp_path):
    images = np.random.default_rng(0).integers(0, 65536, (2, 24, 24, 13)).astype(np.uint16)
    display.augment_preview(
        augment.build([], seed=0, preset="satellite", dtype="uint16"),
        images,
        ["a", "b"],
        2,
        tmp_path / "p.png",
    )
    with Image.open(tmp_path / "p.png") as png:
        assert png.size[0] > 100 and np.asarray(png).std() > 10  # drawn, not blank


# --- test-time transforms and offline copies -------------------------------------------------------


def test_tta_transforms_always_apply(images):
    (flip,) = augment.build_tta(["HorizontalFlip"])
    assert np.array_equal(flip(image=images[0])["image"], images[0][:, ::-1])
    (transpose,) = augment.build_tta([{"name": "Transpose"}])
    assert np.array_equal(transpose(image=images[0])["image"], images[0].transpose(1, 0, 2))


@pytest.mark.parametrize(
    "entry, words",
    [
        ("RandomRotate90", r"evaluate.tta\[0\] \(RandomRotate90\): random, not deterministic"),
        (
            {"name": "HorizontalFlip", "p": 0.5},
            r"evaluate.tta\[0\] \(HorizontalFlip\): test-time transforms always apply",
        ),
        ("Flip", r"evaluate.tta\[0\]: 'Flip' is not an albumentations transform"),
    ],
)
def test_bad_tta_entries_are_named(entry, words):
    with pytest.raises(augment.AugmentError, match=words):
        augment.build_tta([entry])


def test_offline_copies_are_augmented_draws_with_their_labels(images):
    pipeline = augment.build([{"name": "VerticalFlip", "p": 1.0}], seed=0)
    copies, labels = augment.offline_copies(pipeline, images, np.array([0, 1, 2, 3]), 2)
    assert copies.shape == (8, 32, 32, 3) and copies.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and np.array_equal(copies[2], images[1][::-1])
    none, no_labels = augment.offline_copies(pipeline, images, np.arange(4), 0)
    assert none.shape == (0, 32, 32, 3) and len(no_labels) == 0


def test_every_domain_builds_and_its_tta_is_taught_in_training():
    from pipeline.augment import DOMAINS, build, build_tta, tta_conflicts

    for name, domain in DOMAINS.items():
        build(domain.transforms, seed=0, preset=domain.preset)
        build_tta(domain.tta)
        assert tta_conflicts(domain.preset, domain.transforms, domain.tta) == [], name
    for radiograph in ("xray", "ct", "mri"):  # no flips, none at test time
        assert DOMAINS[radiograph].tta == () and not DOMAINS[radiograph].transforms
    assert tta_conflicts("medical", (), ["HorizontalFlip", "Transpose"])[0].startswith(
        "evaluate.tta has HorizontalFlip"
    )
    assert tta_conflicts("medical", ({"name": "SquareSymmetry", "p": 0},), ["VerticalFlip"])  # switched off
