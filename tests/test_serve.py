"""predict, export and the MLflow registry on one tiny trained model (trained once for the module)."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline import config, serve, tracking
from pipeline.__main__ import main
from pipeline.data.ingest import ingest, load_prepared
from pipeline.fit import RUN_INFO, datamodule, fit
from pipeline.model import Classifier
from tests.conftest import CLASSES, write_class_folders

RAW_SIZE, SIZE = 40, 32  # files are 40 px: predict and the exports must resize them as ingest did


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """raw/ (the files), prepared/ (ingest), models/ (best.ckpt + run.json as the train stage writes), params.yaml."""
    root = tmp_path_factory.mktemp("serve")
    raw = write_class_folders(root / "raw", per_class=6, size=RAW_SIZE)
    ingest(raw, root / "prepared", seed=0, image_size=SIZE, val_fraction=0.25, test_fraction=0.25)
    prepared = load_prepared(root / "prepared")
    params = config.parse({"data": {"image_size": SIZE}, "model": {"weights": "none"},
                           "train": {"max_epochs": 1, "batch_size": 4, "accelerator": "cpu"}})
    result = fit(params, datamodule(params, prepared, None), out_dir=root / "ckpt")
    (root / "models").mkdir()
    shutil.copy2(result.best_checkpoint, root / "models" / "best.ckpt")
    run = {"run_id": "r0", "arch": "resnet18", "classes": list(prepared.classes), "checkpoint": "best.ckpt",
           "preprocessing": {"image_size": SIZE, "channels": "rgb", "dicom_window": None, "dtype": "uint8"}}
    (root / "models" / RUN_INFO).write_text(json.dumps(run))
    (root / "params.yaml").write_text(yaml.safe_dump({"paths": {"model_dir": str(root / "models"),
                                                                "exports": str(root / "exports")}}))
    return root


@pytest.fixture(scope="module")
def model(project) -> Classifier:
    return Classifier.load_from_checkpoint(project / "models" / "best.ckpt", map_location="cpu").eval()


def cli(project: Path, *args: str) -> int:
    return main([args[0], "--params", str(project / "params.yaml"), *args[1:]])


def test_predict_a_nested_folder_with_a_corrupt_file(project, model, tmp_path):
    src = shutil.copytree(project / "raw", tmp_path / "new" / "nested")
    (src / "alpha" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "notes.txt").write_text("not an image, ignored")
    assert cli(project, "predict", str(tmp_path / "new"), "--out", str(tmp_path / "preds.csv")) == 0
    table = pd.read_csv(tmp_path / "preds.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "predicted", *(f"prob_{c}" for c in CLASSES), "error"]
    assert len(table) == 3 * 6 + 1
    broken = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert broken["error"] and broken["predicted"] == "" and broken["prob_alpha"] == ""
    ok = table[table["error"] == ""]
    probs = ok[[f"prob_{c}" for c in CLASSES]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    # The same images through the model from the prepared cache: the same pixels, so the same probabilities.
    prepared = load_prepared(project / "prepared")
    by_name = {Path(p).name: i for p, i in zip(prepared.table["path"], prepared.table["cache_index"])}
    rows = [by_name[Path(p).name] for p in ok["path"]]
    with torch.no_grad():
        expected = model(torch.from_numpy(prepared.images[rows].transpose(0, 3, 1, 2).copy())).softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-6)  # the CSV keeps 6 decimals
    assert list(ok["predicted"]) == [CLASSES[k] for k in expected.argmax(1)]


def test_predict_a_manifest_reports_missing_files_and_fails_when_nothing_is_readable(project, tmp_path, capsys):
    files = sorted((project / "raw" / "beta").glob("*.png"))[:2]
    (tmp_path / "list.csv").write_text("Path,label\n" + "".join(f"{f},x\n" for f in files) + "gone.png,x\n")
    assert cli(project, "predict", str(tmp_path / "list.csv"), "--out", str(tmp_path / "p.csv")) == 0
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert list(table["path"]) == [str(f) for f in files] + [str(tmp_path / "gone.png")]
    assert table["error"].iloc[2] == "file not found"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    assert cli(project, "predict", str(tmp_path / "bad"), "--out", str(tmp_path / "q.csv")) == 2
    assert "none of the 1 files could be read" in capsys.readouterr().err
    assert pd.read_csv(tmp_path / "q.csv")["error"].iloc[0] == "empty file"


def exported_inputs(project: Path) -> tuple[np.ndarray, np.ndarray]:
    """A few files as stored (40 px, NHWC uint8) and as ingest cached them (32 px)."""
    prepared = load_prepared(project / "prepared")
    rows = prepared.table.iloc[:5]
    from PIL import Image

    files = np.stack([np.asarray(Image.open(p)) for p in rows["path"]])
    return files, np.asarray(prepared.images[rows["cache_index"].to_numpy()])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_equals_the_lightning_model(project, model, fmt, tmp_path):
    out = tmp_path / f"m{serve.SUFFIX[fmt]}"
    assert cli(project, "export", "--format", fmt, "--out", str(out)) == 0
    files, cached = exported_inputs(project)
    with torch.no_grad():
        expected = model(torch.from_numpy(cached.transpose(0, 3, 1, 2).copy())).softmax(-1).numpy()
    if fmt == "torchscript":
        extra = {serve.CLASS_NAMES_FILE: ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        assert loaded.class_names == list(CLASSES) and json.loads(extra[serve.CLASS_NAMES_FILE]) == list(CLASSES)
        run = lambda x: loaded(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()  # noqa: E731
    else:
        import onnx
        import onnxruntime

        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert json.loads(meta["class_names"]) == list(CLASSES) and meta["image_size"] == str(SIZE)
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"images": np.ascontiguousarray(x)})[0]  # noqa: E731
    # At the training size, NHWC or NCHW: the model's own preprocessing, so equal to float precision.
    np.testing.assert_allclose(run(cached), expected, atol=1e-5)
    np.testing.assert_allclose(run(cached.transpose(0, 3, 1, 2)), expected, atol=1e-5)
    # The files as stored: resized inside the export as ingest resized them (shrinking: OpenCV's area mean).
    np.testing.assert_allclose(run(files), expected, atol=1e-4)


def test_export_writes_to_paths_exports_by_default(project, monkeypatch):
    monkeypatch.chdir(project)
    assert cli(project, "export", "--format", "torchscript") == 0
    assert (project / "exports" / "model.pt").stat().st_size > 1_000_000


def test_the_registered_model_loads_by_name_and_predicts(project, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    try:
        tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
        _, cached = exported_inputs(project)
        example = np.ascontiguousarray(cached[:2].transpose(0, 3, 1, 2))
        with mlflow.start_run() as run:
            tracking.log_model(model, example, registered_model="tiny-classifier")
        (version,) = mlflow.MlflowClient().search_model_versions("name='tiny-classifier'")
        assert int(version.version) == 1 and version.run_id == run.info.run_id
        latest = mlflow.pyfunc.load_model("models:/tiny-classifier/latest")
        with torch.no_grad():
            expected = model(torch.from_numpy(example)).numpy()
        np.testing.assert_allclose(latest.predict(example), expected, atol=1e-5)
    finally:
        mlflow.set_tracking_uri(previous)


def test_predict_writes_conformal_sets_of_this_models_decision_only(project, tmp_path, caplog):
    from pipeline.evaluation.decision import Decision

    src, out = project / "raw" / "alpha", tmp_path / "preds.csv"
    made = Decision(run_id="r0", classes=CLASSES, selection="val", conformal_alpha=0.1, conformal_quantile=0.6)
    made.write(tmp_path / "decision.json")
    assert cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "decision.json")) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "predicted", *(f"prob_{c}" for c in CLASSES), "set", "error"]
    probs = table[[f"prob_{c}" for c in CLASSES]].to_numpy(float)
    expected = ["|".join(c for c, p in zip(CLASSES, row) if p >= 1 - 0.6 - 1e-6) for row in probs]
    assert list(table["set"]) == expected
    Decision(run_id="another", classes=CLASSES, selection="val", conformal_quantile=0.6).write(tmp_path / "old.json")
    assert cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "old.json")) == 0
    assert "set" not in pd.read_csv(out).columns and "not for this model" in caplog.text
