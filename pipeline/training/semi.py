"""FixMatch (Sohn et al., NeurIPS 2020): the masked pseudo-label loss of the training step (``train.semi``).

Per training step the classifier also sees ``train.semi_ratio`` unlabelled images per labelled one: the
model's prediction on a weak view (the domain's training transforms, as a labelled image gets) becomes a
pseudo-label where its top probability reaches ``train.semi_threshold`` of the top probability its training
targets ask for (``smoothed_target``), and a strong view of the same image is trained to predict it. Images
below the threshold contribute nothing (the mask), so early in training, when nothing is confident, the step
is the supervised one.

The views come from the data side: ``augment.strong_transform`` (RandAugment-style, within the domain's
rules) and ``data.datamodule.UnlabelledDataset`` (each pool image as its weak and strong view).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class PseudoLabels:
    """One step's unlabelled part: its loss, which images were confident enough, and their pseudo-labels."""

    loss: torch.Tensor
    mask: torch.Tensor  # (N,) float: 1 where the weak view's top probability reached the threshold
    labels: torch.Tensor  # (N,) the weak view's predicted class


def smoothed_target(label_smoothing: float, classes: int) -> float:
    """The top probability a model trained with label smoothing is pulled towards: 1 - e + e / classes.

    ``train.semi_threshold`` is a share of it, not an absolute probability. FixMatch's 0.95 was chosen for
    models trained on one-hot targets; with the defaults' smoothing (0.1) a binary model aims at 0.95 itself
    and a ten-class one at 0.91, so an absolute 0.95 let only 4-43% of PneumoniaMNIST's pool through and
    almost none of EuroSAT's (docs/benchmarks.md, issue 26), and the unlabelled loss all but vanished.
    """
    return 1.0 - label_smoothing + label_smoothing / classes


def fixmatch_loss(weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float) -> PseudoLabels:
    """Cross-entropy of the strong view against the weak view's prediction, counted only where that
    prediction is confident, averaged over all unlabelled images (FixMatch's normalization: a step with few
    confident images adds little). No gradient flows through the pseudo-labels."""
    confidence, labels = weak_logits.detach().softmax(-1).max(-1)
    mask = (confidence >= threshold).to(strong_logits.dtype)
    loss = (F.cross_entropy(strong_logits, labels, reduction="none") * mask).mean()
    return PseudoLabels(loss=loss, mask=mask, labels=labels)
