"""Pretrained weights: resolve ``model.weights``, fetch or read them, load them into a fresh network.

``imagenet`` resolves to the architecture's default torchvision weights, downloaded through
``torch.hub`` into ``$TORCH_HOME/hub/checkpoints`` (a file already there is used offline). When they
cannot be obtained the run falls back to random initialization, loudly, and says so in what it
returns so the stages can record it; ``require_pretrained`` turns the fallback into an error.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

HEAD_PREFIX = "fc."
FIRST_CONV = "conv1.weight"
DOWNLOAD_TIMEOUT_S = 60


class WeightsError(PipelineError, RuntimeError):
    """Weights could not be obtained or do not fit the architecture."""


@dataclass(frozen=True)
class WeightsInfo:
    """What was actually loaded; recorded on the MLflow run, the metrics file and the report."""

    requested: str
    source: str  # URL or file the tensors came from, or "random-init"
    pretrained: bool
    fallback_reason: str | None = None


def imagenet_url(arch: str) -> str:
    """URL of torchvision's default weights for ``arch``."""
    return torchvision.models.get_model_weights(arch).DEFAULT.url


def fetch(url: str, hub_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Download (or reuse the cached copy of) a torchvision checkpoint, verifying its hash suffix."""
    model_dir = str(hub_dir) if hub_dir else None
    # torch.hub opens the URL without a timeout; behind a silent firewall that would hang forever.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=model_dir, progress=False,
                                                  check_hash=True, weights_only=True)
    finally:
        socket.setdefaulttimeout(previous)


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
    head_mismatch = [k for k in state if k.startswith(HEAD_PREFIX) and k in own and state[k].shape != own[k].shape]
    result = net.load_state_dict({k: v for k, v in state.items() if k not in head_mismatch}, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(HEAD_PREFIX)]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{source}: weights do not fit this architecture; missing keys {missing[:8]}, "
                           f"unexpected keys {result.unexpected_keys[:8]} (only '{HEAD_PREFIX}*' may differ)")


def load_pretrained(net: nn.Module, arch: str, weights: str, *, require_pretrained: bool,
                    hub_dir: Path | None = None) -> WeightsInfo:
    """Put the requested weights into ``net`` (a freshly built ``arch``) and say what happened."""
    if weights == "none":
        return WeightsInfo(requested=weights, source="random-init", pretrained=False)
    if weights != "imagenet":
        path = Path(weights)
        load_into(net, read(path), str(path))
        return WeightsInfo(requested=weights, source=str(path), pretrained=True)

    url = imagenet_url(arch)
    try:
        state = fetch(url, hub_dir)
    except (URLError, OSError, RuntimeError) as err:
        where = Path(hub_dir or Path(torch.hub.get_dir()) / "checkpoints") / Path(url).name
        advice = (f"pre-seed the file at {where} (set TORCH_HOME to move it), or point model.weights "
                  f"at a local .pth state dict")
        if require_pretrained:
            raise WeightsError(f"ImageNet weights for {arch} could not be obtained from {url} ({err}); "
                               f"model.require_pretrained is true: {advice}") from err
        reason = f"download of {url} failed: {err}"
        log.warning("\n" + "!" * 78 + "\n!! PRETRAINED WEIGHTS UNAVAILABLE - training %s from RANDOM INIT.\n"
                    "!! %s\n!! To fix: %s\n" + "!" * 78, arch, reason, advice)
        return WeightsInfo(requested=weights, source="random-init", pretrained=False, fallback_reason=reason)
    load_into(net, state, url)
    return WeightsInfo(requested=weights, source=url, pretrained=True)
