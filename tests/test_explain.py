"""Grad-CAM on a ResNet whose answer is known by construction, and the evaluate stage's panel."""

import argparse
import io

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluation import explain
from pipeline.training.model import Classifier

SIZE, HALF = 64, 32  # at 64 px layer4 is 2x2: one cell per quadrant


def brightness_resnet() -> Classifier:
    """A resnet18 set by hand so that layer4's channel 0 is the local brightness and channel 1 the darkness.

    Every residual branch is zero except in the first block of layer2-4, whose strided conv averages
    each 2x2 block of channels 0 and 1 (so a layer4 cell sees exactly its 32x32 patch of the image);
    the stem does the same from the normalized RGB. 'bright' reads channel 0, 'dark' channel 1, so the
    discriminative region of 'bright' is the bright square and nothing else.
    """
    model = Classifier(num_classes=2, class_names=["dark", "bright"]).eval()
    net = model.net
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
        net.conv1.weight[0, :, 3:5, 3:5] = 1.0 / 12  # stride 2: the mean of each 2x2 block
        net.conv1.weight[1, :, 3:5, 3:5] = -1.0 / 12
        for layer in (net.layer2, net.layer3, net.layer4):
            for c in (0, 1):
                layer[0].conv1.weight[c, c, 1:, 1:] = 0.25
                layer[0].conv2.weight[c, c, 1, 1] = 1.0
        net.fc.weight.zero_()
        net.fc.bias.zero_()
        net.fc.weight[0, 1] = net.fc.weight[1, 0] = 1.0
        net.fc.bias[1] = 2.0  # an image with a bright square is 'bright' (a bias leaves Grad-CAM unchanged)
    return model


def squares(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise images with one bright 14 px square, placed at random inside quadrant i % 4."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, SIZE, SIZE, 3)).astype(np.uint8)
    quadrant = np.arange(n) % 4
    for i, q in enumerate(quadrant):
        r, c = (q // 2) * HALF + rng.integers(2, HALF - 16), (q % 2) * HALF + rng.integers(2, HALF - 16)
        images[i, r : r + 14, c : c + 14] = 230
    return images, quadrant


def share_in_quadrant(maps: np.ndarray, quadrant: np.ndarray) -> np.ndarray:
    return np.array(
        [
            m[(q // 2) * HALF : (q // 2 + 1) * HALF, (q % 2) * HALF : (q % 2 + 1) * HALF].sum() / m.sum()
            for m, q in zip(maps, quadrant, strict=True)
        ]
    )


@pytest.fixture(scope="module")
def model() -> Classifier:
    return brightness_resnet()


def test_grad_cam_puts_the_heat_on_the_bright_square_and_the_other_class_elsewhere(model):
    images, quadrant = squares(4)  # one per quadrant: rows and columns cannot be swapped unnoticed
    bright = explain.grad_cam(model, images, target=1, layer="layer4")
    assert bright.shape == (4, SIZE, SIZE) and bright.dtype == np.float32
    assert bright.min() >= 0 and np.allclose(bright.max(axis=(1, 2)), 1, atol=1e-3)
    # One hot cell of a 2x2 map, upsampled bilinearly, keeps 0.77 of its mass in its quadrant (chance: 0.25).
    assert (share_in_quadrant(bright, quadrant) > 0.7).all()
    dark = explain.grad_cam(
        model, images, target=0, layer="layer4"
    )  # the evidence for 'dark' is everywhere but the square
    assert (share_in_quadrant(dark, quadrant) < 0.2).all()
    predicted = explain.grad_cam(
        model, images, layer="layer4"
    )  # default: each image's predicted class, here 'bright'
    assert model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).argmax(-1).eq(1).all()
    np.testing.assert_allclose(predicted, bright, atol=1e-5)
    per_image = explain.grad_cam(model, images, target=[1, 0] * 2, batch_size=3, layer="layer4")
    np.testing.assert_allclose(per_image[::2], bright[::2], atol=1e-5)
    np.testing.assert_allclose(per_image[1::2], dark[1::2], atol=1e-5)


def test_a_32px_map_cannot_localise_and_says_so(model, caplog):
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="pipeline.evaluation.explain"):
        explain.grad_cam(model, images, layer="layer4")
    assert "single cell" in caplog.text
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        explain.grad_cam(model, images[0])


def test_select_takes_the_most_confident_right_and_wrong_images_per_class():
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7], [0.45, 0.55]])
    assert explain.select(labels, probs, 2) == [[0, 1, 2, None], [3, 4, None, None]]


def test_gradcam_panel_writes_a_captioned_image(model, tmp_path):
    images, _ = squares(6)
    labels = np.array([1, 1, 1, 0, 0, 0])  # the model calls every image 'bright': three right, three wrong
    with torch.no_grad():
        probs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).softmax(-1).numpy()
    shown = explain.gradcam_panel(model, images, labels, probs, ["dark", "bright"], 2, tmp_path / "cam.png")
    assert shown == 4  # 'dark': no right, two wrong; 'bright': two right, none wrong
    from PIL import Image

    with Image.open(tmp_path / "cam.png") as png:
        assert png.size[0] > 500 and png.size[1] > 200


def test_evaluate_stage_writes_logs_and_embeds_the_panel(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    import mlflow

    from pipeline import tracking
    from pipeline.data.ingest import ingest
    from pipeline.data.prepared import load_prepared
    from pipeline.runinfo import MODEL_SHA_TAG
    from pipeline.stages import evaluate as stage
    from tests.conftest import write_class_folders
    from tests.test_evaluation_stage import save_untrained_model, tiny_params

    params = tiny_params(bootstrap=0, tta=[], temperature_scaling=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous_uri = mlflow.get_tracking_uri()
    try:
        write_class_folders(Path(params.paths.raw) / "tiny", per_class=6)
        ingest(Path(params.paths.raw) / "tiny", Path(params.paths.prepared), seed=0, data=params.data)
        tracking.setup(params.mlflow)
        sha = save_untrained_model(params, load_prepared(Path(params.paths.prepared)).classes)
        with mlflow.start_run(tags={"stage": "train", MODEL_SHA_TAG: sha}) as run:
            pass
        stage.main(params, argparse.Namespace())
        panel = Path(params.paths.plots) / explain.PANEL_PNG
        assert panel.stat().st_size > 10_000
        assert (
            f"]({Path(params.paths.plots).name}/{explain.PANEL_PNG})" in Path(params.paths.report).read_text()
        )
        # The evaluation is a run nested under the train run, its files placed as they lie beside the report.
        [child] = mlflow.search_runs(
            filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'", output_format="list"
        )
        logged = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "evaluation/plots")}
        assert f"evaluation/plots/{explain.PANEL_PNG}" in logged
        assert json.loads(Path(params.paths.metrics).read_text())  # the rest of the stage ran as before
    finally:
        mlflow.set_tracking_uri(previous_uri)
    assert (
        explain.panel_png(None, np.zeros((1, 32, 32, 3)), np.zeros(1), np.ones((1, 2)), ["a", "b"], 0) is None
    )


def test_a_map_coarser_than_4x4_is_named_and_the_panel_uses_a_finer_layer(model, caplog):
    assert [explain.layer_for(side) for side in (16, 32, 64, 128, 224)] == [
        "layer1",
        "layer2",
        "layer3",
        "layer4",
        "layer4",
    ]
    assert explain.describe(64, "layer3") == "layer3: a 4x4 map, one cell per 16x16 px, drawn smoothed"
    images, _ = squares(2)  # 64 px: layer4 is 2x2
    with caplog.at_level("WARNING", logger="pipeline.evaluation.explain"):
        explain.grad_cam(model, images, layer="layer4")
    assert (
        "layer4 (layer4: a 2x2 map, one cell per 32x32 px, drawn smoothed) is coarser than 4x4" in caplog.text
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.evaluation.explain"):
        maps = explain.grad_cam(model, images, layer="layer3")
    assert caplog.text == "" and maps.shape == (2, SIZE, SIZE)


def test_notebook_and_report_explain_the_same_layer(model, monkeypatch):
    """Notebook 03 drew layer4 (2x2 at 64 px) while the report's panel drew layer3: one choice, layer_for."""
    import types

    import pandas as pd

    from pipeline import notebook

    used = []
    real = explain._target_layers
    monkeypatch.setattr(explain, "_target_layers", lambda m, layer: used.append(layer) or real(m, layer))
    images, _ = squares(2)
    explain.gradcam_panel(
        model, images, np.array([0, 1]), np.array([[0.4, 0.6]] * 2), ["dark", "bright"], 1, io.BytesIO()
    )
    mistakes = pd.DataFrame(
        {
            "actual": ["dark"],
            "predicted": ["bright"],
            "confidence": [0.6],
            "p_actual": [0.4],
            "cache_index": [0],
        }
    )
    data = types.SimpleNamespace(images=images, classes=["dark", "bright"])
    assert notebook.mistakes_gradcam(model, mistakes, data, n=1).startswith(b"\x89PNG")
    assert used == ["layer3"] * 3 == [explain.layer_for(SIZE)] * 3
