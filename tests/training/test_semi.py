"""FixMatch: pseudo-labels below the threshold contribute no loss; the strong view keeps the domain's rules and
works on every band count; a fit learns from the pool and never sees a val or test image."""

import albumentations as A
import numpy as np
import pytest
import torch

from pipeline import augment, config
from pipeline.data.datamodule import UnlabelledDataset
from pipeline.training import semi


def test_pseudo_labels_below_the_threshold_contribute_no_loss_or_gradient():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0]])  # confident (0.96) / not (0.37)
    strong = torch.zeros(2, 3, requires_grad=True)
    out = semi.fixmatch_loss(weak, strong, threshold=0.9)
    assert out.mask.tolist() == [1.0, 0.0] and out.labels.tolist() == [0, 0]
    out.loss.backward()
    assert strong.grad is not None
    assert torch.all(strong.grad[1] == 0) and torch.any(strong.grad[0] != 0)
    # the loss is the confident image's cross-entropy averaged over both: FixMatch's normalization
    assert out.loss.item() == pytest.approx(np.log(3) / 2, rel=1e-5)
    nothing = semi.fixmatch_loss(weak, strong, threshold=0.99)
    assert nothing.loss.item() == 0.0 and nothing.mask.sum() == 0


def test_the_threshold_is_a_share_of_the_smoothed_target():
    assert semi.smoothed_target(0.0, 10) == 1.0
    assert semi.smoothed_target(0.1, 2) == pytest.approx(0.95)
    assert semi.smoothed_target(0.1, 10) == pytest.approx(0.91)


@pytest.mark.filterwarnings(r"ignore:You are trying to `self.log\(\)`")
def test_the_training_step_scales_the_threshold_by_the_smoothed_target(monkeypatch):
    """A binary model at smoothing 0.1 and semi_threshold 0.95 masks from 0.9025 up, not from 0.95."""
    from pipeline.training.model import Classifier

    thresholds: list[float] = []
    real = semi.fixmatch_loss
    monkeypatch.setattr(semi, "fixmatch_loss", lambda w, s, t: thresholds.append(t) or real(w, s, t))
    model = Classifier(train=config.Train(label_smoothing=0.1, semi_threshold=0.95), num_classes=2)
    pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    model._pool_step(pixels, pixels)
    assert thresholds == [pytest.approx(0.9025)]


def test_no_gradient_flows_through_the_pseudo_labels():
    weak = torch.tensor([[5.0, 0.0]], requires_grad=True)
    semi.fixmatch_loss(weak, torch.zeros(1, 2, requires_grad=True), 0.5).loss.backward()
    assert weak.grad is None


@pytest.mark.parametrize("bands,dtype", [(1, np.uint8), (3, np.uint8), (5, np.float32)])
def test_the_strong_view_works_on_every_band_count(bands, dtype):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, bands)).astype(dtype)
    if dtype == np.float32:
        image /= 255
    views = UnlabelledDataset(np.stack([image] * 4), [None, augment.strong_transform(None)])
    weak, strong = views[0]
    assert weak.shape == strong.shape == (bands, 32, 32) and strong.dtype == weak.dtype
    assert not torch.equal(weak, strong)


def test_the_strong_view_adds_no_flip_a_radiograph_forbids():
    """The x-ray domain trains without flips or 90-degree rotations; the strong view adds none either."""
    xray = augment.DOMAINS["xray"]
    weak = augment.build(list(xray.transforms), seed=0, preset=xray.preset)
    strong = augment.strong_transform(weak)
    names = {type(t).__name__ for t in _walk(strong)}
    assert not names & {"HorizontalFlip", "VerticalFlip", "SquareSymmetry", "RandomRotate90", "D4"}
    assert {"SomeOf", "CoarseDropout"} <= names


def _walk(transform):
    yield transform
    for child in getattr(transform, "transforms", []):
        yield from _walk(child)


def test_cutout_blanks_part_of_the_image():
    image = np.full((32, 32, 3), 200, np.uint8)
    out = A.Compose([augment.strong_transform(None).transforms[-1]])(image=image)["image"]
    assert (out == 0).any() and (out == 200).any()


def test_a_fixmatch_fit_learns_from_the_pool_and_never_sees_val_or_test(prepared, tiny_params, monkeypatch):
    from pipeline.training import fit as fitting
    from pipeline.training.model import Classifier

    pool = np.random.default_rng(5).integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
    params = config.with_overrides(
        tiny_params,
        {
            "train.semi": "fixmatch",
            "train.semi_threshold": 1e-6,
            "train.semi_ratio": 2,
            "train.max_epochs": 1,
            "train.ema_decay": None,
            "augment.mixup_alpha": 0.0,
            "augment.cutmix_alpha": 0.0,
        },
    )
    seen: list[bytes] = []
    real = Classifier.training_step

    def spy(self, batch, i):
        assert isinstance(batch, dict), "a pool makes every training batch labelled + pool"
        (x, _), (weak, strong) = batch["labelled"], batch["pool"]
        assert len(weak) == len(strong) == 2 * len(x) or len(weak) == len(pool)
        seen.extend(image.numpy().tobytes() for image in torch.cat([x, weak]))
        return real(self, batch, i)

    monkeypatch.setattr(Classifier, "training_step", spy)
    data = fitting.datamodule(params, prepared, None, pool=pool)
    result = fitting.fit(params, data)
    held_out = prepared.table[prepared.table["split"].isin(["val", "test"])]["cache_index"]
    forbidden = {np.ascontiguousarray(prepared.images[i].transpose(2, 0, 1)).tobytes() for i in held_out}
    assert seen and not forbidden & set(seen)
    pool_bytes = {np.ascontiguousarray(p.transpose(2, 0, 1)).tobytes() for p in pool}
    assert pool_bytes & set(seen)  # the pool was trained on
    assert result.last_metrics["semi/confident"] == 1.0  # every pseudo-label passed a threshold of 1e-6
    mix = [v for k, v in result.last_metrics.items() if k.startswith("semi/pseudo/")]
    assert len(mix) == 3 and sum(mix) == pytest.approx(1.0)


def test_fixmatch_without_a_pool_is_one_clear_error(prepared, tiny_params):
    from pipeline.data.prepared import DataError
    from pipeline.training import fit as fitting

    params = config.with_overrides(tiny_params, {"train.semi": "fixmatch"})
    with pytest.raises(DataError, match=r"train.semi: fixmatch needs an unlabelled pool.*data.unlabelled"):
        fitting.datamodule(params, prepared, None)
