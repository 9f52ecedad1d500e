"""Pretrained weights: resolve ``model.weights``, fetch or read them, load them into a fresh network.

``imagenet`` resolves to the architecture's default torchvision weights, downloaded through
``torch.hub`` into ``$TORCH_HOME/hub/checkpoints`` (a file already there is used offline). When they
cannot be obtained the run falls back to random initialization, loudly, and says so in what it
returns so the stages can record it; ``require_pretrained`` turns the fallback into an error. A named
domain backbone (:mod:`pipeline.backbones`, through torchgeo's enums) is fetched, cached, imported and
falls back the same way, and brings the preprocessing it was trained with.
"""

from __future__ import annotations

import logging
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn
from torch.hub import HASH_REGEX  # <arch>-<sha256 prefix>.pth, as torch.hub checks it

from pipeline import backbones
from pipeline.credentials import redact
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_file, file_sha256
from pipeline.model import build_network

log = logging.getLogger(__name__)

HEAD_PREFIX = "fc."
FIRST_CONV = "conv1.weight"
DOWNLOAD_TIMEOUT_S = 60
# URLs whose download failed in this process: the random-init banner is shown once, not once per tune trial.
_FAILED: set[str] = set()


class WeightsError(PipelineError, RuntimeError):
    """Weights could not be obtained or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsInfo:
    """What was actually loaded; recorded on the MLflow run, the metrics file and the report."""

    requested: str
    source: str  # URL or file the tensors came from, or "random-init"
    pretrained: bool
    fallback_reason: str | None = None
    # Weights that bring their own input statistics (an earlier run, a domain backbone): the normalization
    # the model must use, the band count the weights were trained on, the classes of the head they had.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    in_channels: int | None = None
    source_classes: tuple[str, ...] | None = None
    # The full SHA-256 of the file the tensors were read from (checked against the publisher's prefix).
    sha256: str | None = None
    # A named domain backbone's preprocessing: the bands in the order it expects them, and the raw value
    # its scaling maps to 1 (mean/std above apply to ``raw / value_range``, adapted to the pixel dtype).
    bands: tuple[str, ...] | None = None
    value_range: float | None = None

    def preprocessing_tags(self) -> dict[str, str]:
        """MLflow tags for what the run started from beyond its source: the file's SHA-256 and, for weights
        that bring their preprocessing, the bands, value range and mean/std the model normalizes with."""
        tags = {"weights.sha256": self.sha256} if self.sha256 else {}
        if self.bands:
            tags["weights.bands"] = ",".join(self.bands)
        if self.value_range is not None:
            tags["weights.value_range"] = f"{self.value_range:g}"
        if self.mean is not None and self.std is not None:
            tags["weights.mean"] = ",".join(f"{v:.6g}" for v in self.mean)
            tags["weights.std"] = ",".join(f"{v:.6g}" for v in self.std)
        return tags


def weight_enum(arch: str, name: str = "imagenet") -> torchvision.models.WeightsEnum:
    """torchvision's weights for ``arch``: its default for 'imagenet', else the enum named like
    ``ResNet50_Weights.IMAGENET1K_V2``, which must belong to ``arch``."""
    available = torchvision.models.get_model_weights(arch)
    if name == "imagenet":
        return available.DEFAULT
    choices = ", ".join(str(w) for w in available)
    try:
        enum = torchvision.models.get_weight(name)
    except (KeyError, ValueError) as err:
        raise WeightsError(
            f"model.weights: '{name}' is not a torchvision weight name; for {arch}: {choices}"
        ) from err
    if type(enum) is not available:
        raise WeightsError(
            f"model.weights: {name} are weights for another architecture than model.arch={arch}; "
            f"for {arch}: {choices}"
        )
    return enum


def is_enum_name(weights: str) -> bool:
    """``ResNet50_Weights.IMAGENET1K_V2``-like (a path has a separator or a .pth suffix)."""
    return "_Weights." in weights and not weights.endswith((".pth", ".pt")) and "/" not in weights


def imagenet_url(arch: str, name: str = "imagenet") -> str:
    """URL of torchvision's weights ``name`` ('imagenet': the default) for ``arch``."""
    return weight_enum(arch, name).url


def verify_file(path: Path, *, url: str | None = None, sha256: str | None = None) -> str | None:
    """Refuse a weights file whose SHA-256 (computed once) is not ``sha256`` (``model.weights_sha256``), or
    does not start with the prefix torchvision puts in the name of ``url`` (``<arch>-<sha256 prefix>.pth``;
    torch.hub checks it only while downloading, so a file copied into the hub folder by hand is checked here).
    Returns the SHA-256 when it was computed."""
    match = HASH_REGEX.search(Path(url).name) if url else None
    if sha256 is None and match is None:
        return None
    actual = file_sha256(path)
    if match is not None and not actual.startswith(match.group(1)):
        raise WeightsError(
            f"{path}: SHA-256 {actual[:16]}... is not that of {url} (its hash starts {match.group(1)}); "
            "the file is corrupt or another checkpoint: delete it, or check a download with "
            "`python -m pipeline weights import FILE`"
        )
    if sha256 is not None and actual != sha256.lower():
        raise WeightsError(
            f"{path}: SHA-256 is {actual}, but model.weights_sha256 is {sha256.lower()}; "
            "the file is not the one the params name (corrupt, truncated or replaced)"
        )
    return actual


def hub_checkpoint(url: str, hub_dir: Path | None = None) -> Path:
    """Where torch.hub keeps (and looks for) the download of ``url``."""
    return Path(hub_dir or Path(torch.hub.get_dir()) / "checkpoints") / Path(url).name


def fetch(url: str, hub_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Download (or reuse the cached copy of) a torchvision checkpoint, verifying its hash suffix.

    What ``torch.hub.load_state_dict_from_url`` does, minus the "Downloading: ..." line it prints before
    every attempt (offline, once per tune trial, each followed by the failure): downloaded through
    ``download_url_to_file`` (to a temporary file, checked, then moved into place) and logged once done.
    """
    target = hub_checkpoint(url, hub_dir)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        match = HASH_REGEX.search(target.name)
        # torch.hub opens the URL without a timeout; behind a silent firewall that would hang forever.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(
                url, str(target), match.group(1) if match else None, progress=False
            )
        finally:
            socket.setdefaulttimeout(previous)
        log.info("downloaded %s -> %s", url, target)
    return torch.load(target, map_location="cpu", weights_only=True)


def read(path: Path) -> dict[str, torch.Tensor]:
    """Read a local state dict safely (tensors only, no pickled code)."""
    if not path.is_file():
        raise WeightsError(f"model.weights: file '{path}' not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightsError(f"model.weights: '{path}' does not hold a state dict")
    return state


def adapt_first_conv(kernel: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Pretrained RGB first-layer kernels (out, 3, k, k) for ``in_channels`` bands, instead of a random layer.

    Grayscale sums the three kernels, so a gray image gives exactly the response the RGB network gives
    to that image replicated to three channels. N bands cycle through R, G, B and scale by 3/N (as
    timm's ``adapt_input_conv`` does), which keeps the layer's overall response to equal bands in the
    same range (exactly the same when N is a multiple of 3).
    """
    if in_channels == 1:
        return kernel.sum(dim=1, keepdim=True)
    return kernel[:, [i % 3 for i in range(in_channels)]] * (3.0 / in_channels)


def load_into(net: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``net``; only the replaced head (``fc.*``) may be missing or differ.

    A first convolution with another band count than the checkpoint's RGB is adapted, not re-initialized.
    """
    own = net.state_dict()
    conv = state.get(FIRST_CONV)
    if conv is not None and FIRST_CONV in own and conv.shape[1] == 3 and own[FIRST_CONV].shape[1] != 3:
        state = state | {FIRST_CONV: adapt_first_conv(conv, own[FIRST_CONV].shape[1])}
    head_mismatch = [
        k for k in state if k.startswith(HEAD_PREFIX) and k in own and state[k].shape != own[k].shape
    ]
    result = net.load_state_dict({k: v for k, v in state.items() if k not in head_mismatch}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"{source}: weights do not fit this architecture; missing keys {missing[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]} (only '{HEAD_PREFIX}*' may differ)"
        )


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
) -> WeightsInfo:
    """Put the requested weights into ``net`` (a freshly built ``arch``) and say what happened.

    ``sha256``: the weights file must have this hash (checked before it is read). ``tracking_uri``
    (``mlflow.tracking_uri``): where ``runs:/`` and ``models:/`` weights are looked up when no stage has
    pointed MLflow at a store. ``pixel_dtype`` (the pixel cache's, e.g. 'uint16'): how a named domain
    backbone's value range maps onto the pixels (:func:`backbones.statistics_for`).
    """
    if weights == "none":
        return WeightsInfo(requested=weights, source="random-init", pretrained=False)
    from pipeline import transfer  # imported here: it builds on this module

    if transfer.is_run_source(weights):
        return transfer.load_backbone(
            net, arch, transfer.resolve(weights, tracking_uri=tracking_uri, sha256=sha256), weights
        )
    if weights in backbones.NAMED:
        return _load_named(net, arch, weights, require_pretrained, hub_dir, sha256, pixel_dtype)
    if weights != "imagenet" and not is_enum_name(weights):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", weights):  # Path would collapse it into a missing file
            raise WeightsError(
                f"model.weights: '{redact(weights)}' is a URL, which is not downloaded: download the file, "
                "then point model.weights at it (or `python -m pipeline weights import FILE`)"
            )
        path = Path(weights)
        digest = verify_file(path, sha256=sha256) if path.is_file() else None
        load_into(net, read(path), weights)
        return WeightsInfo(requested=weights, source=str(path), pretrained=True, sha256=digest)

    url = imagenet_url(arch, weights)
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
    load_into(net, state, url)
    return WeightsInfo(requested=weights, source=url, pretrained=True, sha256=digest)


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
    cached = hub_checkpoint(url, hub_dir)
    downloading = not cached.is_file()
    digest = None if downloading else verify_file(cached, url=url, sha256=sha256)  # before torch reads it
    try:
        state = fetch(url, hub_dir)
    except (URLError, OSError, RuntimeError) as err:
        advice = (
            f"pre-seed the file at {cached} (`python -m pipeline weights import FILE "
            f"{import_args}` puts it there; set TORCH_HOME to move it), or point model.weights at a local "
            f".pth state dict"
        )
        if require_pretrained:
            raise WeightsError(
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
        digest = verify_file(cached, sha256=sha256) or file_sha256(cached)
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
        raise WeightsError(
            f"model.weights: {name} is a {spec.named.arch} backbone, but model.arch is {arch}; "
            f"set model.arch: {spec.named.arch}"
        )
    bands = net.get_parameter(FIRST_CONV).shape[1]
    if bands != spec.in_channels and spec.in_channels != 3:
        raise WeightsError(
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
    load_into(net, state, spec.url)  # an RGB first convolution is adapted to other band counts here
    mean, std = backbones.statistics_for(spec.mean, spec.std, spec.named.value_range, pixel_dtype)
    mean, std = adapt_statistics(mean, std, bands)
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


def adapt_statistics(mean, std, in_channels: int) -> tuple[list[float], list[float]]:
    """RGB mean/std for ``in_channels`` bands, as :func:`adapt_first_conv` adapts the kernels: one band
    takes the average, N bands cycle through the three. Other band counts pass through."""
    if len(mean) != 3 or in_channels == 3:
        return list(mean), list(std)
    if in_channels == 1:
        return [sum(mean) / 3], [sum(std) / 3]
    return [mean[i % 3] for i in range(in_channels)], [std[i % 3] for i in range(in_channels)]


def import_checkpoint(file: Path, arch: str, name: str = "imagenet", hub_dir: Path | None = None) -> Path:
    """Check a downloaded checkpoint and put it where offline runs find it.

    For air-gapped machines: the file (fetched elsewhere from the URL torchvision, or torchgeo for a named
    domain backbone, would use) must carry the hash the publisher put in the file name of that URL (its
    8-hex prefix) and exactly the keys and shapes of ``arch`` (a domain backbone's ``fc`` head may be
    absent); it is then copied, atomically, to ``$TORCH_HOME/hub/checkpoints/<that name>``, where
    ``model.weights: imagenet`` (or the enum or backbone ``name``) loads it without a download.
    """
    if name in backbones.NAMED:
        spec = backbones.spec(name)
        url, label, arch = spec.url, f"{name} ({spec.named.enum})", spec.named.arch
        own = build_network(arch, 1000, in_channels=spec.in_channels).state_dict()
        optional = {k for k in own if k.startswith(HEAD_PREFIX)}
    else:
        enum = weight_enum(arch, name)
        url, label, optional = enum.url, str(enum), set()
        own = build_network(arch, len(enum.meta["categories"])).state_dict()
    if not file.is_file():
        raise WeightsError(f"{file}: no such file")
    # Checked here, not with verify_file, whose advice is to run this very command.
    match, actual = HASH_REGEX.search(Path(url).name), file_sha256(file)
    if match is not None and not actual.startswith(match.group(1)):
        raise WeightsError(
            f"{file}: not the checkpoint {label} needs: its SHA-256 {actual[:16]}... does not start "
            f"with {match.group(1)}, the hash in the name of {url} (an interrupted download, or "
            "a file for other weights: check --arch and --weights); download that URL again"
        )
    state = read(file)
    wrong = sorted((set(own) - optional - set(state)) | (set(state) - set(own))) + [
        k for k in own if k in state and k not in optional and own[k].shape != state[k].shape
    ]
    if wrong:
        raise WeightsError(f"{file}: keys or shapes do not match {arch}: {wrong[:8]}")
    target = hub_checkpoint(url, hub_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        shutil.copyfile(file, tmp)
    return target
