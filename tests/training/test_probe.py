import numpy as np
import pytest
import torch

from pipeline import config
from pipeline.serve import export, predict, shipped
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Classifier, Ensemble, build_network
from pipeline.training.probe import pooled_features
from tests.conftest import run_info


@pytest.fixture
def backbone_file(tmp_path):
    """A resnet18 state dict standing in for pretrained weights (so the frozen modes see 'pretrained')."""
    state = build_network("resnet18", 1000).state_dict()
    torch.save(state, tmp_path / "backbone.pth")
    return state, tmp_path / "backbone.pth"


def frozen_params(tiny_params, path, mode, **train):
    return config.with_overrides(
        tiny_params,
        {"model.weights": str(path), "train.mode": mode, **{f"train.{k}": v for k, v in train.items()}},
    )


def test_linear_probe_leaves_the_backbone_unchanged(tiny_params, prepared, backbone_file, tmp_path):
    state, path = backbone_file
    result = fit(
        frozen_params(tiny_params, path, "linear_probe"),
        datamodule(tiny_params, prepared, None),
        out_dir=tmp_path / "out",
    )
    model = Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu")
    own = model.net.state_dict()
    backbone = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(own[k], state[k]) for k in backbone)  # BatchNorm running statistics included
    assert result.epochs_run == 0 and result.weights.pretrained and "val/accuracy" in result.last_metrics
    assert own["fc.weight"].abs().sum() > 0 and own["fc.weight"].shape == (3, 512)
    # The head is the logistic regression: it separates the training features (classes differ by colour).
    rows = prepared.split("train")
    features = pooled_features(model, prepared.images[rows["cache_index"].to_numpy()])
    logits = features @ own["fc.weight"].numpy().T + own["fc.bias"].numpy()
    assert (logits.argmax(1) == rows["label_index"].to_numpy()).mean() == 1.0


def test_knn_takes_no_gradient_steps_and_remembers_its_images(
    tiny_params, prepared, backbone_file, tmp_path, monkeypatch
):
    _, path = backbone_file
    steps = []  # every backward pass and optimizer built would land here
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: steps.append("backward"))
    monkeypatch.setattr(torch.optim.Optimizer, "__init__", lambda self, *a, **k: steps.append("optimizer"))
    params = frozen_params(tiny_params, path, "knn", knn_k=1)
    result = fit(params, datamodule(params, prepared, None), out_dir=tmp_path / "out")
    assert steps == [] and result.epochs_run == 0
    model = Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu").eval()
    assert model.hparams.knn_bank == len(prepared.split("train")) and not any(
        p.grad is not None for p in model.parameters()
    )
    rows = prepared.split("train")
    with torch.no_grad():
        probs = model(torch.from_numpy(prepared.images[rows["cache_index"].to_numpy()].transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(
        probs.argmax(1).numpy(), rows["label_index"].to_numpy()
    )  # its own neighbour


@pytest.mark.parametrize("mode", ["linear_probe", "knn"])
def test_predict_and_export_work_for_the_frozen_modes(
    mode, tiny_params, prepared, image_folder, backbone_file, tmp_path
):
    _, path = backbone_file
    params = frozen_params(tiny_params, path, mode)
    result = fit(params, datamodule(params, prepared, None), out_dir=tmp_path / "out")
    model = Classifier.load_from_checkpoint(result.best_checkpoint, map_location="cpu").eval()
    trained = shipped.Trained(
        model=Ensemble([model]),
        classes=prepared.classes,
        image_size=32,
        channels="rgb",
        dicom_window=None,
        dtype="uint8",
        run=run_info(classes=prepared.classes),
    )
    files = sorted(image_folder.rglob("*.png"))[:4]
    table = predict.predict(trained, files)
    assert (table["error"] == "").all() and set(table["predicted"]) <= set(prepared.classes)
    exported = torch.jit.load(export.export(trained, "torchscript", tmp_path / "model.pt"))
    pixels = torch.from_numpy(np.stack([predict.read_image(f, trained) for f in files]))
    with torch.no_grad():
        probs = exported(pixels)
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)
    assert [prepared.classes[i] for i in probs.argmax(1)] == list(table["predicted"])


def test_lp_ft_fine_tunes_from_the_probed_head_bit_identically(
    tiny_params, prepared, backbone_file, monkeypatch
):
    """LP-FT's second phase starts from exactly the head the first phase fitted (the linear_probe mode's head),
    on the untouched pretrained backbone, at train.lr x train.lp_ft_lr_mult."""
    from lightning.pytorch.callbacks import Callback

    from pipeline.training import probe

    state, path = backbone_file
    probed, at_start = [], []
    real = probe.fit_linear_probe

    def recording(model, train, val, seed):
        c = real(model, train, val, seed)
        probed.append({k: v.clone() for k, v in model.net.fc.state_dict().items()})
        return c

    class AtStart(Callback):
        def on_train_start(self, trainer, module):
            at_start.append(({k: v.clone() for k, v in module.net.state_dict().items()}, module.hparams.lr))

    monkeypatch.setattr(probe, "fit_linear_probe", recording)
    params = frozen_params(tiny_params, path, "lp_ft", max_epochs=1, lp_ft_lr_mult=0.25)
    result = fit(params, datamodule(params, prepared, None), callbacks=[AtStart()])
    assert result.epochs_run == 1 and len(probed) == 1 and len(at_start) == 1
    start, lr = at_start[0]
    assert all(torch.equal(start[f"fc.{k}"], v) for k, v in probed[0].items())  # the head, bit-identical
    assert all(torch.equal(start[k], v) for k, v in state.items() if not k.startswith("fc."))  # BN stats too
    assert lr == params.train.lr * 0.25
    # The first phase is the linear_probe mode's fit: the same head.
    lp = frozen_params(tiny_params, path, "linear_probe")
    fit(lp, datamodule(lp, prepared, None))
    assert all(torch.equal(probed[1][k], v) for k, v in probed[0].items())


def test_lp_ft_on_a_random_backbone_fine_tunes_as_finetune(tiny_params, prepared, caplog, monkeypatch):
    from pipeline.training import probe

    monkeypatch.setattr(probe, "fit_head", lambda *a, **k: pytest.fail("no probe on random features"))
    params = config.with_overrides(tiny_params, {"train.mode": "lp_ft", "train.max_epochs": 1})
    result = fit(params, datamodule(params, prepared, None))
    assert result.epochs_run == 1 and not result.weights.pretrained
    assert "lp_ft on a randomly initialised backbone" in caplog.text
