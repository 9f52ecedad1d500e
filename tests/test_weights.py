import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from pipeline import weights
from pipeline.model import build_network


@pytest.fixture
def saved_state(tmp_path):
    """A resnet18 state dict (1000-class head, as torchvision ships) saved under its hash-suffixed name."""
    state = build_network("resnet18", 1000).state_dict()
    tmp = tmp_path / "w.pth"
    torch.save(state, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = tmp.rename(tmp_path / f"resnet18-{sha[:8]}.pth")
    return state, path


@pytest.fixture
def served(saved_state):
    """Serve the checkpoint's folder over HTTP on 127.0.0.1; yield its URL."""
    _, path = saved_state
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/{path.name}"
    server.shutdown()


def assert_backbone_equal(net, state):
    own = net.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], value), key


def test_local_file_loads_exactly(saved_state):
    state, path = saved_state
    net = build_network("resnet18", 3)
    info = weights.load_pretrained(net, "resnet18", str(path), require_pretrained=True)
    assert info.pretrained and info.source == str(path)
    assert_backbone_equal(net, state)


def test_imagenet_download_path_through_torch_hub(saved_state, served, tmp_path, monkeypatch):
    state, _ = saved_state
    monkeypatch.setattr(weights, "imagenet_url", lambda arch: served)
    net = build_network("resnet18", 3)
    info = weights.load_pretrained(net, "resnet18", "imagenet", require_pretrained=True, hub_dir=tmp_path / "hub")
    assert info.pretrained and info.source == served
    assert (tmp_path / "hub" / Path(served).name).is_file()  # cached for offline reuse
    assert_backbone_equal(net, state)


def test_unreachable_weights_fall_back_loudly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(weights, "imagenet_url", lambda arch: "http://127.0.0.1:9/resnet18-00000000.pth")
    net = build_network("resnet18", 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    info = weights.load_pretrained(net, "resnet18", "imagenet", require_pretrained=False, hub_dir=tmp_path)
    assert not info.pretrained and info.source == "random-init" and "127.0.0.1:9" in info.fallback_reason
    assert "RANDOM INIT" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_require_pretrained_turns_the_fallback_into_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "imagenet_url", lambda arch: "http://127.0.0.1:9/resnet18-00000000.pth")
    with pytest.raises(weights.WeightsError) as err:
        weights.load_pretrained(build_network("resnet18", 3), "resnet18", "imagenet", require_pretrained=True,
                                hub_dir=tmp_path)
    assert "resnet18-00000000.pth" in str(err.value) and "model.weights" in str(err.value)


def test_weights_for_another_architecture_name_the_keys(saved_state):
    _, path = saved_state
    with pytest.raises(weights.WeightsError, match="missing keys"):
        weights.load_pretrained(build_network("resnet34", 3), "resnet34", str(path), require_pretrained=True)


def test_none_and_missing_file():
    net = build_network("resnet18", 3)
    assert not weights.load_pretrained(net, "resnet18", "none", require_pretrained=True).pretrained
    with pytest.raises(weights.WeightsError, match="not found"):
        weights.load_pretrained(net, "resnet18", "nowhere.pth", require_pretrained=False)


def test_imagenet_url_is_torchvisions():
    assert weights.imagenet_url("resnet50").startswith("https://download.pytorch.org/models/resnet50-")


@pytest.mark.parametrize("bands", [1, 6])
def test_adapted_first_conv_keeps_the_pretrained_response(saved_state, bands):
    state, path = saved_state
    net = build_network("resnet18", 3, in_channels=bands)
    weights.load_pretrained(net, "resnet18", str(path), require_pretrained=True)
    assert net.conv1.weight.shape[1] == bands
    rgb = build_network("resnet18", 3)
    weights.load_pretrained(rgb, "resnet18", str(path), require_pretrained=True)
    rgb.fc, net.fc = torch.nn.Identity(), torch.nn.Identity()
    rgb.eval(), net.eval()
    gray = torch.rand(2, 1, 32, 32)
    # An image whose bands are all equal gets the pretrained RGB network's features for the replicated image.
    with torch.no_grad():
        assert torch.allclose(net(gray.repeat(1, bands, 1, 1)), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-4)


def test_n_band_first_conv_spreads_the_rgb_kernels(saved_state):
    state, path = saved_state
    net = build_network("resnet18", 3, in_channels=13)
    weights.load_pretrained(net, "resnet18", str(path), require_pretrained=True)
    rgb = state["conv1.weight"]
    assert torch.allclose(net.conv1.weight[:, 3], rgb[:, 0] * 3 / 13)
    assert torch.allclose(net.conv1.weight[:, 12], rgb[:, 0] * 3 / 13)
    assert torch.allclose(net.conv1.weight[:, 5], rgb[:, 2] * 3 / 13)
