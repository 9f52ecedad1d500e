import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from pipeline.training import pretrained, weights
from pipeline.training.model import build_network


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """A resnet18 state dict (1000-class head, as torchvision ships) saved under its hash-suffixed name;
    built and saved once per module (45 MB), read-only to the tests."""
    tmp_path = tmp_path_factory.mktemp("weights")
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
    info = pretrained.load_pretrained(net, "resnet18", str(path), require_pretrained=True)
    assert info.pretrained and info.source == str(path)
    assert_backbone_equal(net, state)


def test_imagenet_download_path_through_torch_hub(saved_state, served, tmp_path, monkeypatch):
    state, _ = saved_state
    monkeypatch.setattr(weights, "imagenet_url", lambda arch, name="imagenet": served)
    net = build_network("resnet18", 3)
    info = pretrained.load_pretrained(
        net, "resnet18", "imagenet", require_pretrained=True, hub_dir=tmp_path / "hub"
    )
    assert info.pretrained and info.source == served
    assert (tmp_path / "hub" / Path(served).name).is_file()  # cached for offline reuse
    assert_backbone_equal(net, state)


def test_unreachable_weights_fall_back_loudly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(
        weights, "imagenet_url", lambda arch, name="imagenet": "http://127.0.0.1:9/resnet18-00000000.pth"
    )
    net = build_network("resnet18", 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    info = pretrained.load_pretrained(net, "resnet18", "imagenet", require_pretrained=False, hub_dir=tmp_path)
    assert not info.pretrained and info.source == "random-init" and "127.0.0.1:9" in info.fallback_reason
    assert "RANDOM INIT" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_require_pretrained_turns_the_fallback_into_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(
        weights, "imagenet_url", lambda arch, name="imagenet": "http://127.0.0.1:9/resnet18-00000000.pth"
    )
    with pytest.raises(weights.WeightsError) as err:
        pretrained.load_pretrained(
            build_network("resnet18", 3), "resnet18", "imagenet", require_pretrained=True, hub_dir=tmp_path
        )
    assert "resnet18-00000000.pth" in str(err.value) and "model.weights" in str(err.value)


def test_weights_for_another_architecture_name_the_keys(saved_state):
    _, path = saved_state
    with pytest.raises(weights.WeightsError, match="missing keys"):
        pretrained.load_pretrained(
            build_network("resnet34", 3), "resnet34", str(path), require_pretrained=True
        )


def test_none_and_missing_file():
    net = build_network("resnet18", 3)
    assert not pretrained.load_pretrained(net, "resnet18", "none", require_pretrained=True).pretrained
    with pytest.raises(weights.WeightsError, match="not found"):
        pretrained.load_pretrained(net, "resnet18", "nowhere.pth", require_pretrained=False)


def test_imagenet_url_is_torchvisions():
    assert weights.imagenet_url("resnet50").startswith("https://download.pytorch.org/models/resnet50-")


@pytest.mark.parametrize("bands", [1, 6])
def test_adapted_first_conv_keeps_the_pretrained_response(saved_state, bands):
    _, path = saved_state
    net = build_network("resnet18", 3, in_channels=bands)
    pretrained.load_pretrained(net, "resnet18", str(path), require_pretrained=True)
    assert net.conv1.weight.shape[1] == bands
    rgb = build_network("resnet18", 3)
    pretrained.load_pretrained(rgb, "resnet18", str(path), require_pretrained=True)
    rgb.fc, net.fc = torch.nn.Identity(), torch.nn.Identity()
    rgb.eval(), net.eval()
    gray = torch.rand(2, 1, 32, 32)
    # An image whose bands are all equal gets the pretrained RGB network's features for the replicated image.
    with torch.no_grad():
        assert torch.allclose(net(gray.repeat(1, bands, 1, 1)), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-4)


def test_n_band_first_conv_spreads_the_rgb_kernels(saved_state):
    state, path = saved_state
    net = build_network("resnet18", 3, in_channels=13)
    pretrained.load_pretrained(net, "resnet18", str(path), require_pretrained=True)
    rgb = state["conv1.weight"]
    assert torch.allclose(net.conv1.weight[:, 3], rgb[:, 0] * 3 / 13)
    assert torch.allclose(net.conv1.weight[:, 12], rgb[:, 0] * 3 / 13)
    assert torch.allclose(net.conv1.weight[:, 5], rgb[:, 2] * 3 / 13)


def test_sha256_accepts_the_right_file_and_rejects_another(saved_state, tmp_path):
    state, path = saved_state
    right = hashlib.sha256(path.read_bytes()).hexdigest()
    net = build_network("resnet18", 3)
    assert pretrained.load_pretrained(
        net, "resnet18", str(path), require_pretrained=True, sha256=right
    ).pretrained
    other = tmp_path / "other.pth"
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, other)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(weights.WeightsError, match="SHA-256") as err:
        pretrained.load_pretrained(net, "resnet18", str(other), require_pretrained=True, sha256=right)
    assert str(other) in str(err.value) and "model.weights_sha256" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing loaded


def test_sha256_also_checks_the_downloaded_checkpoint(saved_state, served, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "imagenet_url", lambda arch, name="imagenet": served)
    with pytest.raises(weights.WeightsError, match="SHA-256"):
        pretrained.load_pretrained(
            build_network("resnet18", 3),
            "resnet18",
            "imagenet",
            require_pretrained=True,
            hub_dir=tmp_path / "hub",
            sha256="0" * 64,
        )


def test_weight_enum_names_resolve_and_must_fit_the_arch():
    assert weights.imagenet_url("resnet50", "ResNet50_Weights.IMAGENET1K_V2").endswith(
        "resnet50-11ad3fa6.pth"
    )
    assert weights.imagenet_url("resnet50", "imagenet") == weights.imagenet_url(
        "resnet50", "ResNet50_Weights.DEFAULT"
    )
    with pytest.raises(weights.WeightsError, match=r"another architecture.*ResNet18_Weights.IMAGENET1K_V1"):
        weights.weight_enum("resnet18", "ResNet50_Weights.IMAGENET1K_V2")
    with pytest.raises(weights.WeightsError, match=r"ResNet50_Weights.IMAGENET1K_V9.*IMAGENET1K_V2"):
        weights.weight_enum("resnet50", "ResNet50_Weights.IMAGENET1K_V9")


def test_enum_name_downloads_through_torch_hub(saved_state, served, tmp_path, monkeypatch):
    state, _ = saved_state
    asked = []
    monkeypatch.setattr(weights, "imagenet_url", lambda arch, name="imagenet": asked.append(name) or served)
    net = build_network("resnet18", 3)
    info = pretrained.load_pretrained(
        net, "resnet18", "ResNet18_Weights.IMAGENET1K_V1", require_pretrained=True, hub_dir=tmp_path / "hub"
    )
    assert asked == ["ResNet18_Weights.IMAGENET1K_V1"] and info.pretrained
    assert_backbone_equal(net, state)


class _Enum:
    """Stands in for a torchvision weight enum whose URL names our test file's hash."""

    def __init__(self, path):
        self.url = f"http://127.0.0.1:9/models/{path.name}"  # never fetched: only its file name counts
        self.meta = {"categories": list(range(1000))}

    def __str__(self):
        return "ResNet18_Weights.TEST"


def test_weights_import_checks_hash_and_keys_and_places_the_file(saved_state, tmp_path, monkeypatch):
    state, path = saved_state
    monkeypatch.setattr(weights, "weight_enum", lambda arch, name="imagenet": _Enum(path))
    placed = weights.import_checkpoint(path, "resnet18", hub_dir=tmp_path / "hub")
    assert placed == tmp_path / "hub" / path.name and placed.read_bytes() == path.read_bytes()
    # An offline run now finds it where torch.hub looks, without any network.
    monkeypatch.setattr(
        weights, "imagenet_url", lambda arch, name="imagenet": f"http://127.0.0.1:9/{path.name}"
    )
    net = build_network("resnet18", 3)
    assert pretrained.load_pretrained(
        net, "resnet18", "imagenet", require_pretrained=True, hub_dir=tmp_path / "hub"
    ).pretrained
    assert_backbone_equal(net, state)

    corrupt = tmp_path / "dl" / path.name
    corrupt.parent.mkdir()
    corrupt.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(weights.WeightsError, match="interrupted download") as refused:
        weights.import_checkpoint(corrupt, "resnet18", hub_dir=tmp_path / "hub2")
    assert "weights import" not in str(refused.value)  # not advice to run the command that just refused it
    assert not (tmp_path / "hub2" / path.name).exists()


def test_weights_import_rejects_another_architectures_file(tmp_path, monkeypatch):
    tmp = tmp_path / "w.pth"
    torch.save(build_network("resnet34", 1000).state_dict(), tmp)
    named = tmp.rename(tmp_path / f"resnet18-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth")
    monkeypatch.setattr(weights, "weight_enum", lambda arch, name="imagenet": _Enum(named))
    with pytest.raises(weights.WeightsError, match="keys or shapes do not match resnet18"):
        weights.import_checkpoint(named, "resnet18", hub_dir=tmp_path / "hub")


def test_weights_import_command(saved_state, tmp_path, monkeypatch, capsys):
    from pipeline.__main__ import main

    _, path = saved_state
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights, "weight_enum", lambda arch, name="imagenet": _Enum(path))
    params = tmp_path / "params.yaml"
    params.write_text("model: {arch: resnet18}\n")
    assert main(["weights", "import", str(path), "--arch", "resnet18", "--params", str(params)]) == 0
    assert (tmp_path / "torch" / "hub" / "checkpoints" / path.name).is_file()
    assert main(["weights", "import", str(tmp_path / "missing.pth"), "--params", str(params)]) == 2
    assert "missing.pth" in capsys.readouterr().err


def test_a_wrong_file_copied_into_the_hub_folder_by_hand_is_refused(saved_state, tmp_path, monkeypatch):
    _, path = saved_state
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / path.name).write_bytes(path.read_bytes()[:-10] + b"0123456789")  # torch reads it; the hash differs
    monkeypatch.setattr(
        weights, "imagenet_url", lambda arch, name="imagenet": f"http://127.0.0.1:9/{path.name}"
    )
    with pytest.raises(weights.WeightsError, match="corrupt or another checkpoint"):
        pretrained.load_pretrained(
            build_network("resnet18", 3), "resnet18", "imagenet", require_pretrained=False, hub_dir=hub
        )


def test_an_unavailable_download_is_announced_once_per_process(tmp_path, monkeypatch, caplog, capsys):
    from urllib.error import URLError

    def offline(url, dst, hash_prefix=None, progress=True):
        raise URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(
        weights, "imagenet_url", lambda arch, name="imagenet": "http://127.0.0.1:9/resnet18-00000000.pth"
    )
    monkeypatch.setattr(pretrained, "_FAILED", set())
    for _ in range(3):  # three tune trials
        info = pretrained.load_pretrained(
            build_network("resnet18", 2),
            "resnet18",
            "imagenet",
            require_pretrained=False,
            hub_dir=tmp_path / "hub",
        )
        assert not info.pretrained and "Name or service not known" in info.fallback_reason
    banners = [r for r in caplog.records if "PRETRAINED WEIGHTS UNAVAILABLE" in r.getMessage()]
    assert len(banners) == 1 and banners[0].levelname == "WARNING"
    assert "Downloading" not in capsys.readouterr().out  # torch.hub's line before each failing try


def test_a_url_is_refused_as_a_url_and_its_password_never_shown():
    # pathlib would collapse 'https://' into 'https:/', and the redaction would no longer see a URI.
    net = build_network("resnet18", 3)
    with pytest.raises(weights.WeightsError, match="is a URL") as err:
        pretrained.load_pretrained(
            net, "resnet18", "https://u:hunter2@example.org/w.pth", require_pretrained=False
        )
    assert "hunter2" not in str(err.value) and "https://u:***@example.org/w.pth" in str(err.value)


# --- data.image_size: auto -----------------------------------------------------------------------------------


def test_auto_image_size_is_224_for_imagenet_weights_that_load(served, tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "imagenet_url", lambda arch, name="imagenet": served)
    size = pretrained.native_size("resnet18", "imagenet", require_pretrained=True, hub_dir=tmp_path / "hub")
    assert size == 224
    assert (tmp_path / "hub" / Path(served).name).is_file()  # obtained once, where training reads it
    # the pretrain stage's size follows what pretraining starts from
    assert (
        pretrained.native_size(
            "resnet18",
            "pretrain",
            require_pretrained=True,
            hub_dir=tmp_path / "hub",
            pretrain_weights="imagenet",
        )
        == 224
    )
    assert pretrained.native_size("resnet18", "pretrain", require_pretrained=False) is None


def test_auto_image_size_is_none_when_imagenet_weights_fall_back(tmp_path, monkeypatch):
    monkeypatch.setattr(
        weights, "imagenet_url", lambda arch, name="imagenet": "http://127.0.0.1:9/resnet18-00000000.pth"
    )
    assert pretrained.native_size("resnet18", "imagenet", require_pretrained=False, hub_dir=tmp_path) is None
    assert pretrained.native_size("resnet18", "none", require_pretrained=False) is None
    with pytest.raises(weights.WeightsError, match="require_pretrained"):
        pretrained.native_size("resnet18", "imagenet", require_pretrained=True, hub_dir=tmp_path)
