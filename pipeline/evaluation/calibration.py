"""Temperature scaling and the reliability diagram's data.

Temperature scaling (Guo et al., 2017) divides the logits by one scalar T > 0 fitted to minimise the
negative log-likelihood on the validation split: it changes confidence, not the predicted class.
T > 1 softens an over-confident model. Fitted here (no maintained library offers it for PyTorch).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch.nn import functional as F

from pipeline.evaluation.metrics import confidence_bins

# A sanity bound: a nearly separable validation split pushes T towards 0 (ever sharper is ever better).
TEMPERATURE_BOUNDS = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.as_tensor(logits, dtype=torch.float64).div(temperature).softmax(-1).numpy()


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under softmax(logits / temperature)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    return float(F.cross_entropy(z / temperature, torch.tensor(labels, dtype=torch.long)))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The T minimising the NLL of softmax(logits / T) (LBFGS on log T), within ``TEMPERATURE_BOUNDS``.

    When every image is classified right the NLL keeps falling as T -> 0 and has no minimum: T is then
    left at 1 (no scaling); the report says so.
    """
    if (np.asarray(logits).argmax(1) == np.asarray(labels)).all():
        return 1.0
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)  # log T: T stays positive
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.clip(log_t.exp().item(), *TEMPERATURE_BOUNDS))


def reliability_table(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> pd.DataFrame:
    """Per non-empty confidence bin (the ECE's bins): its range, mean confidence, accuracy and image count."""
    bins = confidence_bins(probs, n_bins)
    frame = pd.DataFrame({"bin": bins, "confidence": probs.max(1), "accuracy": probs.argmax(1) == labels})
    table = (
        frame.groupby("bin")
        .agg(confidence=("confidence", "mean"), accuracy=("accuracy", "mean"), count=("bin", "size"))
        .reset_index()
    )
    table.insert(1, "lower", table["bin"] / n_bins)
    table.insert(2, "upper", (table["bin"] + 1) / n_bins)
    return table.round(6)
