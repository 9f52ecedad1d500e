"""Start from an earlier run of this pipeline: its backbone, band count and normalization.

``model.weights`` may name a run instead of ImageNet or a state dict: its ``models/`` folder (the
checkpoint ``run.json`` names), a ``.ckpt`` file, an MLflow ``runs:/<run_id>`` (the model the train
stage logged, ``runs:/<run_id>/<artifact path>`` for another) or ``models:/<name>/<version>`` URI. The
backbone's tensors are loaded as they are; the head (``fc.*``) is always new, for the new classes; the
input statistics the backbone was trained with are carried over, as the band count, and recorded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.runinfo import CHECKPOINT_SUFFIX, RUN_INFO, RunInfo, WeightsInfo
from pipeline.training.weights import (
    FIRST_CONV,
    HEAD_PREFIX,
    WeightsError,
    adapt_first_conv,
    adapt_statistics,
    verify_file,
)

URI_SCHEMES = ("runs:/", "models:/")
NET_PREFIX = "net."  # the Classifier's torchvision network in its state dict
MEMBER_PREFIX = "nets.0."  # the registered model (serve.shipped.Packaged): its first member's network
LOGGED_MODEL = "model"  # the artifact path tracking.log_model logs the network under
PT2_FILE = (
    "model.pt2"  # what mlflow.pytorch saves a torch.export program as (the format tracking.log_model uses)
)
PICKLED_FILE = "model.pth"  # what it saves a pickled module as: refused (it runs code when loaded)
PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


@dataclass(frozen=True)
class Backbone:
    """An earlier run's network, as trained: tensors (head included) and what its inputs were."""

    state: dict[str, torch.Tensor]  # torchvision keys (conv1.weight, ..., fc.*)
    arch: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    source: str

    @property
    def in_channels(self) -> int:
        return int(self.state[FIRST_CONV].shape[1])


def is_run_source(weights: str) -> bool:
    """An MLflow URI, a ``.ckpt`` file or a folder (a run's ``models/``): not ImageNet, an enum or a .pth."""
    return weights.startswith(URI_SCHEMES) or weights.endswith(CHECKPOINT_SUFFIX) or Path(weights).is_dir()


def _from_state(state: dict[str, torch.Tensor], hparams: dict, source: str) -> Backbone:
    """From a Classifier's state dict, also when another module wraps it (keys ``<prefix>net.conv1.weight``),
    or from the registered model (``serve.shipped.Packaged``: ``nets.<i>.conv1.weight``, one network per fold
    member; the first member's is taken, with its normalization)."""
    prefixes = (NET_PREFIX, MEMBER_PREFIX)
    anchors = sorted((k for k in state for p in prefixes if k.endswith(p + FIRST_CONV)), key=len)
    if not anchors or not hparams.get("arch"):
        raise WeightsError(
            f"{source}: not a model of this pipeline's classifier (no '{NET_PREFIX}{FIRST_CONV}' "
            "tensor, or no record of its arch)"
        )
    prefix = anchors[0].removesuffix(FIRST_CONV)
    outer = next(prefix.removesuffix(p) for p in prefixes if prefix.endswith(p))
    net = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    # The buffers are what the network saw (build_model may have replaced the constructor's statistics).
    mean, std = state.get(outer + "mean"), state.get(outer + "std")
    if mean is not None and std is not None and mean.dim() == 5:  # Packaged: (members, 1, C, 1, 1)
        mean, std = mean[0], std[0]
    return Backbone(
        state=net,
        arch=hparams["arch"],
        mean=tuple(hparams["mean"] if mean is None else mean.flatten().tolist()),
        std=tuple(hparams["std"] if std is None else std.flatten().tolist()),
        classes=tuple(hparams.get("class_names") or ()),
        source=source,
    )


def read_checkpoint(path: Path, sha256: str | None = None) -> Backbone:
    """A Lightning checkpoint the train stage wrote (``best.ckpt``, ``last.ckpt``), read as tensors only."""
    if not path.is_file():
        raise WeightsError(f"model.weights: checkpoint '{path}' not found")
    verify_file(path, sha256=sha256)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise WeightsError(f"model.weights: '{path}' is not a Lightning checkpoint (no 'state_dict')")
    return _from_state(checkpoint["state_dict"], checkpoint.get("hyper_parameters") or {}, str(path))


def read_model_dir(folder: Path, sha256: str | None = None) -> Backbone:
    """A train stage's ``models/`` folder: the checkpoint its ``run.json`` names."""
    info = folder / RUN_INFO
    if not info.is_file():
        raise WeightsError(
            f"model.weights: folder '{folder}' has no {RUN_INFO}; point it at the models/ folder "
            "of a train stage (or its best.ckpt)"
        )
    # A fold ensemble (data.folds) names one checkpoint per member: the first member's backbone is taken.
    return read_checkpoint(folder / RunInfo.read(folder).checkpoints[0], sha256)


def store_uri(configured: str) -> str:
    """The MLflow store to resolve URIs against: the one a stage has set (or $MLFLOW_TRACKING_URI), else
    ``mlflow.tracking_uri`` from params.yaml, made absolute."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    from pipeline.tracking import absolute_uri

    return mlflow.get_tracking_uri() if is_tracking_uri_set() else absolute_uri(configured)


@contextmanager
def _pointed_at(uri: str) -> Iterator[None]:
    """MLflow's global store set to ``uri`` for a while, then put back as it was (unset included), and
    $MLFLOW_TRACKING_URI with it. ``download_artifacts(tracking_uri=...)`` alone does not reach the model
    registry behind a ``models:/`` URI (MLflow 3.17 resolves those against the global registry URI)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from pipeline.tracking import ENV_URI

    previous = os.environ.get(ENV_URI)
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if previous is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = previous


def _exported_program(local: Path, uri: str) -> nn.Module:
    """The ``torch.export`` program of a model the train stage logged, loaded without unpickling anything.

    MLflow 3 unpickles a ``data/model.pth`` by default (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` is true) and
    ``mlflow.pytorch.load_model`` puts a model's ``code/`` folder on ``sys.path``: a tampered model version in a
    shared store would run its code inside ``train``. The pipeline logs pt2 programs with no code, so anything
    else is refused before a byte of it is read, and the pt2 archive itself is loaded with MLflow's pickle
    loading off, which checks that every record in it is plain data (torch's weights-only unpickler).
    """
    import mlflow.pytorch
    from mlflow.models import Model

    conf = Model.load(local).flavors.get(mlflow.pytorch.FLAVOR_NAME)
    if conf is None:
        raise WeightsError(
            f"model.weights: {uri} is not a PyTorch model (no 'pytorch' flavor in its MLmodel)"
        )
    data = local / conf.get("model_data", "data")
    if conf.get("code") or not (data / PT2_FILE).is_file() or (data / PICKLED_FILE).exists():
        raise WeightsError(
            f"model.weights: {uri} is not a model this pipeline logged: it holds "
            f"{'code' if conf.get('code') else 'a pickled model (' + PICKLED_FILE + ')'} instead of only a "
            f"torch.export program ({PT2_FILE}); pickled models can run code when loaded, so they are refused. "
            "Log it again with mlflow.pytorch.log_model(..., serialization_format='pt2')"
        )
    previous = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = "false"
    try:
        return mlflow.pytorch.load_model(str(local), map_location="cpu")
    finally:
        if previous is None:
            os.environ.pop(PICKLE_SWITCH, None)
        else:
            os.environ[PICKLE_SWITCH] = previous


def read_mlflow(uri: str, tracking_uri: str) -> Backbone:
    """The model logged on a run (``runs:/<id>``, ``runs:/<id>/<path>``) or registered (``models:/<name>/<v>``).

    MLflow 3 logs it as a ``torch.export`` program by default, which keeps the tensors under their names but
    not the hyperparameters: the arch and classes come from the ``run.json`` the train stage logs on the run.
    """
    from mlflow.exceptions import MlflowException

    uri = _model_uri(uri)
    with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
        try:
            local, run_id, info = _downloaded(uri, tracking_uri, tmp)
            module = _exported_program(Path(local), uri)
        except (MlflowException, OSError) as err:
            raise WeightsError(
                f"model.weights: {uri} could not be loaded from the MLflow store {tracking_uri}: {err}"
            ) from err
    hparams = {"arch": info.arch, "class_names": info.classes} | dict(getattr(module, "hparams", {}))
    return _from_state(module.state_dict(), hparams, f"{uri} (run {run_id} in {tracking_uri})")


def _model_uri(uri: str) -> str:
    """``runs:/<id>`` names the model the train stage logged on that run."""
    if uri.startswith("runs:/") and "/" not in uri.removeprefix("runs:/").strip("/"):
        return f"{uri.rstrip('/')}/{LOGGED_MODEL}"
    return uri


def _downloaded(uri: str, tracking_uri: str, tmp: str) -> tuple[str, str, RunInfo]:
    """The model at ``uri`` downloaded into ``tmp``, the run that logged it, and that run's ``run.json``."""
    import mlflow.artifacts
    from mlflow.models import Model

    with _pointed_at(tracking_uri):
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        run_id = Model.load(local).run_id
        found = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/{RUN_INFO}", dst_path=tmp)
        return local, run_id, RunInfo.read(Path(found).parent)


def trained_size(weights: str, *, tracking_uri: str) -> int:
    """The image size the earlier run ``weights`` names was trained at (its ``run.json``), for
    ``data.image_size: auto``."""
    path = Path(weights)
    if weights.startswith(URI_SCHEMES):
        from mlflow.exceptions import MlflowException

        uri = _model_uri(weights)
        with tempfile.TemporaryDirectory(prefix="weights-") as tmp:
            try:
                return _downloaded(uri, store_uri(tracking_uri), tmp)[2].preprocessing.image_size
            except (MlflowException, OSError) as err:
                raise WeightsError(
                    f"model.weights: {uri} could not be read from the MLflow store {tracking_uri}: {err}"
                ) from err
    folder = path if path.is_dir() else path.parent
    if not (folder / RUN_INFO).is_file():
        raise WeightsError(
            f"model.weights: {weights}: no {RUN_INFO} beside it records the image size it was trained at "
            "(data.image_size: auto); set data.image_size to that size"
        )
    return RunInfo.read(folder).preprocessing.image_size


def resolve(weights: str, *, tracking_uri: str, sha256: str | None = None) -> Backbone:
    """The earlier run ``weights`` names (see :func:`is_run_source`)."""
    if weights.startswith(URI_SCHEMES):
        return read_mlflow(weights, store_uri(tracking_uri))
    path = Path(weights)
    return read_model_dir(path, sha256) if path.is_dir() else read_checkpoint(path, sha256)


def carried_statistics(backbone: Backbone, in_channels: int) -> tuple[list[float], list[float]]:
    """The backbone's mean/std for ``in_channels`` bands, adapted as :func:`weights.adapt_first_conv` adapts
    the kernels: one band takes the average, N bands cycle through the three."""
    return adapt_statistics(backbone.mean, backbone.std, in_channels)


def load_backbone(net: nn.Module, arch: str, backbone: Backbone, requested: str) -> WeightsInfo:
    """Put ``backbone``'s tensors, all but the head, into ``net`` (a fresh ``arch``), or say why they do not fit."""
    in_channels = net.get_parameter(FIRST_CONV).shape[1]
    if backbone.arch != arch:
        raise WeightsError(
            f"model.weights: {backbone.source} is a {backbone.arch} backbone, but model.arch is "
            f"{arch}; set model.arch: {backbone.arch} (or start from weights for {arch})"
        )
    state = {k: v for k, v in backbone.state.items() if not k.startswith(HEAD_PREFIX)}
    if in_channels != backbone.in_channels:
        if backbone.in_channels != 3:
            raise WeightsError(
                f"model.weights: {backbone.source} was trained on {backbone.in_channels} bands, this "
                f"data set has {in_channels}; only an RGB (3-band) backbone adapts to another "
                "band count"
            )
        state[FIRST_CONV] = adapt_first_conv(state[FIRST_CONV], in_channels)
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{backbone.source}: weights do not fit {arch}; missing keys {missing[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]}"
        )
    mean, std = carried_statistics(backbone, in_channels)
    return WeightsInfo(
        requested=requested,
        source=backbone.source,
        pretrained=True,
        mean=tuple(mean),
        std=tuple(std),
        in_channels=backbone.in_channels,
        source_classes=backbone.classes,
    )
