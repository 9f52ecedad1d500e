"""Tests for the synthetic H&E demo set: layout, determinism, and a task neither trivial nor noise."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.demo import CLASSES, generate


def _pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as float arrays in [0, 1] and their class indices."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((root / name).glob("*.png")):
            images.append(np.asarray(Image.open(path), dtype=float) / 255)
            labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("size", [16, 33])
def test_layout_counts_size_and_mode(tmp_path: Path, size: int) -> None:
    counts = generate(tmp_path / "demo", n_per_class=3, image_size=size, seed=0)

    assert counts == {name: 3 for name in CLASSES}
    assert len(CLASSES) >= 3
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == sorted(CLASSES)
    for name in CLASSES:
        files = sorted(p.name for p in (tmp_path / "demo" / name).iterdir())
        assert files == [f"{name}_{i:04d}.png" for i in range(3)]
        for file in files:
            with Image.open(tmp_path / "demo" / name / file) as image:
                assert image.format == "PNG"
                assert image.mode == "RGB"
                assert image.size == (size, size)


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", n_per_class=2, image_size=24, seed=7)
    generate(tmp_path / "b", n_per_class=2, image_size=24, seed=7)

    first, second = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert len(first) == 2 * len(CLASSES)
    assert first == second


def test_different_seeds_give_different_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", n_per_class=2, image_size=24, seed=0)
    generate(tmp_path / "b", n_per_class=2, image_size=24, seed=1)

    first, second = _pngs(tmp_path / "a"), _pngs(tmp_path / "b")
    assert first.keys() == second.keys()
    assert all(first[key] != second[key] for key in first)


def test_images_within_a_class_differ(tmp_path: Path) -> None:
    generate(tmp_path, n_per_class=2, image_size=24, seed=0)

    images, labels = _load(tmp_path)
    for label in range(len(CLASSES)):
        a, b = images[labels == label]
        assert np.abs(a - b).mean() > 0.02


def test_rerun_removes_stale_pngs_only(tmp_path: Path) -> None:
    generate(tmp_path, n_per_class=3, image_size=16, seed=0)
    (tmp_path / "README.txt").write_text("mine")
    (tmp_path / CLASSES[0] / "notes.txt").write_text("mine too")

    generate(tmp_path, n_per_class=1, image_size=16, seed=0)

    for name in CLASSES:
        assert sorted(p.name for p in (tmp_path / name).glob("*.png")) == [f"{name}_0000.png"]
    assert (tmp_path / "README.txt").read_text() == "mine"
    assert (tmp_path / CLASSES[0] / "notes.txt").read_text() == "mine too"


def test_classes_are_learnable_but_not_separable_by_colour_alone(tmp_path: Path) -> None:
    """Nearest centroid on per-channel mean/std, fit on one seed and scored on another."""
    generate(tmp_path / "train", n_per_class=30, image_size=32, seed=0)
    generate(tmp_path / "test", n_per_class=30, image_size=32, seed=1)

    def colour_stats(images: np.ndarray) -> np.ndarray:
        return np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)

    train_images, train_labels = _load(tmp_path / "train")
    test_images, test_labels = _load(tmp_path / "test")
    train_x, test_x = colour_stats(train_images), colour_stats(test_images)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    centroids = np.stack([train_x[train_labels == k].mean(axis=0) for k in range(len(CLASSES))])
    distances = ((test_x[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == test_labels).mean()

    chance = 1 / len(CLASSES)
    assert chance + 0.08 < accuracy < 0.8
    # Necrosis pales the eosin and fades the nuclei; tumour is crowded with dark nuclei.
    brightness = {name: train_images[train_labels == k].mean() for k, name in enumerate(CLASSES)}
    assert brightness["necrotic"] > brightness["tumor"] + 0.01


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [({"n_per_class": 0}, "n_per_class"), ({"image_size": 15}, "image_size")],
)
def test_bad_arguments_raise_naming_the_argument(
    tmp_path: Path, kwargs: dict[str, int], argument: str
) -> None:
    args = {"n_per_class": 2, "image_size": 32, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=argument):
        generate(tmp_path / "demo", **args)
    assert not (tmp_path / "demo").exists()
