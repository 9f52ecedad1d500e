"""Frozen-feature training (``train.mode: linear_probe | knn``): the backbone is used, never trained; and
the first phase of ``train.mode: lp_ft``, the same linear probe before fine-tuning (:func:`fit_head`).

Each image's pooled backbone features are computed once (no augmentation: the same image gives the same
features, so there is nothing to gain from a second pass) and kept in memory for the run. The linear
probe fits scikit-learn's multinomial logistic regression on them (its L2 strength picked on the
validation split) and copies the coefficients into the network's ``fc`` layer; kNN stores the
features in a :class:`~pipeline.training.heads.KNNHead`. Either way the result is an ordinary
:class:`~pipeline.training.model.Classifier` checkpoint, so evaluate, predict and export need nothing new.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import lightning.pytorch as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler
from torch import nn

from pipeline.config import Params
from pipeline.data.cache import Images
from pipeline.data.datamodule import ImageDataModule
from pipeline.evaluation.predictions import predict_logits
from pipeline.runinfo import WeightsInfo
from pipeline.training.heads import linear_of
from pipeline.training.model import Classifier

log = logging.getLogger(__name__)

PROBE_C = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried; the best validation log-loss wins
FEATURE_BATCH = 256


@torch.inference_mode()
def pooled_features(model: Classifier, images: Images) -> np.ndarray:
    """The backbone's globally pooled features (N, D) for cached images, the head bypassed (eval mode)."""
    head, model.net.fc = model.net.fc, nn.Identity()
    try:
        return predict_logits(model, images, FEATURE_BATCH)
    finally:
        model.net.fc = head


def fit_linear_probe(
    model: Classifier, train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], seed: int
) -> float:
    """Logistic regression on standardized features, folded into ``model``'s linear head; returns the C chosen."""
    scaler = StandardScaler().fit(train[0])
    x_train, x_val = scaler.transform(train[0]), scaler.transform(val[0])
    classes = np.arange(model.hparams["num_classes"])
    fits = {}
    for c in PROBE_C:
        clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, train[1])
        fits[c] = (log_loss(val[1], clf.predict_proba(x_val), labels=clf.classes_), clf)
    best = min(fits, key=lambda c: fits[c][0])
    clf = fits[best][1]
    if not np.array_equal(clf.classes_, classes):
        raise ValueError(
            f"the linear probe needs training images of every class; it saw {clf.classes_.tolist()}"
        )
    coef, intercept = clf.coef_, clf.intercept_
    if len(classes) == 2:  # sklearn's binary model is one logit difference; split it over the two rows
        coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
    # The scaler folded in: w . (x - mu) / sigma + b = (w / sigma) . x + (b - w . mu / sigma).
    weight = coef / scaler.scale_
    bias = intercept - weight @ scaler.mean_
    layer = linear_of(cast(nn.Module, model.net.fc))  # Module.__getattr__ typing
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return best


def fit_knn(model: Classifier, train: tuple[np.ndarray, np.ndarray], k: int) -> None:
    """Replace ``model``'s head by a kNN vote over ``train``'s features (recorded in the hyperparameters)."""
    features, labels = train
    model.use_knn_head(torch.from_numpy(features), torch.from_numpy(labels), k)


def _features(
    data: ImageDataModule, model: Classifier, accelerator: str = "cpu"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and val features, on the GPU when training would use one (one forward pass per image; on a CPU
    a real-sized set at 224 px would take hours); the model is back on the CPU afterwards, as it was."""
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    model.to("cuda" if gpu else "cpu")
    try:
        split = {}
        for name in ("train", "val"):
            dataset = data.dataset(name)
            split[name] = (pooled_features(model, dataset.images), np.asarray(dataset.labels))
        return split
    finally:
        model.to("cpu")


def _probe(model: Classifier, split: dict[str, tuple[np.ndarray, np.ndarray]], seed: int) -> None:
    c = fit_linear_probe(model, split["train"], split["val"], seed)
    log.info("linear probe: logistic regression C=%g on %d x %d features", c, *split["train"][0].shape)


def fit_head(data: ImageDataModule, model: Classifier, seed: int, accelerator: str = "cpu") -> None:
    """LP-FT's first phase (``train.mode: lp_ft``): ``model``'s linear head fitted, to convergence, on the frozen
    backbone's features, as ``train.mode: linear_probe`` fits it; the backbone (BatchNorm statistics
    included) is left exactly as it was, for fine-tuning to start from both."""
    _probe(model, _features(data, model, accelerator), seed)


def fit_frozen(
    params: Params,
    data: ImageDataModule,
    model: Classifier,
    weights: WeightsInfo,
    *,
    checkpoint: Path | None = None,
    logger: Logger | bool = False,
) -> dict[str, float]:
    """Train ``model``'s head on frozen features and score it on val as fine-tuning is scored (same metrics
    and names, to the same logger); save it as ``checkpoint`` when given. Returns the validation metrics."""
    t = params.train
    if not weights.pretrained:
        log.warning(
            "train.mode=%s on a randomly initialised backbone: its features are random projections "
            "(a baseline, not transfer)",
            t.mode,
        )
    L.seed_everything(params.seed, workers=True, verbose=False)
    split = _features(data, model, t.accelerator)
    if t.mode == "linear_probe":
        _probe(model, split, params.seed)
    else:
        fit_knn(model, split["train"], t.knn_k)
    # One device: there is nothing to share out. validate logs val/* like a fine-tuning epoch does.
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=1,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(checkpoint.parent) if checkpoint else None,
    )
    metrics = {k: float(v) for k, v in trainer.validate(model, datamodule=data, verbose=False)[0].items()}
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(checkpoint, weights_only=True)
    return metrics
