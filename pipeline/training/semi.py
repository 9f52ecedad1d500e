"""FixMatch (Sohn et al., NeurIPS 2020): the masked pseudo-label loss of the training step (``train.semi``).

Per training step the classifier also sees ``train.semi_ratio`` unlabelled images per labelled one: the
model's prediction on a weak view (the domain's training transforms, as a labelled image gets) becomes a
pseudo-label where its top probability reaches ``train.semi_threshold`` of the top probability its training
targets ask for (``smoothed_target``), and a strong view of the same image is trained to predict it. Images below the threshold contribute nothing (the mask), so early in training,
when nothing is confident, the step is the supervised one.

``train.semi_threshold: adaptive`` replaces the fixed threshold by FreeMatch's self-adaptive one (SAT; Wang et
al., ICLR 2023; :class:`SelfAdaptiveThreshold`): it follows the model's own confidence on the pool, so it
admits pseudo-labels from the first epochs and tightens as the model learns, whatever label smoothing and
batch mixing do to the top probability (a fixed 0.95 x 0.91 let 0.2-1.5% of EuroSAT's pool through in 30
epochs). FreeMatch's fairness loss is not part of it.

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


# Per step. FreeMatch's 0.999 remembers ~1,000 steps, made for runs of a million; a CPU run here is ~1,000-3,000
# steps (EuroSAT, 400 labels, 100 epochs: 1,300), where 0.999 left the threshold near 1/K for 20 epochs, every
# pseudo-label of a 50%-accurate model counted, and validation accuracy fell 10-15 points behind the same
# run without the pool. 0.99 remembers ~100 steps: a few epochs.
SAT_MOMENTUM = 0.99


class SelfAdaptiveThreshold:
    """FreeMatch's self-adaptive thresholds (SAT), written here: the method is a few lines of state, and the
    library that ships it (USB, MIT) is a training framework of its own rather than something to import.

    A global threshold ``tau``, an exponential moving average (``momentum``) of the pool batches' mean top
    probability, starting at 1/K; a class's threshold is ``tau`` scaled by that class's share of the
    pool's mean predicted distribution (also averaged, also from 1/K) over the largest share: a class the
    model rarely predicts gets a lower bar. Plain tensors, not module buffers: a model's state_dict (and every
    checkpoint written before this existed) stays as it was; ``state_dict`` goes into the checkpoint beside it.
    """

    def __init__(self, num_classes: int, momentum: float = SAT_MOMENTUM) -> None:
        self.momentum = momentum
        self.tau = torch.tensor(1.0 / num_classes)
        self.class_p = torch.full((num_classes,), 1.0 / num_classes)

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """One step's pool probabilities (N, K), every rank's under DDP, so the ranks keep one state."""
        probs = probs.float()
        m = self.momentum
        self.tau = m * self.tau.to(probs.device) + (1 - m) * probs.max(-1).values.mean()
        self.class_p = m * self.class_p.to(probs.device) + (1 - m) * probs.mean(0)

    def thresholds(self, labels: torch.Tensor) -> torch.Tensor:
        """Each image's threshold, from its predicted class."""
        scale = self.class_p.to(labels.device) / self.class_p.max()
        return self.tau.to(labels.device) * scale[labels]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tau": self.tau.cpu(), "class_p": self.class_p.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tau, self.class_p = state["tau"].clone(), state["class_p"].clone()


def fixmatch_loss(
    weak_logits: torch.Tensor,
    strong_logits: torch.Tensor,
    threshold: float | torch.Tensor | SelfAdaptiveThreshold,
) -> PseudoLabels:
    """Cross-entropy of the strong view against the weak view's prediction, counted only where that
    prediction is confident, averaged over all unlabelled images (FixMatch's normalization: a step with few
    confident images adds little). No gradient flows through the pseudo-labels. ``threshold``: one number,
    one per image, or a :class:`SelfAdaptiveThreshold` (already updated with this step's probabilities)."""
    confidence, labels = weak_logits.detach().softmax(-1).max(-1)
    if isinstance(threshold, SelfAdaptiveThreshold):
        threshold = threshold.thresholds(labels)
    mask = (confidence >= threshold).to(strong_logits.dtype)
    loss = (F.cross_entropy(strong_logits, labels, reduction="none") * mask).mean()
    return PseudoLabels(loss=loss, mask=mask, labels=labels)
