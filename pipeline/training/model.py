"""The LightningModule: a torchvision ResNet with a new head, normalization inside, one metric vocabulary.

Inputs are raw pixel tensors (uint8 from the cache); the module scales and normalizes them itself,
so the loaders stay light and an exported model carries its own preprocessing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as L
import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torchmetrics import MeanMetric, Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat
from torchvision.transforms import v2

from pipeline.config import Augment, Model, Train
from pipeline.evaluation.metrics import HEADLINE, weighted_metrics
from pipeline.pixels import unit_max
from pipeline.runinfo import WeightsInfo
from pipeline.training import recipe, semi
from pipeline.training.heads import KNNHead, linear_of

# ImageNet statistics, which torchvision's ResNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The training defaults are the typed params' (pipeline.config), never a second set written here.
_MODEL, _TRAIN, _AUGMENT = Model(), Train(), Augment()


def build_network(
    arch: str, num_classes: int, dropout: float = 0.0, in_channels: int = 3, stem: str = _MODEL.stem
) -> nn.Module:
    """A randomly initialised torchvision ``arch`` for ``in_channels`` bands whose ``fc`` head predicts
    ``num_classes``; ``stem="small"`` leaves out the stem's max-pool (no parameters: weights load alike)."""
    net = torchvision.models.get_model(arch, weights=None)
    if stem == "small":
        net.maxpool = nn.Identity()
    if in_channels != 3:
        old = net.conv1
        net.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
        )
    head = nn.Linear(net.fc.in_features, num_classes)
    net.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head
    return net


# The hyperparameters a checkpoint records from the train and augment sections (under their params names).
TRAIN_RECORD = (
    "lr",
    "weight_decay",
    "optimizer",
    "monitor",
    "backbone_lr_mult",
    "warmup_epochs",
    "label_smoothing",
    "channels_last",
    "semi_threshold",
    "semi_weight",
)
AUGMENT_RECORD = ("mixup_alpha", "cutmix_alpha", "mix_prob", "cutmix_switch_prob")


def sections(
    record: dict[str, Any], model: Model = _MODEL, train: Train = _TRAIN, augment: Augment = _AUGMENT
) -> tuple[Model, Train, Augment]:
    """A checkpoint's flat record read back into the typed sections (keys it lacks keep the sections' values)."""
    unknown = set(record) - {"arch", "dropout", "stem", *TRAIN_RECORD, *AUGMENT_RECORD}
    if unknown:
        raise TypeError(f"Classifier got unexpected hyperparameters {sorted(unknown)}")
    pick = lambda names: {k: record[k] for k in names if k in record}  # noqa: E731
    return (
        dataclasses.replace(model, **pick(("arch", "dropout", "stem"))),
        dataclasses.replace(train, **pick(TRAIN_RECORD)),
        dataclasses.replace(augment, **pick(AUGMENT_RECORD)),
    )


def input_statistics(
    in_channels: int,
    weights: WeightsInfo | None = None,
    dataset_stats: tuple[Sequence[float], Sequence[float]] | None = None,
) -> tuple[list[float], list[float]]:
    """The one decision of what the network normalizes its input with (mean, std in [0, 1] pixel units).

    Weights that bring their statistics (an earlier run, a domain backbone) keep them; pretrained RGB weights
    keep ImageNet's (what they were trained with); otherwise (random init, other band counts) the data set's
    train-split statistics (``dataset_stats``, ingest's) when given, else ImageNet's, averaged per band
    beyond RGB.
    """
    if weights is not None and weights.mean is not None and weights.std is not None:
        return [float(v) for v in weights.mean], [float(v) for v in weights.std]
    pretrained = weights is not None and weights.pretrained
    if dataset_stats is not None and not (pretrained and len(dataset_stats[0]) == 3):
        return [float(v) for v in dataset_stats[0]], [float(v) for v in dataset_stats[1]]
    if in_channels == 3:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [sum(IMAGENET_MEAN) / 3] * in_channels, [sum(IMAGENET_STD) / 3] * in_channels


def batch_mixer(
    num_classes: int, mixup_alpha: float, cutmix_alpha: float, cutmix_switch_prob: float
) -> v2.Transform | None:
    """torchvision's MixUp and/or CutMix on a (images, labels) batch, giving mixed images and soft labels;
    None when both are off. With both on, each mixed batch uses CutMix with ``cutmix_switch_prob``."""
    mixers, weights = [], []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        weights.append(1 - cutmix_switch_prob)
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        weights.append(cutmix_switch_prob)
    if len(mixers) < 2:
        return mixers[0] if mixers else None
    if min(weights) == 0:  # a switch of 0 or 1 picks one of them always
        return mixers[weights.index(max(weights))]
    return v2.RandomChoice(mixers, p=weights)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Integer pixels to floats in [0, 1] (``pixels.unit_max``: the dtype's maximum); floats pass through."""
    if x.dtype.is_floating_point:
        return x
    return x.float() / unit_max(x.dtype)


class EpochMetric(Metric):
    """One metric of ``HEADLINE`` over a split's epoch, defined exactly as the evaluate stage defines it
    (``pipeline.evaluation.metrics``: macro averages over the classes present), so ``val/auroc`` and
    ``test/auroc`` mean the same. torchmetrics' own classes count a class absent from an epoch's labels
    as 0; this one only gathers the predictions (across DDP ranks too) and hands them to that definition."""

    full_state_update = False
    probs: list[torch.Tensor]  # states (add_state), typed here: nn.Module.__getattr__ says "Tensor | Module"
    labels: list[torch.Tensor]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        self.probs.append(probs.detach().float())
        self.labels.append(labels.detach())

    def compute(self) -> torch.Tensor:
        probs, labels = dim_zero_cat(self.probs), dim_zero_cat(self.labels).cpu().numpy()
        if not torch.isfinite(probs).all():  # a diverged epoch (StopOnNonFiniteLoss ends the run)
            return torch.tensor(float("nan"))
        values = weighted_metrics(probs.cpu().numpy(), labels, np.ones((1, len(labels))))
        return torch.tensor(float(values[self.name][0]))


class PseudoLabelMix(Metric):
    """The class shares of an epoch's confident pseudo-labels (``train.semi``), counted across DDP ranks."""

    full_state_update = False
    counts: torch.Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.add_state("counts", default=torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, labels: torch.Tensor, mask: torch.Tensor) -> None:
        self.counts += torch.bincount(labels, weights=mask.float(), minlength=len(self.counts)).to(
            self.counts
        )

    def compute(self) -> torch.Tensor:
        return self.counts / self.counts.sum().clamp_min(1)


class Classifier(L.LightningModule):
    # Submodule and buffers, typed here: nn.Module.__getattr__ would say "Tensor | Module".
    net: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    class_weights: torch.Tensor | None
    train_loss: MeanMetric
    val_loss: MeanMetric

    def __init__(
        self,
        model: Model = _MODEL,
        train: Train = _TRAIN,
        augment: Augment = _AUGMENT,
        *,
        num_classes: int,
        class_names: Sequence[str] = (),
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_weights: Sequence[float] | None = None,
        knn_bank: int = 0,
        knn_k: int = 20,
        net: nn.Module | None = None,
        **record: Any,
    ):
        """The classifier the typed sections describe (``model``, ``train``, ``augment``), for the data's
        ``num_classes`` and ``in_channels``; ``mean``/``std``: what it normalizes with (default: see
        :func:`input_statistics`); ``net``: the network already built and loaded (:func:`fit.build_model`),
        else a randomly initialised one. ``knn_bank`` > 0: the head is a :class:`~pipeline.training.heads.KNNHead`
        over that many stored training features (``train.mode: knn``), voting among the ``knn_k`` nearest.

        ``record``: a checkpoint's flat hyperparameters (what ``load_from_checkpoint`` passes), read back
        into the sections: checkpoints keep the flat record they always had.
        """
        super().__init__()
        if record:
            model, train, augment = sections(record, model, train, augment)
        if mean is None or std is None:
            mean, std = input_statistics(in_channels)
        # The checkpoint's record, flat as it has always been; logged to MLflow by the stage under
        # params.yaml names, not by Lightning under these.
        self.save_hyperparameters(
            {
                "arch": model.arch,
                "num_classes": num_classes,
                "class_names": list(class_names),
                "dropout": model.dropout,
                "stem": model.stem,
                **{name: getattr(train, name) for name in TRAIN_RECORD},
                "mean": [float(v) for v in mean],
                "std": [float(v) for v in std],
                "in_channels": in_channels,
                "class_weights": None if class_weights is None else list(class_weights),
                **{name: getattr(augment, name) for name in AUGMENT_RECORD},
                "knn_bank": knn_bank,
                "knn_k": knn_k,
            },
            logger=False,
        )
        self.net = (
            net
            if net is not None
            else build_network(model.arch, num_classes, model.dropout, in_channels, model.stem)
        )
        if knn_bank:
            fc = cast(nn.Module, self.net.fc)  # Module.__getattr__ typing
            self.net.fc = KNNHead(linear_of(fc).in_features, num_classes, knn_bank, knn_k)
        self.channels_last = False  # decided where the device is known: on_fit_start
        # Not persistent: rebuilt from the hyperparameters, so checkpoints load with or without it.
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # One collection, one set of names and definitions for every split (its members share one state).
        metrics = MetricCollection({name: EpochMetric(name) for name in HEADLINE})
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.mixer = batch_mixer(
            num_classes, augment.mixup_alpha, augment.cutmix_alpha, augment.cutmix_switch_prob
        )
        # The epoch's loss as the mean over its images: under DDP the ranks' sums and counts are added (a
        # mean of the ranks' means would weigh the images of a rank with fewer of them more).
        self.train_loss, self.val_loss = MeanMetric(), MeanMetric()
        self.pseudo_mix = PseudoLabelMix(num_classes)

    def use_knn_head(self, features: torch.Tensor, labels: torch.Tensor, k: int) -> None:
        """Replace the head by a kNN vote over ``features`` (``train.mode: knn``), recorded in the
        hyperparameters so a checkpoint rebuilds this head."""
        head = KNNHead(features.shape[1], self.hparams["num_classes"], len(features), k)
        head.store(features, labels)
        self.net.fc = head
        self.hparams.update(knn_bank=len(features), knn_k=k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for pixel batches (N, C, H, W): integer pixels or floats in [0, 1]."""
        x = (to_unit_range(x) - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_fit_start(self) -> None:
        """channels_last memory format (``train.channels_last``; 'auto': on CUDA only)."""
        wanted = self.hparams["channels_last"]
        self.channels_last = self.device.type == "cuda" if wanted == "auto" else bool(wanted)
        self.net.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def mix(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch MixUp/CutMix-ed (``augment.mixup_alpha`` etc.): floats in [0, 1] and soft labels.

        Every batch gets soft (one-hot) labels while mixing is on, mixed or not (``augment.mix_prob``), so
        the class-weighted loss is averaged the same way in every step.
        """
        x = to_unit_range(x)
        if self.mixer is not None and torch.rand(()) < self.hparams["mix_prob"]:
            return self.mixer(x, y)
        return x, F.one_hot(y, self.hparams["num_classes"]).to(x.dtype)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        x, y = batch
        if split == "train" and self.mixer is not None:
            x, target = self.mix(x, y)
            y = target.argmax(-1)  # train/* metrics score the dominant label of each mixed image
        else:
            target = y
        logits = self(x)
        # Soft targets: the weighted loss is -sum_c w_c t_c log p_c averaged over images; label smoothing
        # is applied to them as to hard labels.
        loss = F.cross_entropy(
            logits, target, weight=self.class_weights, label_smoothing=self.hparams["label_smoothing"]
        )
        metrics = self.train_metrics if split == "train" else self.val_metrics
        metrics.update(logits.softmax(dim=-1), y)
        losses = self.train_loss if split == "train" else self.val_loss
        losses.update(loss.detach(), len(y))
        self.log(f"{split}/loss", losses, on_step=False, on_epoch=True, prog_bar=True)
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=split == "val")
        return loss

    def training_step(self, batch, batch_idx):
        if isinstance(batch, dict):  # train.semi: fixmatch: {"labelled": (x, y), "pool": (weak, strong)}
            loss = self._step(batch["labelled"], "train")
            return loss + self.hparams["semi_weight"] * self._pool_step(*batch["pool"])
        return self._step(batch, "train")

    def _pool_step(self, weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
        """FixMatch on a pool batch: each strong view learns its weak view's class where that is confident.
        Logged per epoch: ``semi/loss``, ``semi/confident`` (the share of the pool above the threshold) and
        ``semi/pseudo/<class>`` (the confident pseudo-labels' class mix)."""
        weak_logits, strong_logits = self(torch.cat([weak, strong])).chunk(2)
        threshold = self.hparams["semi_threshold"] * semi.smoothed_target(
            self.hparams["label_smoothing"], self.hparams["num_classes"]
        )
        out = semi.fixmatch_loss(weak_logits, strong_logits, threshold)
        self.pseudo_mix.update(out.labels, out.mask)
        self.log("semi/loss", out.loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(weak))
        self.log(
            "semi/confident",
            out.mask.mean(),
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(weak),
        )
        return out.loss

    def on_train_epoch_end(self) -> None:
        if self.pseudo_mix.update_count:
            names = self.hparams["class_names"] or [str(i) for i in range(self.hparams["num_classes"])]
            for name, share in zip(names, self.pseudo_mix.compute(), strict=True):
                self.log(f"semi/pseudo/{name}", share)
            self.pseudo_mix.reset()

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def configure_optimizers(self):
        """Head at ``lr``, backbone at ``lr x backbone_lr_mult``; linear warm-up then cosine decay, per step.

        Frozen parameters stay in the optimizer without gradients (see ``pipeline.training.recipe``).
        """
        hp = self.hparams
        head, backbone = recipe.head_and_backbone_params(self.net)
        groups = [{"params": head, "lr": hp.lr}, {"params": backbone, "lr": hp.lr * hp.backbone_lr_mult}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = round(hp.warmup_epochs * per_epoch)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": recipe.warmup_cosine(opt, warmup, total), "interval": "step"},
        }


class Ensemble(nn.Module):
    """Models averaged: the mean of the members' class probabilities (``data.folds``: one per fold).

    ``forward`` returns the log of that mean, logits whose softmax is the mean, so evaluation,
    temperature scaling and Grad-CAM treat an ensemble like one model; one member is that member
    unchanged. Members share the architecture, classes and input preprocessing of the first.
    """

    def __init__(self, members: Sequence[Classifier]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    @property
    def hparams(self):
        return self.members[0].hparams

    @property
    def mean(self) -> torch.Tensor:
        return cast(Classifier, self.members[0]).mean  # nn.ModuleList typing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        probs = torch.stack([m(x).softmax(-1) for m in self.members]).mean(0)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()
