"""``fit(params, data) -> FitResult``: the one training function, called by the train stage and every tune trial."""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, WeightAveraging
from lightning.pytorch.loggers import Logger

from pipeline import probe, recipe, vocabulary
from pipeline.config import Params
from pipeline.data.datamodule import ImageDataModule, load_offline
from pipeline.data.prepared import Prepared
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_file
from pipeline.model import Classifier
from pipeline.resume import (
    LAST_NAME,
    AtomicCheckpointIO,
)  # <out_dir>/last.ckpt: full state of the latest epoch
from pipeline.weights import WeightsInfo, load_pretrained

log = logging.getLogger(__name__)
_NOTED: set[str] = set()  # warnings already given in this process (a tune stage calls fit once per trial)

CHECKPOINT_NAME = "best"  # written as <out_dir>/best.ckpt
PROGRESS_EVERY_S = 30.0  # a progress line this often within a long training epoch


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


class EpochSummary(Callback):
    """One plain line per epoch with that epoch's training and validation metrics, readable in `dvc repro` logs
    (where progress bars are noise); within an epoch longer than ``every_s`` seconds, a progress line that often.

    Printed at the end of the training epoch, which Lightning reaches after that epoch's validation: at
    validation end the epoch's training metrics are not aggregated yet (the line showed the previous epoch's).
    """

    def __init__(self, every_s: float = PROGRESS_EVERY_S) -> None:
        self.every_s = every_s
        self._last = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if not trainer.is_global_zero or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        total = trainer.num_training_batches
        print(
            f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  batch {batch_idx + 1}/{total}"
            + (f"  train/loss (batch)={float(loss):.4f}" if loss is not None else ""),
            flush=True,
        )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        ordered = sorted(metrics, key=lambda k: (not k.startswith("train/"), k))  # train/* first, then val/*
        shown = "  ".join(f"{k}={float(metrics[k]):.4f}" for k in ordered)
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}  {shown}", flush=True)


class TrainingDiverged(PipelineError, FloatingPointError):
    """The loss became NaN or infinite; nothing from this run should be kept."""


class StopOnNonFiniteLoss(Callback):
    """Stop at the first NaN/inf loss (a training batch or a validation epoch) with a message.

    EarlyStopping alone would end the run quietly and keep going as if it had finished; the
    checkpoint callback runs after this one, so a diverged epoch is never saved.
    """

    @staticmethod
    def _check(loss: torch.Tensor | None, what: str, pl_module: L.LightningModule) -> None:
        if loss is not None and not torch.isfinite(loss).all():
            raise TrainingDiverged(
                f"{what} became {loss.item()}; lower train.lr (now {pl_module.hparams['lr']:g}) "
                "or check the input data for NaN/inf values"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._check(
            loss, f"the training loss at epoch {trainer.current_epoch + 1}, batch {batch_idx + 1}", pl_module
        )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(
                trainer.callback_metrics.get("val/loss"),
                f"val/loss at epoch {trainer.current_epoch + 1}",
                pl_module,
            )


class WarmedEMA:
    """The EMA update ``avg + (1 - d) (current - avg)`` with d = min(decay, (1 + n) / (10 + n)) after n updates.

    torch's ``get_ema_avg_fn`` keeps d fixed: with a few hundred images (~20 steps an epoch) a decay of
    0.99-0.999 would average in the random initial weights for most of the run; the warm-up (as in timm's
    ModelEmaV3 and TensorFlow's ExponentialMovingAverage with num_updates) lets the average follow early on.
    A class, not a closure, so the callback pickles (ddp_spawn).
    """

    def __init__(self, decay: float):
        self.decay = decay

    def __call__(
        self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor
    ) -> torch.Tensor:
        d = torch.clamp((1 + num_averaged) / (10 + num_averaged), max=self.decay)
        return averaged + (current - averaged) * (1 - d)


def weight_averaging(decay: float) -> WeightAveraging:
    """Lightning's weight averaging with :class:`WarmedEMA`, every optimizer step, buffers included.

    ``use_buffers=True``: BatchNorm running statistics are averaged like the weights, so the averaged
    network's statistics belong to its own (averaged) weights without an extra ``update_bn`` pass.
    Lightning swaps the averaged weights in for every validation epoch (so val/* and the checkpoint choice
    score them), stores them as the checkpoint's ``state_dict`` (the training weights and the average's state
    go beside it, so a resumed run continues both) and leaves them in the model when training ends.
    """
    return WeightAveraging(use_buffers=True, avg_fn=WarmedEMA(decay))


WEIGHTS_ONLY_KEYS = (
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "loops",
    "hparams_name",
    "hyper_parameters",
)  # what Lightning writes with save_weights_only


def slim_checkpoint(path: Path) -> None:
    """Reduce a full checkpoint to what a weights-only one holds (the weights and hyperparameters), atomically.

    With EMA on, the best checkpoint is saved in full: Lightning calls the callbacks' checkpoint hooks
    only for full saves, and that hook is what puts the averaged weights into ``state_dict``.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    with atomic_file(path) as tmp:
        torch.save({k: v for k, v in checkpoint.items() if k in WEIGHTS_ONLY_KEYS}, tmp)


def datamodule(
    params: Params, prepared: Prepared, train_transform: A.BasicTransform | None
) -> ImageDataModule:
    copies = params.augment.offline_copies
    offline = load_offline(Path(params.paths.augment_offline), prepared, copies) if copies else None
    return ImageDataModule(
        prepared,
        train_transform,
        batch_size=params.train.batch_size,
        num_workers=params.train.num_workers,
        offline=offline,
        balanced=params.train.balance == "sampler",
        seed=params.seed,
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
    m, t, a = params.model, params.train, params.augment
    weights = (
        None
        if train_labels is None or t.balance != "loss"
        else recipe.class_weights(train_labels, len(class_names)).tolist()
    )
    model = Classifier(
        arch=m.arch,
        num_classes=len(class_names),
        class_names=list(class_names),
        dropout=m.dropout,
        stem=m.stem,
        lr=t.lr,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        monitor=t.monitor,
        in_channels=in_channels,
        backbone_lr_mult=t.backbone_lr_mult,
        warmup_epochs=t.warmup_epochs,
        label_smoothing=t.label_smoothing,
        class_weights=weights,
        channels_last=t.channels_last,
        mixup_alpha=a.mixup_alpha,
        cutmix_alpha=a.cutmix_alpha,
        mix_prob=a.mix_prob,
        cutmix_switch_prob=a.cutmix_switch_prob,
    )
    info = load_pretrained(
        model.net,
        m.arch,
        m.weights,
        require_pretrained=m.require_pretrained,
        hub_dir=hub_dir,
        sha256=m.weights_sha256,
        tracking_uri=params.mlflow.tracking_uri,
        pixel_dtype=pixel_dtype,
    )
    if not info.pretrained and t.backbone_lr_mult != 1.0:
        model.hparams["backbone_lr_mult"] = 1.0  # a random backbone has nothing to protect
    if (
        info.mean is not None and info.std is not None
    ):  # weights that carry their statistics (an earlier run, a domain backbone)
        use_statistics(model, info.mean, info.std)
    elif dataset_stats is not None and not (info.pretrained and len(dataset_stats[0]) == 3):
        use_statistics(model, *dataset_stats)
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


def use_statistics(model: Classifier, mean: Sequence[float], std: Sequence[float]) -> None:
    """Normalize with ``mean``/``std``, recorded in the hyperparameters so checkpoints rebuild the model with them."""
    mean, std = list(map(float, mean)), list(map(float, std))
    model.mean, model.std = (torch.tensor(v).view(1, -1, 1, 1) for v in (mean, std))
    model.hparams.update(mean=mean, std=std)


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
    if t.mode != "finetune":
        return _fit_frozen(params, data, model, weights, out_dir, logger)
    mode = vocabulary.better(t.monitor)
    last = t.checkpoint == "last"  # the whole schedule runs and its end ships: no early stopping
    stopper = None if last else EarlyStopping(monitor=t.monitor, mode=mode, patience=t.patience)
    all_callbacks = [
        *([] if stopper is None else [stopper]),
        StopOnNonFiniteLoss(),
        EpochSummary(),
        *callbacks,
    ]
    strategy: str = t.strategy
    freezing = t.freeze_epochs > 0 or t.unfreeze == "gradual"
    if freezing and not weights.pretrained and "freeze" not in _NOTED:  # once per stage, not once per trial
        _NOTED.add("freeze")
        log.warning(
            "train.freeze_epochs=%d / train.unfreeze=%s ignored: the backbone is randomly initialised, "
            "so it trains from the first epoch",
            t.freeze_epochs,
            t.unfreeze,
        )
    if freezing and weights.pretrained:
        all_callbacks.append(recipe.FreezeSchedule(t.freeze_epochs, t.unfreeze))
        strategy = _tolerate_frozen_parameters(t.strategy, t.devices, t.num_nodes)
    ema = bool(t.ema_decay)
    if t.ema_decay:
        all_callbacks.append(weight_averaging(t.ema_decay))
    checkpoint = latest = None
    if out_dir is not None:
        # Weights only: what evaluate needs, a third of the size. With EMA the averaged weights reach the file
        # only through a full save (see slim_checkpoint), which is slimmed when training ends.
        # checkpoint: last: monitor None, so every epoch overwrites it and the last one ships. Its mode is
        # unused then; "max" only keeps its saved state apart from last.ckpt's callback (monitor None, "min"):
        # Lightning keys a callback's state by monitor and mode and refuses two with one key.
        checkpoint = ModelCheckpoint(
            dirpath=out_dir,
            filename=CHECKPOINT_NAME,
            monitor=None if last else t.monitor,
            mode="max" if last else mode,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
            save_weights_only=not ema,
        )
        # Every epoch overwrites last.ckpt: what a killed run resumes from.
        latest = ModelCheckpoint(
            dirpath=out_dir, filename=LAST_NAME, monitor=None, save_top_k=1, enable_version_counter=False
        )
        all_callbacks += [checkpoint, latest]
    with tempfile.TemporaryDirectory(prefix="fit-") as scratch, _quiet_lightning():
        trainer = L.Trainer(
            max_epochs=max_epochs or t.max_epochs,
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=strategy,
            precision=t.precision,
            logger=logger,
            callbacks=all_callbacks,
            plugins=[AtomicCheckpointIO()],
            enable_checkpointing=checkpoint is not None,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic="warn",
            log_every_n_steps=1,
            default_root_dir=str(out_dir or scratch),
        )
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
    if ema and best_path is not None and trainer.is_global_zero:
        slim_checkpoint(best_path)
    return FitResult(
        best_score=best,
        best_checkpoint=best_path,
        epochs_run=trainer.current_epoch,
        weights=weights,
        last_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
    )


def _fit_frozen(
    params: Params,
    data: ImageDataModule,
    model: Classifier,
    weights: WeightsInfo,
    out_dir: Path | None,
    logger: Logger | bool,
) -> FitResult:
    """``train.mode`` linear_probe or knn: no epochs, the head fitted on frozen features (``pipeline.probe``)."""
    checkpoint = None if out_dir is None else Path(out_dir) / f"{CHECKPOINT_NAME}.ckpt"
    metrics = probe.fit_frozen(params, data, model, weights, checkpoint=checkpoint, logger=logger)
    return FitResult(
        best_score=metrics[params.train.monitor],
        best_checkpoint=checkpoint,
        epochs_run=0,
        weights=weights,
        last_metrics=metrics,
    )
