"""The pretrain stage's work: self-supervised training of the backbone (``pipeline.selfsup``), resumable, with a
kNN monitor, and its output folder.

It trains on images without their labels: the unlabelled pool and the train split, never val or test. Val
(with its labels) only scores the frozen features every ``pretrain.knn_every`` epochs against the train
split as the neighbour bank, so a user sees whether it learns. A killed run resumes from the ``last.ckpt``
of its resume folder (``pipeline.resume``: the same inputs, else it starts over). Under DDP, BatchNorm is
synchronized on GPUs and SimCLR's negatives are gathered across ranks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import lightning.pytorch as L
import mlflow
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger, MLFlowLogger
from torch.utils.data import DataLoader

from pipeline import augment, tracking
from pipeline.config import Params, as_dict
from pipeline.data.cache import Images
from pipeline.data.datamodule import UnlabelledDataset
from pipeline.data.pooled import load_pool, pool_selected, unlabelled_rows
from pipeline.data.prepared import CACHE_NPY, Prepared, load_prepared
from pipeline.fsutil import atomic_dir, link_or_copy
from pipeline.runinfo import LAST, PRETRAIN_BACKBONE, PRETRAIN_POOL, PRETRAIN_RECORD, Pretrained
from pipeline.training.model import build_network, input_statistics
from pipeline.training.pretrained import load_pretrained
from pipeline.training.resume import Resume
from pipeline.training.selfsup import HEAD, SelfSupervised, knn_accuracy, view_transform


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
    start: dict[str, torch.Tensor] | None = None,
) -> tuple[SelfSupervised, Pretrained]:
    """Train a backbone on ``images`` (pool + train split, pixels N x H x W x C) without labels.

    ``bank``/``val``: the train split's and val's (pixels, label indices) for the kNN monitor only. The
    views start from the domain's ``train_transform`` (``augment``'s pipeline: its flips, or none).
    Resumes from ``resume``'s ``last.ckpt`` when there is one. ``start``: backbone tensors to start from
    (``pretrain.weights``), else a random init.
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
    if start is not None:  # continued pretraining (pretrain.weights): the backbone's tensors, no head
        missing, unexpected = model.backbone.load_state_dict(start, strict=False)
        if missing or unexpected:
            raise ValueError(f"pretrain.weights do not fit the backbone: {missing[:4]}, {unexpected[:4]}")
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
        starts_from=settings.weights,
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


DEVICE_KEYS = ("accelerator", "devices", "num_nodes", "strategy", "precision")  # how, not what: a resume is
# refused when they change, as the train stage's is


def save(folder: Path, model: SelfSupervised | None, record: Pretrained, pool: Path | None = None) -> None:
    """The pretrain output folder, replaced whole: the backbone checkpoint (none when pretraining is off), its
    record, and the pool's images (``pool``: the pool stage's file) when train learns from them (``train.semi``).

    The pool reaches train through this folder, not the pool stage's: train's DVC dependencies then change with
    the pool only when it uses the pool, so taking in a pool for pretraining or ``suggest`` alone retrains
    nothing. A hard link (a copy across file systems): no second copy of a large pool."""
    with atomic_dir(folder) as staging:
        if model is not None:
            model.save_backbone(staging / PRETRAIN_BACKBONE)
        if pool is not None:
            link_or_copy(pool, staging / PRETRAIN_POOL)
        record.write(staging)


def starting_point(
    params: Params, prepared: Prepared
) -> tuple[dict[str, torch.Tensor] | None, list[float], list[float]]:
    """What pretraining starts from (``pretrain.weights``: the backbone's tensors, None for a random init) and
    the input statistics it normalizes with, decided as for training (``model.input_statistics``)."""
    bands = prepared.images.shape[-1]
    stats = (prepared.mean, prepared.std)
    if params.pretrain.weights == "none":
        mean, std = input_statistics(bands, None, stats)
        return None, mean, std
    m = params.model
    net = build_network(m.arch, 1, 0.0, bands, m.stem)
    info = load_pretrained(
        net,
        m.arch,
        params.pretrain.weights,
        require_pretrained=m.require_pretrained,
        tracking_uri=params.mlflow.tracking_uri,
        pixel_dtype=str(prepared.images.dtype),
    )
    mean, std = input_statistics(bands, info, stats)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(HEAD + ".")}
    return (state if info.pretrained else None), mean, std


def run(params: Params, tags: dict[str, str] | None) -> Pretrained:
    """The pretrain stage: pretraining on the train split and the pool (``pretrain.method``), in its MLflow run
    (``tags``; None on a DDP worker, which trains its shard and writes nothing), resumable; ``paths.pretrain``
    replaced when it ends. With ``pretrain.method: none`` the folder holds only that record."""
    paths, settings = params.paths, params.pretrain
    out = Path(paths.pretrain)
    pool = load_pool(Path(paths.pool)) if pool_selected(Path(paths.pool)) else None
    handed = pool if params.train.semi != "none" else None  # what train learns from beside the labels
    handed_file = Path(paths.pool) / CACHE_NPY if handed is not None else None
    if settings.method == "none":
        record = Pretrained(method="none", pool_digest=handed.digest if handed is not None else "")
        if tags is not None:
            save(out, None, record, handed_file)
        return record
    prepared = load_prepared(Path(paths.prepared))
    images = unlabelled_rows(prepared, pool)  # the train split, then the pool: never val or test
    train, val = prepared.split("train"), prepared.split("val")
    bank = (prepared.images[train["cache_index"].to_numpy()], train["label_index"].to_numpy())
    held = (prepared.images[val["cache_index"].to_numpy()], val["label_index"].to_numpy())
    start, mean, std = starting_point(params, prepared)
    pipeline = Path(paths.augment_pipeline)
    resume = Resume.beside(
        out,
        json.dumps(
            {"pretrain": as_dict(params)["pretrain"], "model": as_dict(params)["model"]}, sort_keys=True
        ),
        json.dumps({k: v for k, v in as_dict(params)["train"].items() if k in DEVICE_KEYS}, sort_keys=True),
        prepared.digest,
        pool.digest if pool is not None else "",
        pipeline.read_bytes(),
    )
    transform = augment.load(pipeline, params.seed)
    if tags is None:
        _, record = pretrain(params, images, bank, held, transform, mean, std, resume, start=start)
        return record
    run_id = resume.run_id()
    name = tracking.run_name("pretrain", params.model.arch, tags)
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else name,
        tags=None if run_id else tags | {"stage": "pretrain"},
    ) as active:
        if run_id is None:
            resume.start(active.info.run_id)
            mlflow.log_params({f"pretrain.{k}": v for k, v in as_dict(params)["pretrain"].items()})
            mlflow.set_tags(
                {"pool": pool.name if pool is not None else "none", "pool.images": str(len(images))}
            )
        elif resume.last_checkpoint() is not None:
            print(f"pretrain: resuming MLflow run {run_id} from {resume.last_checkpoint()}", flush=True)
        logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=active.info.run_id)
        model, record = pretrain(params, images, bank, held, transform, mean, std, resume, logger, start)
        record = dataclasses.replace(record, pool_digest=handed.digest if handed is not None else "")
        save(out, model, record, handed_file)
        mlflow.log_dict(dataclasses.asdict(record), PRETRAIN_RECORD)
    resume.clear()
    return record
