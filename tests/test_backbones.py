"""Named domain backbones (torchgeo's satellite ResNets): served from 127.0.0.1 as small stand-ins with the
real key layout (timm's ResNet, which torchgeo loads them into, without the head), named like the
publisher's files (``<name>-<sha256 prefix>.pth``) with the stand-in's own hash prefix. No network."""

import dataclasses
import functools
import hashlib
import http.server
import logging
import threading
from pathlib import Path

import pytest
import torch

from pipeline import backbones, config
from pipeline.training import pretrained, weights
from pipeline.training.fit import build_model
from pipeline.training.model import build_network

RGB = "ssl4eo_s12_rgb_moco_resnet18"
ALL = "ssl4eo_s12_all_moco_resnet18"


def stand_in(folder: Path, stem: str, in_chans: int = 3, arch: str = "resnet18") -> tuple[dict, Path]:
    """A ResNet state dict with the publisher's key layout (no head), saved as ``<stem>-<its hash>.pth``.

    Small (~70 kB, not 45 MB): every tensor but the first convolution is one value per key expanded to the
    real shape (torch.save keeps the one-element storage), the convolutions' chosen to keep activations in
    range. The first convolution is random, so adapting it to other band counts is visible."""
    torch.manual_seed(0)
    state = {}
    for i, (key, value) in enumerate(build_network(arch, 1000, in_channels=in_chans).state_dict().items()):
        if key.startswith("fc."):
            continue
        if value.dim() == 4 and key != "conv1.weight":
            value = torch.tensor((1 + 0.001 * i) / value[0].numel()).expand_as(value)
        elif value.dim() >= 1 and bool((value == value.flatten()[0]).all()):  # BatchNorm's initial 1s and 0s
            value = value.flatten()[0].clone().expand_as(value)
        state[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "w.pth"
    torch.save(state, tmp)
    return state, tmp.rename(folder / f"{stem}-{hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]}.pth")


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The RGB stand-in served over HTTP on 127.0.0.1; torchgeo's entry points there (all else as published)."""
    state, path = stand_in(tmp_path / "www", "resnet18_sentinel2_rgb_moco")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/{path.name}"
    real = backbones.spec
    monkeypatch.setattr(backbones, "spec", lambda name: dataclasses.replace(real(name), url=url))
    yield state, path, url
    server.shutdown()


def offline(monkeypatch, name_in_url: str = "resnet18_sentinel2_all_moco-00000000.pth") -> str:
    url = f"http://127.0.0.1:9/{name_in_url}"
    real = backbones.spec
    monkeypatch.setattr(backbones, "spec", lambda name: dataclasses.replace(real(name), url=url))
    monkeypatch.setattr(pretrained, "_FAILED", set())
    return url


def assert_backbone_equal(net, state):
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_the_entries_are_torchgeos_with_hash_named_files_and_the_stated_value_range(tmp_path):
    from torchgeo.models import get_weight

    for name, named in backbones.NAMED.items():
        enum, spec = get_weight(named.enum), backbones.spec(name)
        assert spec.url == enum.url and weights.HASH_REGEX.search(Path(spec.url).name), name
        assert named.arch in enum.url and spec.in_channels == len(spec.bands), name
        # value_range is the divisor in torchgeo's own transforms: scaled pixels are what the weights saw.
        assert spec.mean == (0.0,) * spec.in_channels and spec.std == (1.0,) * spec.in_channels, name
    # torchgeo loads these files into timm's ResNets: the stand-in's keys are those (and torchvision's).
    import timm  # already imported by torchgeo.models

    for arch in ("resnet18", "resnet50"):
        published = {
            k for k in timm.create_model(arch, pretrained=False).state_dict() if not k.startswith("fc.")
        }
        assert set(stand_in(tmp_path / arch, "x", arch=arch)[0]) == published


def test_named_backbone_served_on_loopback_loads_checked_and_cached(served, tmp_path):
    state, path, url = served
    net = build_network("resnet18", 4)
    info = pretrained.load_pretrained(
        net, "resnet18", RGB, require_pretrained=True, hub_dir=tmp_path / "hub", pixel_dtype="uint8"
    )
    assert info.pretrained and info.source == url
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the full hash of the file loaded
    assert info.bands == ("B4", "B3", "B2") and info.value_range == 10000 and info.in_channels == 3
    assert info.mean == (0.0,) * 3 and info.std == (1.0,) * 3  # 8-bit pixels: x / 255 is what it saw
    assert_backbone_equal(net, state)
    assert (tmp_path / "hub" / path.name).read_bytes() == path.read_bytes()  # cached for offline runs
    tags = info.preprocessing_tags()
    assert tags["weights.sha256"] == info.sha256 and tags["weights.bands"] == "B4,B3,B2"
    assert (
        tags["weights.value_range"] == "10000" and dataclasses.asdict(info)["bands"] == info.bands
    )  # run.json


def test_the_model_applies_the_value_range_to_16_bit_pixels(served, tmp_path):
    params = config.parse({"model": {"weights": RGB}, "train": {"accelerator": "cpu"}})
    model, _ = build_model(params, ["a", "b"], tmp_path / "hub", ([0.3] * 3, [0.2] * 3), pixel_dtype="uint16")
    assert model.hparams.mean == [0.0] * 3 and model.hparams.std == pytest.approx([10000 / 65535] * 3)
    dn = torch.randint(0, 10000, (2, 3, 32, 32), dtype=torch.int32).to(torch.uint16)  # Sentinel-2 DN
    model.eval(), model.net.eval()
    with torch.no_grad():  # the network sees reflectance, DN / 10000, as the publisher's transform gives it
        assert torch.allclose(model(dn), model.net(dn.float() / 10000), atol=1e-4)


def test_a_corrupt_file_is_refused(served, tmp_path, monkeypatch):
    _, path, url = served
    hub = tmp_path / "hub"
    hub.mkdir()
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    (hub / path.name).write_bytes(bytes(damaged))  # copied in by hand, one byte flipped
    with pytest.raises(weights.WeightsError, match="corrupt or another checkpoint"):
        pretrained.load_pretrained(
            build_network("resnet18", 2), "resnet18", RGB, require_pretrained=False, hub_dir=hub
        )
    # A download whose bytes do not match the hash in its name is refused by torch.hub, and not cached.
    wrong = path.with_name("resnet18_sentinel2_rgb_moco-0badc0de.pth")
    wrong.write_bytes(path.read_bytes())
    real = backbones.spec
    monkeypatch.setattr(
        backbones,
        "spec",
        lambda name: dataclasses.replace(real(name), url=url.replace(path.name, wrong.name)),
    )
    with pytest.raises(weights.WeightsError, match="0badc0de"):
        pretrained.load_pretrained(
            build_network("resnet18", 2), "resnet18", RGB, require_pretrained=True, hub_dir=tmp_path / "hub2"
        )
    assert not (tmp_path / "hub2" / wrong.name).exists()
    monkeypatch.setattr(backbones, "spec", lambda name: dataclasses.replace(real(name), url=url))
    with pytest.raises(weights.WeightsError, match=r"model\.weights_sha256"):  # a pinned hash is checked too
        pretrained.load_pretrained(
            build_network("resnet18", 2),
            "resnet18",
            RGB,
            require_pretrained=True,
            hub_dir=tmp_path / "hub3",
            sha256="0" * 64,
        )


def test_band_count_mismatch_names_both_before_any_download(monkeypatch, tmp_path):
    offline(monkeypatch)
    with pytest.raises(weights.WeightsError, match=r"trained on 13 bands \(B1, B2.*this data set has 3"):
        pretrained.load_pretrained(
            build_network("resnet18", 2), "resnet18", ALL, require_pretrained=True, hub_dir=tmp_path
        )
    assert not tmp_path.joinpath("hub").exists()


def test_an_rgb_backbone_adapts_to_13_bands(served, tmp_path):
    state, _, _ = served
    net = build_network("resnet18", 2, in_channels=13)
    info = pretrained.load_pretrained(net, "resnet18", RGB, require_pretrained=True, hub_dir=tmp_path / "hub")
    assert net.conv1.weight.shape[1] == 13 and torch.allclose(
        net.conv1.weight[:, 3], state["conv1.weight"][:, 0] * 3 / 13
    )
    assert len(info.mean) == len(info.std) == 13 and info.in_channels == 3


def test_offline_falls_back_loudly_or_fails_naming_url_and_cache(monkeypatch, tmp_path, caplog):
    url = offline(monkeypatch, "resnet18_sentinel2_rgb_moco-e3a335e3.pth")
    net = build_network("resnet18", 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        info = pretrained.load_pretrained(net, "resnet18", RGB, require_pretrained=False, hub_dir=tmp_path)
    assert not info.pretrained and info.source == "random-init" and url in info.fallback_reason
    assert "RANDOM INIT" in caplog.text and RGB in caplog.text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(weights.WeightsError) as err:
        pretrained.load_pretrained(net, "resnet18", RGB, require_pretrained=True, hub_dir=tmp_path)
    message = str(err.value)
    assert url in message and str(tmp_path / Path(url).name) in message and f"--weights {RGB}" in message


def test_weights_import_checks_the_named_file_then_runs_load_it_offline(
    served, tmp_path, monkeypatch, capsys
):
    from pipeline.__main__ import main

    state, path, _ = served
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    params = tmp_path / "params.yaml"
    params.write_text("model: {arch: resnet50}\n")  # the named entry's arch wins over model.arch
    assert main(["weights", "import", str(path), "--weights", RGB, "--params", str(params)]) == 0
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert (hub / path.name).read_bytes() == path.read_bytes()
    assert f"model.arch: resnet18, model.weights: {RGB}" in capsys.readouterr().out
    offline(monkeypatch, path.name)  # no server: the imported copy is all there is
    net = build_network("resnet18", 2)
    assert pretrained.load_pretrained(net, "resnet18", RGB, require_pretrained=True, hub_dir=hub).pretrained
    assert_backbone_equal(net, state)

    _, other = stand_in(tmp_path / "other", "resnet18_sentinel2_rgb_moco", in_chans=13)
    offline(monkeypatch, other.name)
    with pytest.raises(
        weights.WeightsError, match=r"keys or shapes do not match resnet18: \['conv1.weight'\]"
    ):
        weights.import_checkpoint(other, "resnet18", RGB, hub_dir=tmp_path / "hub2")
    with pytest.raises(weights.WeightsError, match="interrupted download"):  # not the hash in the URL
        weights.import_checkpoint(path, "resnet18", RGB, hub_dir=tmp_path / "hub2")
    assert not (tmp_path / "hub2").exists()


def test_params_validate_the_name_and_its_arch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config.parse({"model": {"arch": "resnet50", "weights": "satlas_s2_rgb_si_resnet50"}}).model.weights
    with pytest.raises(
        config.ConfigError, match=r"resnet50 backbone, but arch is resnet18; set model\.arch: resnet50"
    ):
        config.parse({"model": {"weights": "ssl4eo_s12_rgb_moco_resnet50"}})
    with pytest.raises(config.ConfigError, match=f"torchgeo's name; write model.weights: {RGB}"):
        config.parse({"model": {"weights": "ResNet18_Weights.SENTINEL2_RGB_MOCO"}})
    with pytest.raises(config.ConfigError, match=f"neither a named backbone.*{RGB}, {ALL}"):
        config.parse({"model": {"weights": "ssl4eo_rgb_resnet18"}})
    (tmp_path / "my_backbone").mkdir()  # a copied run's folder with a snake name is still a folder
    assert config.parse({"model": {"weights": "my_backbone"}}).model.weights == "my_backbone"
