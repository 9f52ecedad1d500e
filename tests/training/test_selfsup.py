"""Self-supervised pretraining: it trains without labels, its backbone loads into the classifier bit for bit
with its normalization and band count, and its views keep the domain's rules."""

import lightning.pytorch as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import augment, config
from pipeline.data.datamodule import UnlabelledDataset
from pipeline.runinfo import PRETRAIN_BACKBONE, Pretrained
from pipeline.training import selfsup, transfer
from pipeline.training.model import Classifier
from tests.conftest import run_script

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
    views = UnlabelledDataset(tiny_images(bands=bands), [selfsup.view_transform(None, 32)] * 2)
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
    classifier = Classifier(config.Model(arch="resnet18", stem="small", weights="none"), num_classes=2)
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


def test_pretraining_monitors_knn_and_a_stopped_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    from pipeline import config
    from pipeline.training import pretraining
    from pipeline.training.resume import Resume

    images, labels = tiny_images(24), np.arange(24) % 2
    params = config.parse(
        {
            "model": {"weights": "none", "stem": "small"},
            "train": {"accelerator": "cpu", "num_workers": 0},
            "pretrain": {"method": "simclr", "epochs": 1, "batch_size": 8, "knn_every": 1},
        }
    )
    resume = Resume(tmp_path / ".pretrain.resume", "k")
    steps = []
    real_step = selfsup.SelfSupervised.training_step
    monkeypatch.setattr(
        selfsup.SelfSupervised, "training_step", lambda self, *a: steps.append(1) or real_step(self, *a)
    )
    args = (images, (images[:12], labels[:12]), (images[12:], labels[12:]), None, MEAN, STD, resume)
    _, first = pretraining.pretrain(params, *args)
    assert len(steps) == 3 and resume.last_checkpoint() is not None  # 24 images, batches of 8
    assert first.knn_accuracy is not None and 0 <= first.knn_accuracy <= 1
    longer = config.parse(
        config.as_dict(params) | {"pretrain": config.as_dict(params)["pretrain"] | {"epochs": 2}}
    )
    model, second = pretraining.pretrain(longer, *args)
    assert len(steps) == 6 and second.epochs == 2  # the second run trained epoch 2 only
    pretraining.save(tmp_path / "pretrain", model, second)
    assert Pretrained.read(tmp_path / "pretrain") == second
    assert transfer.read_checkpoint(tmp_path / "pretrain" / PRETRAIN_BACKBONE).in_channels == 3


DDP_SCRIPT = """
import sys, json
import numpy as np, torch
from pipeline import config
from pipeline.training import pretraining
from pipeline.training.resume import Resume
from lightning.pytorch.callbacks import Callback

out = sys.argv[1]
images = np.random.default_rng(0).integers(0, 255, (32, 32, 32, 3), dtype=np.uint8)
labels = np.arange(32) % 2
params = config.parse({
    "model": {"weights": "none", "stem": "small"},
    "train": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
    "pretrain": {"method": "simclr", "epochs": 1, "batch_size": 4, "knn_every": 1},
})
seen = {}
real = pretraining.SelfSupervised.training_step
def spy(self, batch, i):
    seen["sync_bn"] = any(isinstance(m, torch.nn.SyncBatchNorm) for m in self.modules())
    seen["world"] = self.trainer.world_size
    seen["steps"] = seen.get("steps", 0) + 1
    return real(self, batch, i)
pretraining.SelfSupervised.training_step = spy
model, record = pretraining.pretrain(params, images, (images[:16], labels[:16]), (images[16:], labels[16:]),
                                     None, (0.5,) * 3, (0.25,) * 3, Resume(__import__("pathlib").Path(out) / "resume", "k"))
rank = model.trainer.global_rank
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump(seen | {"loss": record.final_loss}, f)
"""


@pytest.mark.slow
def test_pretraining_on_two_ddp_processes_syncs_batchnorm_and_splits_the_images(tmp_path):
    import json

    run_script(DDP_SCRIPT, tmp_path, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for seen in ranks:
        assert not seen["sync_bn"] and seen["world"] == 2  # SyncBatchNorm is GPU-only (see below)
        assert seen["steps"] == 4  # 32 images over 2 ranks in batches of 4: each rank its half
    assert ranks[0]["loss"] == pytest.approx(ranks[1]["loss"])  # synced across ranks


def test_batchnorm_is_synced_on_several_gpus_only(monkeypatch):
    from pipeline import config
    from pipeline.training import pretraining

    def params(**train):
        return config.parse({"model": {"weights": "none"}, "train": train})

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pretraining.sync_batchnorm(params(devices=2, strategy="ddp"))
    assert pretraining.sync_batchnorm(params(num_nodes=2))
    assert not pretraining.sync_batchnorm(params(devices=1))
    assert not pretraining.sync_batchnorm(params(devices=2, accelerator="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pretraining.sync_batchnorm(params(devices=2, strategy="ddp"))
