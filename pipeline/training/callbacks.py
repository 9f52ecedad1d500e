"""What a fine-tuning fit does besides the training step, as Lightning callbacks: a line per epoch, stopping on
a non-finite loss, early stopping, the EMA of the weights, the freeze schedule, and the checkpoints (the
weights that ship, the full state a killed run resumes from). :func:`callbacks_for` chooses them from
``train.*``; :func:`pipeline.training.fit.fit` hands them to the Trainer."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, WeightAveraging

from pipeline import vocabulary
from pipeline.config import Train
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_file
from pipeline.runinfo import BEST, LAST, WeightsInfo
from pipeline.training import recipe

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # a progress line this often within a long training epoch
_NOTED: set[str] = set()  # warnings given once per process (a tune stage fits once per trial)


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
    # Through an open file, not the staging path: torch.save names the archive's folder after a path it is
    # given (".best.ckpt.staging-<pid>-<random>/data.pkl"), so the same weights would differ in their bytes,
    # and models/ in its DVC hash, from one run to the next. A file object gets the fixed name "archive".
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save({k: v for k, v in checkpoint.items() if k in WEIGHTS_ONLY_KEYS}, f)


@dataclass
class FitCallbacks:
    """A fine-tuning fit's callbacks, and the ones the fit reads back when training ends."""

    callbacks: list[Callback] = field(default_factory=list)
    stopper: EarlyStopping | None = None  # None with train.checkpoint last: the whole schedule runs
    checkpoint: ModelCheckpoint | None = None  # <out_dir>/best.ckpt: the weights that ship
    latest: ModelCheckpoint | None = None  # <out_dir>/last.ckpt: what a killed run resumes from
    ema: bool = False  # the shipped weights are an EMA (its checkpoint is saved whole, slimmed at the end)
    freezes: bool = False  # a freeze schedule runs: some parameters get no gradient in some steps


def callbacks_for(
    t: Train, weights: WeightsInfo, out_dir: Path | None, extra: Sequence[Callback] = ()
) -> FitCallbacks:
    """The callbacks ``train.*`` asks for (``extra`` among them); checkpoints only with an ``out_dir``."""
    mode = vocabulary.better(t.monitor)
    last = t.checkpoint == "last"  # the whole schedule runs and its end ships: no early stopping
    stopper = None if last else EarlyStopping(monitor=t.monitor, mode=mode, patience=t.patience)
    made = FitCallbacks(
        [*([] if stopper is None else [stopper]), StopOnNonFiniteLoss(), EpochSummary(), *extra], stopper
    )
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
        made.callbacks.append(recipe.FreezeSchedule(t.freeze_epochs, t.unfreeze))
        made.freezes = True
    made.ema = bool(t.ema_decay)
    if t.ema_decay:
        made.callbacks.append(weight_averaging(t.ema_decay))
    if out_dir is not None:
        # Weights only: what evaluate needs, a third of the size. With EMA the averaged weights reach the file
        # only through a full save (see slim_checkpoint), which is slimmed when training ends.
        # checkpoint: last: monitor None, so every epoch overwrites it and the last one ships. Its mode is
        # unused then; "max" only keeps its saved state apart from last.ckpt's callback (monitor None, "min"):
        # Lightning keys a callback's state by monitor and mode and refuses two with one key.
        made.checkpoint = ModelCheckpoint(
            dirpath=out_dir,
            filename=BEST,
            monitor=None if last else t.monitor,
            mode="max" if last else mode,
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
            save_weights_only=not made.ema,
        )
        # Every epoch overwrites last.ckpt: what a killed run resumes from.
        made.latest = ModelCheckpoint(
            dirpath=out_dir, filename=LAST, monitor=None, save_top_k=1, enable_version_counter=False
        )
        made.callbacks += [made.checkpoint, made.latest]
    return made
