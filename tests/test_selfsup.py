"""Self-supervised pretraining: it trains without labels, its backbone loads into the classifier bit for bit
with its normalization and band count, and its views keep the domain's rules."""

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import augment, selfsup, transfer
from pipeline.model import Classifier

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def tiny_images(n: int = 24, bands: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, (n, 32, 32, bands), dtype=np.uint8)


def fit(method: str, bands: int = 3) -> selfsup.SelfSupervised:
    torch.manual_seed(0)
    model = selfsup.SelfSupervised(
        "resnet18",
        method,
        mean=MEAN[:bands] if bands <= 3 else [0.5] * bands,
        std=STD[:bands] if bands <= 3 else [0.25] * bands,
        in_channels=bands,
        stem="small",
        lr=1e-3,
    )
    views = selfsup.TwoViews(tiny_images(bands=bands), selfsup.view_transform(None, 32))
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainer.fit(model, DataLoader(views, batch_size=8, shuffle=True, drop_last=True))
    changed = [
        k
        for k, v in model.backbone.state_dict().items()
        if v.dtype.is_floating_point and not torch.equal(v, before[k])
    ]
    assert changed, "pretraining changed no backbone tensor"
    assert np.isfinite(trainer.callback_metrics["pretrain/loss"].item())
    return model


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_the_pretrained_backbone_loads_into_the_classifier_bit_for_bit(method, tmp_path):
    model = fit(method)
    path = tmp_path / "backbone.ckpt"
    model.save_backbone(path)
    backbone = transfer.read_checkpoint(path)
    assert backbone.arch == "resnet18" and backbone.in_channels == 3
    assert backbone.mean == pytest.approx(MEAN) and backbone.std == pytest.approx(STD)
    classifier = Classifier("resnet18", 2, stem="small")
    info = transfer.load_backbone(classifier.net, "resnet18", backbone, str(path))
    assert info.pretrained and info.mean == pytest.approx(MEAN)
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(classifier.net.state_dict()[key], tensor), key


def test_a_gray_backbone_keeps_its_band_count(tmp_path):
    model = fit("simclr", bands=1)
    model.save_backbone(tmp_path / "gray.ckpt")
    assert transfer.read_checkpoint(tmp_path / "gray.ckpt").in_channels == 1


def test_views_keep_the_domain_s_rules():
    """An x-ray view is cropped and its brightness changed, never mirrored: a view's columns reversed never
    equals the image when the crop keeps it whole and nothing else changes."""
    xray = augment.DOMAINS["xray"]
    train = augment.build(list(xray.transforms), seed=0, preset=xray.preset)
    names = {type(t).__name__ for t in selfsup.view_transform(train, 32).transforms}
    assert not names & {"HorizontalFlip", "VerticalFlip", "SquareSymmetry"}
    assert "RandomResizedCrop" in names


def test_knn_accuracy_separates_separable_features():
    model = selfsup.SelfSupervised("resnet18", "simclr", mean=MEAN, std=STD, stem="small")
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 40, (10, 3, 32, 32))
    bright = rng.integers(200, 255, (10, 3, 32, 32))
    images = torch.from_numpy(np.concatenate([dark, bright]).astype(np.uint8))
    labels = torch.tensor([0] * 10 + [1] * 10)
    assert selfsup.knn_accuracy(model, images[::2], labels[::2], images[1::2], labels[1::2], k=3) == 1.0
