"""``fit(params, data) -> FitResult``: the one training function, called by the train stage and every tune trial."""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import lightning.pytorch as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from pipeline import augment
from pipeline.config import FROZEN_MODES, Params, Train
from pipeline.data.cache import Images
from pipeline.data.datamodule import ImageDataModule, class_weights, load_offline
from pipeline.data.prepared import DataError, Prepared
from pipeline.runinfo import BEST, CHECKPOINT_SUFFIX, PRETRAIN_POOL, WeightsInfo
from pipeline.training import probe
from pipeline.training.callbacks import FitCallbacks, TrainingDiverged, callbacks_for, slim_checkpoint
from pipeline.training.model import Classifier, build_network, input_statistics
from pipeline.training.pretrained import load_pretrained
from pipeline.training.resume import AtomicCheckpointIO

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitResult:
    best_score: float  # params.train.monitor of the shipped weights: the best epoch's, or (checkpoint: last) the last's
    best_checkpoint: Path | None
    epochs_run: int
    weights: WeightsInfo
    last_metrics: dict[str, float]

    def best_model(self) -> Classifier:
        """The best checkpoint, loaded on the CPU (a fit given an ``out_dir`` always saves one)."""
        if self.best_checkpoint is None:
            raise ValueError("this fit saved no checkpoint (fit() without out_dir keeps none)")
        return Classifier.load_from_checkpoint(self.best_checkpoint, map_location="cpu")

    def saved(self) -> Path:
        """The checkpoint this fit saved (fit writes one whenever it gets an ``out_dir``)."""
        if self.best_checkpoint is None:
            raise RuntimeError("fit returned no checkpoint")
        return self.best_checkpoint


@dataclass(frozen=True)
class Fitted:
    """What training produced (the one name for it): each model's fit (one, or one per fold), the checkpoints
    that ship (file name in the model folder -> where the fit saved it) and the out-of-fold predictions
    (``data.folds``: path, label_index, fold, prob_<class>, every train+val image once; None for one model).
    ``RunInfo`` is its record in the model folder; ``serve.shipped.Trained`` what predict loads back from there."""

    results: list[FitResult]
    members: dict[str, Path]
    oof: pd.DataFrame | None = None

    @classmethod
    def one(cls, result: FitResult) -> Fitted:
        return cls([result], {result.saved().name: result.saved()})


def datamodule(
    params: Params,
    prepared: Prepared,
    train_transform: A.BasicTransform | None,
    pool: Images | None = None,
) -> ImageDataModule:
    """The loaders of a fit; ``pool``: the unlabelled images ``train.semi: fixmatch`` learns from (default:
    pool the pretrain stage hands over in ``paths.pretrain``)."""
    t = params.train
    copies = params.augment.offline_copies
    offline = load_offline(Path(params.paths.augment_offline), prepared, copies) if copies else None
    semi = t.semi == "fixmatch" and t.mode not in FROZEN_MODES
    handed = Path(params.paths.pretrain) / PRETRAIN_POOL  # the pool, as the pretrain stage hands it to train
    if semi and pool is None and handed.is_file():
        pool = np.load(handed, mmap_mode="r")
    if semi and (pool is None or len(pool) == 0):
        raise DataError(
            "train.semi: fixmatch needs an unlabelled pool: select one with data.unlabelled (take it in with "
            "python -m pipeline intake SRC --unlabelled) and run dvc repro (the pretrain stage hands it to "
            "train), or set train.semi: none"
        )
    return ImageDataModule(
        prepared,
        train_transform,
        batch_size=t.batch_size,
        num_workers=t.num_workers,
        offline=offline,
        balanced=t.balance == "sampler",
        seed=params.seed,
        pool=pool if semi else None,
        pool_ratio=t.semi_ratio,
        strong=augment.strong_transform(train_transform) if semi else None,
    )


def build_model(
    params: Params,
    class_names: Sequence[str],
    hub_dir: Path | None = None,
    dataset_stats: tuple[Sequence[float], Sequence[float]] | None = None,
    in_channels: int = 3,
    train_labels: np.ndarray | None = None,
    pixel_dtype: str | None = None,
) -> tuple[Classifier, WeightsInfo]:
    """The classifier with its weights loaded, normalizing with the statistics those weights expect.

    Pretrained 3-channel weights keep ImageNet mean/std (what they were trained with); random init or
    other band counts use ``dataset_stats`` (ingest's train-split mean/std) when given.
    ``train_labels`` give the class weights of ``train.balance: loss``; ``pixel_dtype`` (the cache's) maps a
    named domain backbone's value range onto the pixels.
    """
    m, t = params.model, params.train
    weights = (
        None
        if train_labels is None or t.balance != "loss"
        else class_weights(train_labels, len(class_names)).tolist()
    )
    net = build_network(m.arch, len(class_names), m.dropout, in_channels, m.stem)
    info = load_pretrained(
        net,
        m.arch,
        m.weights,
        require_pretrained=m.require_pretrained,
        hub_dir=hub_dir,
        sha256=m.weights_sha256,
        tracking_uri=params.mlflow.tracking_uri,
        pixel_dtype=pixel_dtype,
        pretrain_dir=Path(params.paths.pretrain),
    )
    mean, std = input_statistics(in_channels, info, dataset_stats)
    # A random backbone has nothing to protect: it learns at the head's rate. LP-FT fine-tunes a pretrained
    # one from a fitted head at a lower rate (its checkpoint records the rate it trained at).
    train = t if info.pretrained else dataclasses.replace(t, backbone_lr_mult=1.0)
    if t.mode == "lp_ft" and info.pretrained:
        train = dataclasses.replace(train, lr=t.lr * t.lp_ft_lr_mult)
    model = Classifier(
        m,
        train,
        params.augment,
        num_classes=len(class_names),
        class_names=class_names,
        in_channels=in_channels,
        mean=mean,
        std=std,
        class_weights=weights,
        net=net,
    )
    return model, info


# Lightning's loggers of its per-Trainer INFO lines; the second says "LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES" on GPUs.
_LIGHTNING_CHATTER = ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda")


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence, for one fit, what Lightning says on every Trainer: its INFO lines (GPU/TPU available, the
    litlogger tip, "estimate number of stepping batches", "`Trainer.fit` stopped", the CUDA devices) and
    torch's FutureWarning about ``LeafSpec`` that Lightning 2.6 triggers itself. A tune stage would print
    them once per trial; Lightning's own warnings and errors still show (the train stage says itself when
    it resumes)."""
    from lightning_utilities.core import rank_zero

    # rank_zero_only's logger is shared by lightning and pytorch_lightning: whichever was imported last
    # (MLflow's pytorch flavor imports pytorch_lightning) named it, so it is silenced as it is now too.
    loggers = [logging.getLogger(name) for name in _LIGHTNING_CHATTER] + [rank_zero.log]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
            )
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _tolerate_frozen_parameters(strategy: str, devices: int | str, num_nodes: int = 1) -> str:
    """DDP expects a gradient for every parameter in every step; frozen ones have none. Its
    ``find_unused_parameters`` mode tolerates that (at some cost, so only while a recipe freezes)."""
    if strategy == "ddp_spawn":
        return "ddp_spawn_find_unused_parameters_true"
    several = (
        num_nodes > 1
        or (devices == "auto" and torch.cuda.device_count() > 1)
        or (isinstance(devices, int) and devices > 1)
    )
    if strategy == "ddp" or (strategy == "auto" and several):
        return "ddp_find_unused_parameters_true"
    return strategy


def build_trainer(
    t: Train, made: FitCallbacks, logger: Logger | bool, max_epochs: int, root: str
) -> L.Trainer:
    """The Lightning Trainer of a fine-tuning fit: ``train.*``'s devices and precision, ``made``'s callbacks
    and strategy, no progress bar (``EpochSummary`` prints a line an epoch), deterministic where it can be."""
    strategy = _tolerate_frozen_parameters(t.strategy, t.devices, t.num_nodes) if made.freezes else t.strategy
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        logger=logger,
        callbacks=made.callbacks,
        plugins=[AtomicCheckpointIO()],  # last.ckpt whole or not at all (a full disk, a kill mid-copy)
        enable_checkpointing=made.checkpoint is not None,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic="warn",
        log_every_n_steps=1,
        default_root_dir=root,
    )


def fit(
    params: Params,
    data: ImageDataModule,
    *,
    out_dir: Path | None = None,
    logger: Logger | bool = False,
    callbacks: Sequence[Callback] = (),
    max_epochs: int | None = None,
    hub_dir: Path | None = None,
    resume_from: Path | None = None,
) -> FitResult:
    """Fine-tune on ``data``'s train split, scored on val.

    With ``out_dir``, the best epoch's weights are saved there, and the full state of the latest
    epoch as ``last.ckpt``, which ``resume_from`` continues from (model, optimizer, schedule,
    early-stopping and checkpoint state, epoch count).
    """
    t = params.train
    L.seed_everything(params.seed, workers=True, verbose=False)
    model, weights = build_model(
        params,
        data.prepared.classes,
        hub_dir,
        (data.prepared.mean, data.prepared.std),
        in_channels=data.prepared.images.shape[-1],
        train_labels=data.prepared.split("train")["label_index"].to_numpy(),
        pixel_dtype=str(data.prepared.images.dtype),
    )
    if t.mode in FROZEN_MODES:
        return _fit_frozen(params, data, model, weights, out_dir, logger)
    if t.mode == "lp_ft":
        _linear_probe_first(data, model, weights, params, resume_from)
    made = callbacks_for(t, weights, out_dir, callbacks)
    checkpoint, latest, stopper = made.checkpoint, made.latest, made.stopper
    with tempfile.TemporaryDirectory(prefix="fit-") as scratch, _quiet_lightning():
        trainer = build_trainer(t, made, logger, max_epochs or t.max_epochs, str(out_dir or scratch))
        try:
            trainer.fit(model, datamodule=data, ckpt_path=resume_from)
        except TrainingDiverged:
            # Epochs before the divergence may have been saved (checkpoint: last saves every epoch; best
            # saves a finite first epoch): nothing of a diverged run is kept, nor resumed from.
            for callback in (checkpoint, latest):
                if callback is not None and callback.best_model_path:
                    Path(callback.best_model_path).unlink(missing_ok=True)
            raise
    # The shipped weights' score: the best epoch's, or (checkpoint: last) the final epoch's.
    best = float(trainer.callback_metrics[t.monitor]) if stopper is None else stopper.best_score.item()
    best_path = Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None
    if made.ema and best_path is not None and trainer.is_global_zero:
        slim_checkpoint(best_path)
    return FitResult(
        best_score=best,
        best_checkpoint=best_path,
        epochs_run=trainer.current_epoch,
        weights=weights,
        last_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
    )


def _linear_probe_first(
    data: ImageDataModule, model: Classifier, weights: WeightsInfo, params: Params, resume_from: Path | None
) -> None:
    """LP-FT's first phase: the head fitted on the frozen features (``probe.fit_head``); fine-tuning, at the
    lowered rate ``build_model`` set, starts from it. Skipped when resuming (the checkpoint holds the state)
    and, with a warning, for a random backbone (there are no features worth keeping: plain fine-tuning)."""
    if resume_from is not None:
        return
    if not weights.pretrained:
        log.warning("train.mode=lp_ft on a randomly initialised backbone: fine-tuning as train.mode=finetune")
        return
    probe.fit_head(data, model, params.seed, params.train.accelerator)


def _fit_frozen(
    params: Params,
    data: ImageDataModule,
    model: Classifier,
    weights: WeightsInfo,
    out_dir: Path | None,
    logger: Logger | bool,
) -> FitResult:
    """``train.mode`` linear_probe or knn: no epochs, the head fitted on frozen features (``pipeline.training.probe``)."""
    checkpoint = None if out_dir is None else Path(out_dir) / f"{BEST}{CHECKPOINT_SUFFIX}"
    metrics = probe.fit_frozen(params, data, model, weights, checkpoint=checkpoint, logger=logger)
    return FitResult(
        best_score=metrics[params.train.monitor],
        best_checkpoint=checkpoint,
        epochs_run=0,
        weights=weights,
        last_metrics=metrics,
    )
