"""The pretrain stage's work: self-supervised training of the backbone (``pipeline.selfsup``), resumable, with a
kNN monitor, and its output folder.

It trains on images without their labels: the unlabelled pool and the train split, never val or test. Val
(with its labels) only scores the frozen features every ``pretrain.knn_every`` epochs against the train
split as the neighbour bank, so a user sees whether it learns. A killed run resumes from the ``last.ckpt``
of its resume folder (``pipeline.resume``: the same inputs, else it starts over). Under DDP, BatchNorm is
synchronized on GPUs and SimCLR's negatives are gathered across ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader

from pipeline.config import Params
from pipeline.data.cache import Images
from pipeline.data.datamodule import UnlabelledDataset
from pipeline.fsutil import atomic_dir
from pipeline.runinfo import LAST
from pipeline.training.resume import Resume
from pipeline.training.selfsup import SelfSupervised, knn_accuracy, view_transform

BACKBONE = "backbone.ckpt"  # in paths.pretrain: what model.weights: pretrain starts train from
RECORD = "pretrain.json"


@dataclass(frozen=True)
class Pretrained:
    """What a pretraining produced: the record beside the backbone (``pretrain.json``)."""

    method: str
    arch: str
    in_channels: int
    image_size: int
    images: int  # pretraining images per epoch (pool + train split)
    epochs: int
    final_loss: float
    knn_accuracy: float | None  # the last kNN monitor's val accuracy; None when knn_every is 0
    run_id: str | None = None

    def write(self, folder: Path) -> None:
        (folder / RECORD).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Pretrained:
        return cls(**json.loads((folder / RECORD).read_text()))


class KNNMonitor(Callback):
    """``pretrain/knn_accuracy`` every ``every`` epochs (and after the last): val scored by its nearest
    train-split neighbours in the frozen features. Computed on rank 0 over all of val."""

    def __init__(
        self, every: int, bank: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor]
    ):
        self.every, self.bank, self.val = every, bank, val
        self.last: float | None = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not (epoch % self.every == 0 or epoch == trainer.max_epochs):
            return
        assert isinstance(pl_module, SelfSupervised)
        self.last = knn_accuracy(pl_module, *self.bank, *self.val)
        pl_module.log("pretrain/knn_accuracy", self.last, rank_zero_only=True)


def pretrain(
    params: Params,
    images: Images,
    bank: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    train_transform: A.BasicTransform | None,
    mean: Sequence[float],
    std: Sequence[float],
    resume: Resume,
    logger: Logger | bool = False,
) -> tuple[SelfSupervised, Pretrained]:
    """Train a backbone on ``images`` (pool + train split, pixels N x H x W x C) without labels.

    ``bank``/``val``: the train split's and val's (pixels, label indices) for the kNN monitor only. The
    views start from the domain's ``train_transform`` (``augment``'s pipeline: its flips, or none).
    Resumes from ``resume``'s ``last.ckpt`` when there is one.
    """
    settings, t = params.pretrain, params.train
    L.seed_everything(params.seed, workers=True, verbose=False)
    size, bands = int(np.asarray(images[0]).shape[0]), int(np.asarray(images[0]).shape[-1])
    model = SelfSupervised(
        params.model.arch,
        "byol" if settings.method == "byol" else "simclr",
        mean=mean,
        std=std,
        in_channels=bands,
        stem=params.model.stem,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        warmup_epochs=t.warmup_epochs,
        temperature=settings.temperature,
        momentum=settings.momentum,
    )
    views = view_transform(train_transform, size)
    loader = DataLoader(
        UnlabelledDataset(images, [views, views]),
        batch_size=min(settings.batch_size, len(images)),
        shuffle=True,
        drop_last=True,  # contrastive batches of one image have no negatives
        num_workers=t.num_workers,
        persistent_workers=t.num_workers > 0,
    )
    monitor = (
        KNNMonitor(settings.knn_every, *(_tensors(x) for x in (bank, val))) if settings.knn_every else None
    )
    latest = ModelCheckpoint(
        dirpath=resume.checkpoints,
        filename=LAST,
        monitor=None,
        save_top_k=1,
        enable_version_counter=False,
    )
    trainer = L.Trainer(
        max_epochs=settings.epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision,
        sync_batchnorm=sync_batchnorm(params),
        logger=logger,
        callbacks=[latest, *([] if monitor is None else [monitor])],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        default_root_dir=str(resume.dir),
    )
    trainer.fit(model, loader, ckpt_path=resume.last_checkpoint())
    record = Pretrained(
        method=settings.method,
        arch=params.model.arch,
        in_channels=bands,
        image_size=size,
        images=len(images),
        epochs=trainer.current_epoch,
        final_loss=float(trainer.callback_metrics["pretrain/loss"]),
        knn_accuracy=None if monitor is None else monitor.last,
    )
    return model, record


def sync_batchnorm(params: Params) -> bool:
    """BatchNorm statistics over the global batch (SimCLR and BYOL assume them) whenever several CUDA devices
    train; torch's SyncBatchNorm runs on GPUs only, so CPU DDP (gloo) keeps per-rank statistics."""
    t = params.train
    several = t.num_nodes > 1 or (isinstance(t.devices, int) and t.devices > 1)
    several = several or (t.devices == "auto" and torch.cuda.device_count() > 1)
    return several and t.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def _tensors(pair: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    pixels, labels = pair
    return torch.from_numpy(np.ascontiguousarray(np.asarray(pixels).transpose(0, 3, 1, 2))), torch.as_tensor(
        labels
    )


def save(folder: Path, model: SelfSupervised, record: Pretrained) -> None:
    """The pretrain output folder, replaced whole: the backbone checkpoint and its record."""
    with atomic_dir(folder) as staging:
        model.save_backbone(staging / BACKBONE)
        record.write(staging)
