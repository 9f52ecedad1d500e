"""Self-supervised pretraining of the backbone on images without labels (SimCLR or BYOL, with lightly).

The losses, heads and momentum update are lightly's (MIT); this module puts them in a LightningModule that
sees the same raw pixel batches as :class:`pipeline.model.Classifier` (normalization inside), so what it
learns loads into the classifier tensor for tensor. The two views of an image are drawn with albumentations
from the domain's own training transforms plus a crop and photometric changes (:func:`view_transform`): a
radiograph is never flipped for a view because it is never flipped for training.

Its output is a checkpoint in the classifier's layout (``net.*`` tensors, ``mean``/``std`` buffers, the arch
and band count in ``hyper_parameters``): ``model.weights`` reads it as it reads an earlier run's checkpoint
(``pipeline.transfer``), so the band count and normalization carry over and the head is new.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import albumentations as A
import lightning.pytorch as L
import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules.heads import (
    BYOLPredictionHead,
    BYOLProjectionHead,
    SimCLRProjectionHead,
)
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn
from torch.nn import functional as F

from pipeline.fsutil import atomic_file
from pipeline.training import recipe
from pipeline.training.model import build_network, to_unit_range

Method = Literal["simclr", "byol"]
HEAD = "fc"  # the classifier's head in torchvision's ResNet: replaced by an identity while pretraining


def view_transform(train: A.BasicTransform | None, size: int, strength: float = 1.0) -> A.Compose:
    """One random view of an image: the domain's training transforms (its flips and rotations, or none), then
    a random resized crop and photometric changes that every band count accepts (no hue: N-band safe).

    SimCLR's views lean on crops and colour; colour jitter is left out because albumentations' accepts only
    1 or 3 bands, and per-band gain (MultiplicativeNoise) stands in for it."""
    steps: list[A.BasicTransform] = [] if train is None else [train]
    steps += [
        A.RandomResizedCrop(size=(size, size), scale=(0.35, 1.0), p=1.0),
        A.RandomBrightnessContrast(brightness_limit=0.4 * strength, contrast_limit=0.4 * strength, p=0.8),
        A.MultiplicativeNoise(multiplier=(1 - 0.2 * strength, 1 + 0.2 * strength), per_channel=True, p=0.5),
        A.GaussianBlur(blur_limit=(3, 5), p=0.3),
    ]
    return A.Compose(steps)


class SelfSupervised(L.LightningModule):
    """A torchvision ResNet trained without labels: SimCLR (contrastive; negatives gathered across DDP ranks)
    or BYOL (a momentum target network, no negatives: steadier at the small batches a CPU affords)."""

    backbone: nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        arch: str,
        method: Method,
        mean: Sequence[float],
        std: Sequence[float],
        in_channels: int = 3,
        stem: str = "imagenet",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: float = 1.0,
        temperature: float = 0.2,
        momentum: float = 0.99,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.backbone = build_network(arch, 1, 0.0, in_channels, stem)
        width = self.backbone.get_submodule(HEAD).in_features
        setattr(self.backbone, HEAD, nn.Identity())
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        if method == "simclr":
            self.projection: nn.Module = SimCLRProjectionHead(width, 512, 128)
            self.criterion: nn.Module = NTXentLoss(temperature=temperature, gather_distributed=True)
        else:
            self.projection = BYOLProjectionHead(width, 1024, 256)
            self.prediction = BYOLPredictionHead(256, 1024, 256)
            self.target_backbone = copy.deepcopy(self.backbone)
            self.target_projection = copy.deepcopy(self.projection)
            deactivate_requires_grad(self.target_backbone)
            deactivate_requires_grad(self.target_projection)
            self.criterion = NegativeCosineSimilarity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (N, width) of raw pixel batches, normalized as the classifier normalizes them."""
        return self.backbone(self._normalized(x))

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1], then the mean/std the backbone carries into the classifier."""
        return (to_unit_range(x) - self.mean) / self.std

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        first, second = batch
        if self.hparams["method"] == "simclr":
            loss = self.criterion(self.projection(self(first)), self.projection(self(second)))
        else:
            update_momentum(self.backbone, self.target_backbone, self.hparams["momentum"])
            update_momentum(self.projection, self.target_projection, self.hparams["momentum"])
            online = [self.prediction(self.projection(self(v))) for v in (first, second)]
            with torch.no_grad():
                target = [
                    self.target_projection(self.target_backbone(self._normalized(v))) for v in (first, second)
                ]
            loss = 0.5 * (self.criterion(online[0], target[1]) + self.criterion(online[1], target[0]))
        self.log("pretrain/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def configure_optimizers(self):
        """AdamW with the classifier's schedule: linear warm-up, then cosine decay to 0, per step."""
        trainable = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(self.hparams["warmup_epochs"] * total / max(1, self.trainer.max_epochs or 1))
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": recipe.warmup_cosine(opt, warmup, total), "interval": "step"},
        }

    def classifier_checkpoint(self) -> dict:
        """The backbone as a classifier checkpoint (``net.*`` tensors without a head, the normalization
        buffers, arch and band count): what ``model.weights`` reads from an earlier run's ``.ckpt``."""
        state = {f"net.{k}": v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
        state |= {"mean": self.mean.detach().cpu().clone(), "std": self.std.detach().cpu().clone()}
        hp = self.hparams
        return {
            "state_dict": state,
            "hyper_parameters": {
                "arch": hp["arch"],
                "stem": hp["stem"],
                "in_channels": hp["in_channels"],
                "mean": list(hp["mean"]),
                "std": list(hp["std"]),
                "class_names": [],
                "pretrain_method": hp["method"],
            },
        }

    def save_backbone(self, path: Path) -> None:
        # A file object, not the staging path: torch.save would name the archive's folder after the staging
        # file's random name, and data/pretrain's bytes (its DVC hash) would differ between identical runs.
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            torch.save(self.classifier_checkpoint(), f)


@torch.no_grad()
def knn_accuracy(
    model: SelfSupervised,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of a cosine k-nearest-neighbour vote (weights exp(sim / 0.07), as in the InstDisc/DINO
    monitors) of the frozen features: whether pretraining learns anything a classifier could use."""

    def features(x: torch.Tensor) -> torch.Tensor:
        was = model.training
        model.eval()
        out = torch.cat(
            [F.normalize(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)]
        )
        model.train(was)
        return out

    known, asked = features(bank.to(model.device)), features(queries.to(model.device))
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    similarity = asked @ known.T
    top, index = similarity.topk(min(k, len(known)), dim=1)
    votes = torch.zeros(len(asked), classes, device=asked.device)
    votes.scatter_add_(1, bank_labels.to(asked.device)[index], (top / 0.07).exp())
    return float((votes.argmax(1).cpu() == query_labels).float().mean())
