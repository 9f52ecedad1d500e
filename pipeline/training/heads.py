"""Classification heads that sit where a ResNet's ``fc`` is: the trained linear layer, or a kNN vote."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


def linear_of(head: nn.Module) -> nn.Linear:
    """The linear layer of a head built by ``model.build_network`` (``Linear``, or ``Dropout`` then ``Linear``)."""
    if isinstance(head, nn.Linear):
        return head
    return cast(nn.Linear, cast(nn.Sequential, head)[-1])  # Module.__getattr__ typing: Dropout, then Linear


class KNNHead(nn.Module):
    """Weighted cosine k-nearest-neighbour vote over stored training features (Wu et al., 2018, as DINO
    evaluates its features): each of the ``k`` most similar images votes for its class with weight
    ``exp(similarity / temperature)``. Outputs log class probabilities, so softmax gives the vote shares
    and the rest of the pipeline (loss, metrics, export) treats it as logits. sklearn's kNN would not
    export with the network; this is a few tensor operations that TorchScript and ONNX carry.
    """

    def __init__(self, in_features: int, num_classes: int, bank_size: int, k: int, temperature: float = 0.07):
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, min(k, bank_size), temperature
        # Filled by ``store``; sized here so a checkpoint loads into a freshly built head.
        self.register_buffer("bank", torch.zeros(bank_size, in_features))
        self.register_buffer("bank_labels", torch.zeros(bank_size, dtype=torch.long))

    def store(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        cast(torch.Tensor, self.bank).copy_(F.normalize(features.float(), dim=1))  # Module.__getattr__ typing
        cast(torch.Tensor, self.bank_labels).copy_(labels.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(x, dim=1) @ self.bank.T
        top, index = similarity.topk(self.k, dim=1)
        weights = ((top - top[:, :1]) / self.temperature).exp()  # shares as exp(s / t); no overflow
        votes = (F.one_hot(self.bank_labels[index], self.num_classes).float() * weights.unsqueeze(-1)).sum(
            dim=1
        )
        return torch.log(votes / votes.sum(dim=1, keepdim=True) + 1e-12)
