"""Weights files: torchvision's and torchgeo's names and URLs, fetching into and reading from the
``torch.hub`` cache (``$TORCH_HOME/hub/checkpoints``), checking a file's hash, importing a file fetched
elsewhere (``python -m pipeline weights import``), and fitting a state dict into a network (an RGB first
convolution adapted to other band counts). Which weights a run starts from is decided in
:mod:`pipeline.training.pretrained`.
"""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.hub import HASH_REGEX  # <arch>-<sha256 prefix>.pth, as torch.hub checks it

from pipeline import backbones
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_file, file_sha256
from pipeline.training.model import build_network

log = logging.getLogger(__name__)

HEAD_PREFIX = "fc."
FIRST_CONV = "conv1.weight"
DOWNLOAD_TIMEOUT_S = 60


class WeightsError(PipelineError, RuntimeError):
    """Weights could not be obtained or do not fit the architecture."""


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
