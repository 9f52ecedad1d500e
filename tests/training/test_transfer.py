import dataclasses
import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking._tracking_service.utils import is_tracking_uri_set as tracking_uri_is_set

from pipeline import config, tracking
from pipeline.runinfo import RUN_INFO
from pipeline.training import transfer
from pipeline.training.fit import build_model, datamodule, fit
from pipeline.training.model import Classifier
from pipeline.training.pretrained import load_pretrained, native_size
from pipeline.training.weights import WeightsError

NEW_CLASSES = ("x", "y")  # the earlier run had three: alpha, beta, gamma


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """A real tiny fit's models/ folder (best.ckpt + run.json), trained with the set's own statistics."""
    from pipeline.data.ingest import ingest
    from pipeline.data.prepared import load_prepared
    from tests.conftest import run_info, write_class_folders

    root = tmp_path_factory.mktemp("earlier")
    ingest(
        write_class_folders(root / "raw"),
        root / "prepared",
        image_size=32,
        val_fraction=0.25,
        test_fraction=0.25,
        seed=0,
        on_bad_file="skip",
    )
    params = config.parse(
        {
            "model": {"weights": "none"},
            "train": {"max_epochs": 1, "batch_size": 4, "accelerator": "cpu", "freeze_epochs": 0},
        }
    )
    prepared = load_prepared(root / "prepared")
    result = fit(params, datamodule(params, prepared, None), out_dir=root / "models")
    run_info(classes=prepared.classes, checkpoints=(result.best_checkpoint.name,)).write(root / "models")
    return root / "models"


def params_with(weights: str, **model) -> config.Params:
    return config.parse({"model": {"weights": weights, **model}, "train": {"accelerator": "cpu"}})


def source_model(models_dir) -> Classifier:
    return Classifier.load_from_checkpoint(models_dir / "best.ckpt", map_location="cpu")


def assert_only_the_head_is_new(model: Classifier, source: Classifier) -> None:
    new, old = model.net.state_dict(), source.net.state_dict()
    backbone = [k for k in old if not k.startswith("fc.")]
    assert backbone and all(torch.equal(new[k], old[k]) for k in backbone)  # bit-identical
    assert new["fc.weight"].shape == (len(NEW_CLASSES), old["fc.weight"].shape[1])


@pytest.mark.parametrize("pointer", ["folder", "checkpoint"])
def test_an_earlier_runs_backbone_is_carried_over_exactly(earlier_run, pointer):
    source = source_model(earlier_run)
    weights = str(earlier_run if pointer == "folder" else earlier_run / "best.ckpt")
    model, info = build_model(params_with(weights), NEW_CLASSES, dataset_stats=([0.9] * 3, [0.1] * 3))
    assert_only_the_head_is_new(model, source)
    # Its normalization, not the new set's statistics, and it is recorded (run.json gets the WeightsInfo).
    assert torch.equal(model.mean, source.mean) and torch.equal(model.std, source.std)
    assert model.hparams.mean == source.mean.flatten().tolist()
    assert info.pretrained and info.in_channels == 3 and info.source == str(earlier_run / "best.ckpt")
    assert info.mean == tuple(source.mean.flatten().tolist()) and info.source_classes == (
        "alpha",
        "beta",
        "gamma",
    )
    assert json.loads(json.dumps(dataclasses.asdict(info)))["std"] == list(info.std)


def test_a_one_band_set_adapts_the_rgb_backbone_and_its_statistics(earlier_run):
    source = source_model(earlier_run)
    model, info = build_model(params_with(str(earlier_run)), NEW_CLASSES, in_channels=1)
    conv = source.net.conv1.weight
    assert torch.allclose(model.net.conv1.weight, conv.sum(dim=1, keepdim=True))
    assert model.mean.flatten().tolist() == pytest.approx([source.mean.mean().item()])
    assert info.in_channels == 3  # what the weights were trained on


def test_another_arch_or_band_count_is_an_error_naming_both(earlier_run, tmp_path):
    with pytest.raises(WeightsError, match=r"resnet18 backbone, but model.arch is resnet34"):
        build_model(params_with(str(earlier_run), arch="resnet34"), NEW_CLASSES)
    gray = Classifier(num_classes=2, in_channels=1)
    torch.save(
        {"state_dict": gray.state_dict(), "hyper_parameters": dict(gray.hparams)}, tmp_path / "gray.ckpt"
    )
    with pytest.raises(WeightsError, match="trained on 1 bands, this data set has 3"):
        build_model(params_with(str(tmp_path / "gray.ckpt")), NEW_CLASSES)


def test_a_folder_without_run_json_and_a_missing_checkpoint_are_named(tmp_path):
    with pytest.raises(WeightsError, match=r"has no run.json"):
        build_model(params_with(str(tmp_path)), NEW_CLASSES)
    with pytest.raises(WeightsError, match=r"gone.ckpt' not found"):
        build_model(params_with(str(tmp_path / "gone.ckpt")), NEW_CLASSES)


def test_the_checkpoint_sha256_is_checked(earlier_run):
    with pytest.raises(WeightsError, match=r"model.weights_sha256"):
        build_model(params_with(str(earlier_run), weights_sha256="0" * 64), NEW_CLASSES)


@pytest.fixture
def logged_run(earlier_run, tmp_path, monkeypatch):
    """The earlier run's model logged and registered (as the train stage does) in a sqlite store in tmp_path."""
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path}/store.db"
    tracking.setup(config.Tracking(tracking_uri=uri, experiment="transfer"))
    with mlflow.start_run() as run:
        mlflow.log_dict(json.loads((earlier_run / RUN_INFO).read_text()), RUN_INFO)
        tracking.log_model(
            source_model(earlier_run).eval(), np.zeros((2, 3, 32, 32), np.uint8), registered_model="source"
        )
    yield run.info.run_id, uri
    mlflow.set_tracking_uri(previous)


def test_runs_and_models_uris_resolve_against_the_store(earlier_run, logged_run, monkeypatch):
    run_id, uri = logged_run
    source = source_model(earlier_run)
    for pointer in (f"runs:/{run_id}", f"runs:/{run_id}/model", "models:/source/1"):
        model, info = build_model(params_with(pointer), NEW_CLASSES)
        assert_only_the_head_is_new(model, source)
        assert torch.equal(model.mean, source.mean) and info.source.startswith(pointer)
    # No stage has pointed MLflow anywhere: mlflow.tracking_uri from params.yaml is the store.
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.delenv(tracking.ENV_URI, raising=False)
    net = Classifier(num_classes=2).net
    info = load_pretrained(net, "resnet18", "models:/source/1", require_pretrained=True, tracking_uri=uri)
    assert info.pretrained and uri in info.source
    assert not tracking_uri_is_set() and tracking.ENV_URI not in os.environ  # MLflow left as it was
    with pytest.raises(WeightsError, match="models:/source/7 could not be loaded"):
        load_pretrained(net, "resnet18", "models:/source/7", require_pretrained=True, tracking_uri=uri)
    # data.image_size: auto takes the size the run trained at from its run.json (32 px here)
    for pointer in (f"runs:/{run_id}", "models:/source/1"):
        assert native_size("resnet18", pointer, require_pretrained=True, tracking_uri=uri) == 32


def test_auto_image_size_of_an_earlier_run_is_the_size_it_trained_at(earlier_run, tmp_path):
    assert native_size("resnet18", str(earlier_run), require_pretrained=True) == 32
    assert native_size("resnet18", str(earlier_run / "best.ckpt"), require_pretrained=True) == 32
    alone = tmp_path / "best.ckpt"
    alone.write_bytes((earlier_run / "best.ckpt").read_bytes())
    with pytest.raises(WeightsError, match=r"no run\.json beside it"):
        native_size("resnet18", str(alone), require_pretrained=True)


def test_run_sources_are_told_from_other_weights(tmp_path):
    assert transfer.is_run_source("runs:/abc") and transfer.is_run_source("models:/m/3")
    assert transfer.is_run_source(str(tmp_path)) and transfer.is_run_source("x/best.ckpt")
    assert not any(
        map(transfer.is_run_source, ["imagenet", "none", "w.pth", "ResNet50_Weights.IMAGENET1K_V2"])
    )


class _RunsCode:
    """A pickle that creates a folder when unpickled: what a tampered model version could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickled_model_in_the_store_is_refused_before_it_runs(logged_run, tmp_path):
    """A model version whose artifacts hold a pickled data/model.pth instead of model.pt2 (MLflow 3 would
    unpickle it by default) is refused, and its code never runs; so is one that carries a code/ folder."""
    run_id, _ = logged_run
    marker = tmp_path / "code-ran"
    programs = list(tmp_path.rglob(transfer.PT2_FILE))
    assert programs, "the logged model's artifacts hold a pt2 program"
    for program in programs:
        program.unlink()
        torch.save(_RunsCode(marker), program.with_name(transfer.PICKLED_FILE))
        (program.parent / "pickle_module_info.txt").write_text("pickle")
    for pointer in (f"runs:/{run_id}", "models:/source/1"):
        with pytest.raises(WeightsError, match=r"pickled model \(model.pth\).*refused"):
            build_model(params_with(pointer), NEW_CLASSES)
    assert not marker.exists()
    assert os.environ.get(transfer.PICKLE_SWITCH) is None  # the switch is put back as it was


def test_a_model_carrying_code_is_refused(logged_run, tmp_path):
    run_id, _ = logged_run
    for mlmodel in tmp_path.rglob("MLmodel"):
        text = mlmodel.read_text()
        mlmodel.write_text(text.replace("    code: null", "    code: code"))
        (mlmodel.parent / "code").mkdir(exist_ok=True)
    with pytest.raises(WeightsError, match=r"holds code instead of only a torch.export program"):
        build_model(params_with(f"runs:/{run_id}"), NEW_CLASSES)
