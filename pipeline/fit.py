"""``fit(params, data) -> FitResult``: the one training function, called by the train stage and every tune trial."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from pipeline import probe, recipe
from pipeline.config import Params, mode_of
from pipeline.data.datamodule import ImageDataModule, load_offline
from pipeline.data.ingest import Prepared
from pipeline.errors import PipelineError
from pipeline.model import Classifier
from pipeline.resume import LAST_NAME  # <out_dir>/last.ckpt: full state of the latest epoch
from pipeline.weights import WeightsInfo, load_pretrained

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "best"  # written as <out_dir>/best.ckpt
RUN_INFO = "run.json"  # the train stage's, beside the best checkpoint in paths.model_dir; evaluate, predict read it


@dataclass(frozen=True)
class FitResult:
    best_score: float  # best value of params.train.monitor over the epochs run
    best_checkpoint: Path | None
    epochs_run: int
    weights: WeightsInfo
    last_metrics: dict[str, float]


class EpochSummary(Callback):
    """One plain line per epoch: readable in `dvc repro` logs, where progress bars are noise."""

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = "  ".join(f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items()))
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
            raise TrainingDiverged(f"{what} became {loss.item()}; lower train.lr (now {pl_module.hparams.lr:g}) "
                                   "or check the input data for NaN/inf values")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._check(loss, f"the training loss at epoch {trainer.current_epoch + 1}, batch {batch_idx + 1}", pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._check(trainer.callback_metrics.get("val/loss"), f"val/loss at epoch {trainer.current_epoch + 1}",
                        pl_module)


def datamodule(params: Params, prepared: Prepared, train_transform: A.BasicTransform | None) -> ImageDataModule:
    copies = params.augment.offline_copies
    offline = load_offline(Path(params.paths.augment_offline), prepared, copies) if copies else None
    return ImageDataModule(prepared, train_transform, batch_size=params.train.batch_size,
                           num_workers=params.train.num_workers, offline=offline,
                           balanced=params.train.balance == "sampler", seed=params.seed)


def build_model(params: Params, class_names: Sequence[str], hub_dir: Path | None = None,
                dataset_stats: tuple[Sequence[float], Sequence[float]] | None = None,
                in_channels: int = 3, train_labels: np.ndarray | None = None) -> tuple[Classifier, WeightsInfo]:
    """The classifier with its weights loaded, normalizing with the statistics those weights expect.

    Pretrained 3-channel weights keep ImageNet mean/std (what they were trained with); random init or
    other band counts use ``dataset_stats`` (ingest's train-split mean/std) when given.
    ``train_labels`` give the class weights of ``train.balance: loss``.
    """
    m, t = params.model, params.train
    weights = None if train_labels is None or t.balance != "loss" else \
        recipe.class_weights(train_labels, len(class_names)).tolist()
    model = Classifier(arch=m.arch, num_classes=len(class_names), class_names=list(class_names),
                       dropout=m.dropout, lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer,
                       monitor=t.monitor, in_channels=in_channels, backbone_lr_mult=t.backbone_lr_mult,
                       warmup_epochs=t.warmup_epochs, label_smoothing=t.label_smoothing, class_weights=weights,
                       channels_last=t.channels_last)
    info = load_pretrained(model.net, m.arch, m.weights, require_pretrained=m.require_pretrained, hub_dir=hub_dir,
                           sha256=m.weights_sha256, tracking_uri=params.mlflow.tracking_uri)
    if not info.pretrained and t.backbone_lr_mult != 1.0:
        model.hparams.backbone_lr_mult = 1.0  # a random backbone has nothing to protect
    if info.mean is not None:  # weights that carry the statistics they were trained with (an earlier run)
        use_statistics(model, info.mean, info.std)
    elif dataset_stats is not None and not (info.pretrained and len(dataset_stats[0]) == 3):
        use_statistics(model, *dataset_stats)
    return model, info


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
    several = num_nodes > 1 or devices == "auto" and torch.cuda.device_count() > 1 \
        or isinstance(devices, int) and devices > 1
    if strategy == "ddp" or strategy == "auto" and several:
        return "ddp_find_unused_parameters_true"
    return strategy


def fit(params: Params, data: ImageDataModule, *, out_dir: Path | None = None, logger: Logger | bool = False,
        callbacks: Sequence[Callback] = (), max_epochs: int | None = None,
        hub_dir: Path | None = None, resume_from: Path | None = None) -> FitResult:
    """Fine-tune on ``data``'s train split, scored on val.

    With ``out_dir``, the best epoch's weights are saved there, and the full state of the latest
    epoch as ``last.ckpt``, which ``resume_from`` continues from (model, optimizer, schedule,
    early-stopping and checkpoint state, epoch count).
    """
    t = params.train
    L.seed_everything(params.seed, workers=True, verbose=False)
    model, weights = build_model(params, data.prepared.classes, hub_dir, (data.prepared.mean, data.prepared.std),
                                 in_channels=data.prepared.images.shape[-1],
                                 train_labels=data.prepared.split("train")["label_index"].to_numpy())
    if t.mode != "finetune":
        return _fit_frozen(params, data, model, weights, out_dir, logger)
    mode = mode_of(t.monitor)
    stopper = EarlyStopping(monitor=t.monitor, mode=mode, patience=t.patience)
    all_callbacks = [stopper, StopOnNonFiniteLoss(), EpochSummary(), *callbacks]
    strategy = t.strategy
    freezing = t.freeze_epochs > 0 or t.unfreeze == "gradual"
    if freezing and not weights.pretrained:
        log.warning("train.freeze_epochs=%d / train.unfreeze=%s ignored: the backbone is randomly initialised, "
                    "so it trains from the first epoch", t.freeze_epochs, t.unfreeze)
    elif freezing:
        all_callbacks.append(recipe.FreezeSchedule(t.freeze_epochs, t.unfreeze))
        strategy = _tolerate_frozen_parameters(t.strategy, t.devices, t.num_nodes)
    checkpoint = None
    if out_dir is not None:
        checkpoint = ModelCheckpoint(dirpath=out_dir, filename=CHECKPOINT_NAME, monitor=t.monitor, mode=mode,
                                     save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
                                     save_weights_only=True)  # what evaluate needs; a third of the size
        # Every epoch overwrites last.ckpt: what a killed run resumes from.
        latest = ModelCheckpoint(dirpath=out_dir, filename=LAST_NAME, monitor=None, save_top_k=1,
                                 enable_version_counter=False)
        all_callbacks += [checkpoint, latest]
    with tempfile.TemporaryDirectory(prefix="fit-") as scratch:
        trainer = L.Trainer(
            max_epochs=max_epochs or t.max_epochs, accelerator=t.accelerator, devices=t.devices,
            num_nodes=t.num_nodes, strategy=strategy, precision=t.precision, logger=logger, callbacks=all_callbacks,
            enable_checkpointing=checkpoint is not None, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, deterministic="warn",
            log_every_n_steps=1, default_root_dir=str(out_dir or scratch),
        )
        trainer.fit(model, datamodule=data, ckpt_path=resume_from)
    best = stopper.best_score.item()
    return FitResult(
        best_score=best,
        best_checkpoint=Path(checkpoint.best_model_path) if checkpoint and checkpoint.best_model_path else None,
        epochs_run=trainer.current_epoch,
        weights=weights,
        last_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
    )


def _fit_frozen(params: Params, data: ImageDataModule, model: Classifier, weights: WeightsInfo,
                out_dir: Path | None, logger: Logger | bool) -> FitResult:
    """``train.mode`` linear_probe or knn: no epochs, the head fitted on frozen features (``pipeline.probe``)."""
    checkpoint = None if out_dir is None else Path(out_dir) / f"{CHECKPOINT_NAME}.ckpt"
    metrics = probe.fit_frozen(params, data, model, weights, checkpoint=checkpoint, logger=logger)
    return FitResult(best_score=metrics[params.train.monitor], best_checkpoint=checkpoint, epochs_run=0,
                     weights=weights, last_metrics=metrics)
