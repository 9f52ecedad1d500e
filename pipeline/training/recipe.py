"""The small-data fine-tuning recipe: frozen-backbone warm-up and unfreezing, warm-up + cosine schedule,
class balancing.

With a few hundred images a pretrained backbone is easily wrecked by the large gradients of a random
head. The recipe trains the head alone first (``train.freeze_epochs``; BatchNorm in inference mode so
its ImageNet statistics stay), then unfreezes the backbone at once or stage by stage from the top
(``train.unfreeze``), always at a lower learning rate (``train.backbone_lr_mult``).

Freezing switches ``requires_grad`` rather than rebuilding the optimizer: every parameter sits in the
optimizer from the start (head group at ``lr``, backbone group at ``lr x mult``), frozen ones simply get
no gradient, so AdamW/SGD skip them, the schedule covers both groups and a resumed run restores the
optimizer as saved. (Lightning's ``BackboneFinetuning`` adds param groups when it unfreezes, which a
scheduler built beforehand does not follow.)
"""

from __future__ import annotations

import logging
import math
from typing import cast

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

log = logging.getLogger(__name__)

STAGE_NAMES = ("stem", "layer1", "layer2", "layer3", "layer4")  # input to output; unfrozen in reverse


def backbone_stages(net: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """A torchvision ResNet's backbone as (name, modules) from the input up; the head ``fc`` is not in it."""
    return [("stem", [net.conv1, net.bn1]), *[(name, [getattr(net, name)]) for name in STAGE_NAMES[1:]]]


def head_and_backbone_params(net: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    head = list(cast(nn.Module, net.fc).parameters())  # Module.__getattr__ typing
    ids = {id(p) for p in head}
    return head, [p for p in net.parameters() if id(p) not in ids]


def trainable_stages(epoch: int, freeze_epochs: int, unfreeze: str) -> int:
    """How many backbone stages (counted from the top) train in ``epoch`` (0-based)."""
    if epoch < freeze_epochs:
        return 0
    if unfreeze == "gradual":
        return min(len(STAGE_NAMES), epoch - freeze_epochs + 1)
    return len(STAGE_NAMES)


def set_trainable(modules: list[nn.Module], trainable: bool) -> None:
    """Gradients on or off; BatchNorm layers of frozen modules in inference mode (running statistics kept)."""
    for module in modules:
        module.requires_grad_(trainable)
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                layer.train(trainable)


class FreezeSchedule(Callback):
    """Applies ``trainable_stages`` at the start of every training epoch (so a resumed run lands in the
    same state). Validation restores the train/eval modes set here, so frozen BatchNorm stays frozen."""

    def __init__(self, freeze_epochs: int, unfreeze: str):
        self.freeze_epochs, self.unfreeze = freeze_epochs, unfreeze
        self._shown: int | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stages = backbone_stages(cast(nn.Module, pl_module.net))  # Module.__getattr__ typing
        n = trainable_stages(trainer.current_epoch, self.freeze_epochs, self.unfreeze)
        for i, (_, modules) in enumerate(stages):
            set_trainable(modules, i >= len(stages) - n)
        if n != self._shown and trainer.is_global_zero:
            what = (
                "head only, backbone frozen"
                if n == 0
                else "whole network"
                if n == len(stages)
                else "head + " + ", ".join(name for name, _ in stages[-n:])
            )
            log.info("epoch %d: training %s", trainer.current_epoch + 1, what)
        self._shown = n


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step multiplier: linear from ~0 to 1 over ``warmup_steps``, then cosine to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
