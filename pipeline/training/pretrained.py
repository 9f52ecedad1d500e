"""What the network starts from: the one place that resolves ``model.weights`` and loads it into a fresh net.

``none`` is random initialization; ``imagenet`` (or a torchvision enum name) the architecture's torchvision
weights, downloaded through ``torch.hub`` into ``$TORCH_HOME/hub/checkpoints`` (a file already there is used
offline). When they cannot be obtained the run falls back to random initialization, loudly, and says so in
what it returns so the stages can record it; ``require_pretrained`` turns the fallback into an error. A named
domain backbone (:mod:`pipeline.backbones`, through torchgeo's enums) is fetched, cached, imported and falls
back the same way, and brings the preprocessing it was trained with. An earlier run of this pipeline
(:mod:`pipeline.training.transfer`) brings its backbone, band count and normalization; any other value is a
local state dict. The files themselves are handled in :mod:`pipeline.training.weights`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from urllib.error import URLError

import torch
from torch import nn

from pipeline import backbones
from pipeline.credentials import redact
from pipeline.fsutil import file_sha256
from pipeline.runinfo import PRETRAIN, PRETRAIN_BACKBONE, Pretrained, WeightsInfo
from pipeline.training import transfer
from pipeline.training import weights as files  # tests swap its functions: called through the module

log = logging.getLogger(__name__)

# URLs whose download failed in this process: the random-init banner is shown once, not once per tune trial.
_FAILED: set[str] = set()


def load_pretrained(
    net: nn.Module,
    arch: str,
    weights: str,
    *,
    require_pretrained: bool,
    hub_dir: Path | None = None,
    sha256: str | None = None,
    tracking_uri: str = "sqlite:///mlflow.db",
    pixel_dtype: str | None = None,
    pretrain_dir: Path | None = None,
) -> WeightsInfo:
    """Put the requested weights into ``net`` (a freshly built ``arch``) and say what happened.

    ``sha256``: the weights file must have this hash (checked before it is read). ``tracking_uri``
    (``mlflow.tracking_uri``): where ``runs:/`` and ``models:/`` weights are looked up when no stage has
    pointed MLflow at a store. ``pixel_dtype`` (the pixel cache's, e.g. 'uint16'): how a named domain
    backbone's value range maps onto the pixels (:func:`backbones.statistics_for`).
    """
    if weights == "none":
        return WeightsInfo(requested=weights, source="random-init", pretrained=False)
    if weights == PRETRAIN:
        return transfer.load_backbone(net, arch, _pretrain_backbone(pretrain_dir), weights)
    if transfer.is_run_source(weights):
        return transfer.load_backbone(
            net, arch, transfer.resolve(weights, tracking_uri=tracking_uri, sha256=sha256), weights
        )
    if weights in backbones.NAMED:
        return _load_named(net, arch, weights, require_pretrained, hub_dir, sha256, pixel_dtype)
    if weights != "imagenet" and not files.is_enum_name(weights):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", weights):  # Path would collapse it into a missing file
            raise files.WeightsError(
                f"model.weights: '{redact(weights)}' is a URL, which is not downloaded: download the file, "
                "then point model.weights at it (or `python -m pipeline weights import FILE`)"
            )
        path = Path(weights)
        digest = files.verify_file(path, sha256=sha256) if path.is_file() else None
        files.load_into(net, files.read(path), str(path))
        return WeightsInfo(requested=weights, source=str(path), pretrained=True, sha256=digest)

    url = files.imagenet_url(arch, weights)
    obtained = _obtain(
        url,
        f"ImageNet weights for {arch}",
        f"--arch {arch}" + ("" if weights == "imagenet" else f" --weights {weights}"),
        requested=weights,
        require_pretrained=require_pretrained,
        hub_dir=hub_dir,
        sha256=sha256,
    )
    if isinstance(obtained, WeightsInfo):
        return obtained
    state, digest = obtained
    files.load_into(net, state, url)
    return WeightsInfo(requested=weights, source=url, pretrained=True, sha256=digest)


# A state dict file records no input size: torchvision's and most published ResNet weights were trained at this.
ASSUMED_NATIVE = 224


def native_size(
    arch: str,
    weights: str,
    *,
    require_pretrained: bool,
    pretrain_weights: str = "none",
    hub_dir: Path | None = None,
    sha256: str | None = None,
    tracking_uri: str = "sqlite:///mlflow.db",
) -> int | None:
    """The input side ``weights`` were trained at, or None when no pretrained weights will load (random init,
    or the fallback when they cannot be obtained): what ``data.image_size: auto`` resolves to.

    Downloadable weights are obtained here, into the cache training then reads, so that the size and the
    weights training starts from are decided by the same attempt. ``pretrain_weights`` (``pretrain.weights``):
    what the pretrain stage starts from, which decides the size it (and a run from it) trains at.
    """
    if weights == PRETRAIN:
        return native_size(arch, pretrain_weights, require_pretrained=require_pretrained, hub_dir=hub_dir)
    if weights == "none":
        return None
    if transfer.is_run_source(weights):
        return transfer.trained_size(weights, tracking_uri=tracking_uri)
    if weights in backbones.NAMED:
        spec = backbones.spec(weights)
        url, what, args, native = (
            spec.url,
            f"{weights} ({spec.named.enum})",
            f"--weights {weights}",
            spec.crop,
        )
    elif weights == "imagenet" or files.is_enum_name(weights):
        url, what = files.imagenet_url(arch, weights), f"ImageNet weights for {arch}"
        args = f"--arch {arch}" + ("" if weights == "imagenet" else f" --weights {weights}")
        # torchvision's preprocessing: partial(ImageClassification, crop_size=224, resize_size=...)
        native = getattr(files.weight_enum(arch, weights).transforms, "keywords", {}).get("crop_size")
    else:  # a local state dict: loaded (and checked) by training; its size is not recorded anywhere
        if not Path(weights).is_file():
            raise files.WeightsError(f"model.weights: file '{weights}' not found")
        log.warning(
            "data.image_size auto: %s records no input size; %d px assumed (set data.image_size otherwise)",
            weights,
            ASSUMED_NATIVE,
        )
        return ASSUMED_NATIVE
    obtained = _obtain(
        url,
        what,
        args,
        requested=weights,
        require_pretrained=require_pretrained,
        hub_dir=hub_dir,
        sha256=sha256,
    )
    if isinstance(obtained, WeightsInfo):  # the random-init fallback
        return None
    return int(native or ASSUMED_NATIVE)


def _obtain(
    url: str,
    what: str,
    import_args: str,
    *,
    requested: str,
    require_pretrained: bool,
    hub_dir: Path | None,
    sha256: str | None,
) -> tuple[dict[str, torch.Tensor], str | None] | WeightsInfo:
    """The state dict at ``url`` (from the cache, else downloaded into it) and the file's SHA-256; when it
    cannot be obtained, the random-init fallback (announced once per process) or, with
    ``require_pretrained``, an error naming the URL and the cache path."""
    cached = files.hub_checkpoint(url, hub_dir)
    downloading = not cached.is_file()
    digest = (
        None if downloading else files.verify_file(cached, url=url, sha256=sha256)
    )  # before torch reads it
    try:
        state = files.fetch(url, hub_dir)
    except (URLError, OSError, RuntimeError) as err:
        advice = (
            f"pre-seed the file at {cached} (`python -m pipeline weights import FILE "
            f"{import_args}` puts it there; set TORCH_HOME to move it), or point model.weights at a local "
            f".pth state dict"
        )
        if require_pretrained:
            raise files.WeightsError(
                f"{what} could not be obtained from {url} ({err}); model.require_pretrained is true: {advice}"
            ) from err
        reason = f"download of {url} failed: {err}"
        fallback = WeightsInfo(
            requested=requested, source="random-init", pretrained=False, fallback_reason=reason
        )
        if url in _FAILED:  # a tune stage fits once per trial: the banner once per stage (process) is enough
            log.debug("training from random init again (%s)", reason)
            return fallback
        _FAILED.add(url)
        log.warning(
            "\n" + "!" * 78 + "\n!! PRETRAINED WEIGHTS UNAVAILABLE - %s: training from RANDOM INIT.\n"
            "!! %s\n!! To fix: %s\n" + "!" * 78,
            what,
            reason,
            advice,
        )
        return fallback
    if downloading:  # torch.hub has checked the prefix; the full hash is recorded (and pinned, if asked)
        digest = files.verify_file(cached, sha256=sha256) or file_sha256(cached)
    return state, digest


def _load_named(
    net: nn.Module,
    arch: str,
    name: str,
    require_pretrained: bool,
    hub_dir: Path | None,
    sha256: str | None,
    pixel_dtype: str | None,
) -> WeightsInfo:
    """A named domain backbone: checked against ``arch`` and the band count before anything is fetched,
    then loaded as torchvision weights are, with the preprocessing torchgeo publishes for it."""
    spec = backbones.spec(name)
    if spec.named.arch != arch:
        raise files.WeightsError(
            f"model.weights: {name} is a {spec.named.arch} backbone, but model.arch is {arch}; "
            f"set model.arch: {spec.named.arch}"
        )
    bands = net.get_parameter(files.FIRST_CONV).shape[1]
    if bands != spec.in_channels and spec.in_channels != 3:
        raise files.WeightsError(
            f"model.weights: {name} was trained on {spec.in_channels} bands ({', '.join(spec.bands)}), "
            f"this data set has {bands}; give it {spec.in_channels}-band images in that order "
            "(data.channels: keep), or pick an RGB backbone, which adapts to any band count"
        )
    obtained = _obtain(
        spec.url,
        f"{name} ({spec.named.enum} in torchgeo)",
        f"--weights {name}",
        requested=name,
        require_pretrained=require_pretrained,
        hub_dir=hub_dir,
        sha256=sha256,
    )
    if isinstance(obtained, WeightsInfo):
        return obtained
    state, digest = obtained
    files.load_into(net, state, spec.url)  # an RGB first convolution is adapted to other band counts here
    mean, std = backbones.statistics_for(spec.mean, spec.std, spec.named.value_range, pixel_dtype)
    mean, std = files.adapt_statistics(mean, std, bands)
    return WeightsInfo(
        requested=name,
        source=spec.url,
        pretrained=True,
        mean=tuple(mean),
        std=tuple(std),
        in_channels=spec.in_channels,
        sha256=digest,
        bands=spec.bands,
        value_range=spec.named.value_range,
    )


def _pretrain_backbone(folder: Path | None) -> transfer.Backbone:
    """The pretrain stage's backbone, with its normalization and band count, named by what made it."""
    if folder is None or not (folder / PRETRAIN_BACKBONE).is_file():
        raise files.WeightsError(
            f"model.weights: pretrain needs the pretrain stage's backbone ({folder}/{PRETRAIN_BACKBONE}); set "
            "pretrain.method: simclr or byol (with an unlabelled pool: data.unlabelled) and run dvc repro"
        )
    record = Pretrained.read(folder)
    backbone = transfer.read_checkpoint(folder / PRETRAIN_BACKBONE)
    what = f"pretrain stage: {record.method}, {record.epochs} epochs on {record.images} images ({folder})"
    return dataclasses.replace(backbone, source=what)
