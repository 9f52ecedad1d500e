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
from PIL import Image

from pipeline import config, tracking
from pipeline.__main__ import main
from pipeline.data.ingest import ingest
from pipeline.data.prepared import load_prepared
from pipeline.runinfo import Preprocessing, RunInfo, model_sha256
from pipeline.serve import export, predict, shipped
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Classifier
from tests.conftest import CLASSES, run_info, write_class_folders

RAW_SIZE, SIZE = 40, 32  # files are 40 px: predict and the exports must resize them as ingest did


def train_tiny(root: Path, prepared, channels: str) -> None:
    """A one-epoch model in root/models, with the run.json the train stage would write for it."""
    params = config.parse(
        {
            "data": {"image_size": SIZE, "channels": channels},
            "model": {"weights": "none"},
            "train": {"max_epochs": 1, "batch_size": 4, "accelerator": "cpu"},
        }
    )
    result = fit(params, datamodule(params, prepared, None), out_dir=root / "ckpt")
    (root / "models").mkdir()
    shutil.copy2(result.best_checkpoint, root / "models" / "best.ckpt")
    run_info(
        model_sha256=model_sha256([root / "models" / "best.ckpt"]),
        classes=prepared.classes,
        preprocessing=Preprocessing(image_size=SIZE, channels=channels, dicom_window=None, dtype="uint8"),
    ).write(root / "models")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """raw/ (the files), prepared/ (ingest), models/ (best.ckpt + run.json as the train stage writes), params.yaml."""
    root = tmp_path_factory.mktemp("serve")
    raw = write_class_folders(root / "raw", per_class=6, size=RAW_SIZE)
    ingest(raw, root / "prepared", seed=0, image_size=SIZE, val_fraction=0.25, test_fraction=0.25)
    prepared = load_prepared(root / "prepared")
    train_tiny(root, prepared, "rgb")
    (root / "params.yaml").write_text(
        yaml.safe_dump(
            {
                "paths": {"model_dir": str(root / "models"), "exports": str(root / "exports")},
                "mlflow": {
                    "tracking_uri": f"sqlite:///{root}/mlflow.db",
                    "artifact_root": str(root / "mlartifacts"),
                },
            }
        )
    )
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
    by_name = {
        Path(p).name: i for p, i in zip(prepared.table["path"], prepared.table["cache_index"], strict=True)
    }
    rows = [by_name[Path(p).name] for p in ok["path"]]
    with torch.no_grad():
        expected = (
            model(torch.from_numpy(prepared.images[rows].transpose(0, 3, 1, 2).copy())).softmax(-1).numpy()
        )
    np.testing.assert_allclose(probs, expected, atol=2e-6)  # the CSV keeps 6 decimals
    assert list(ok["predicted"]) == [CLASSES[k] for k in expected.argmax(1)]


def test_predict_a_manifest_reports_missing_files_and_fails_when_nothing_is_readable(
    project, tmp_path, capsys
):
    # Listed by absolute path, inside the manifest's folder (nothing outside it is read: tests/test_sources.py)
    files = [Path(shutil.copy(f, tmp_path)) for f in sorted((project / "raw" / "beta").glob("*.png"))[:2]]
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
    out = tmp_path / f"m{export.SUFFIX[fmt]}"
    assert cli(project, "export", "--format", fmt, "--out", str(out)) == 0
    files, cached = exported_inputs(project)
    with torch.no_grad():
        expected = model(torch.from_numpy(cached.transpose(0, 3, 1, 2).copy())).softmax(-1).numpy()
    if fmt == "torchscript":
        extra = {export.CLASS_NAMES_FILE: ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        assert loaded.class_names == list(CLASSES) and json.loads(extra[export.CLASS_NAMES_FILE]) == list(
            CLASSES
        )
        run = lambda x: loaded(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()  # noqa: E731
    else:
        import onnx
        import onnxruntime

        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        assert json.loads(meta["class_names"]) == list(CLASSES) and meta["image_size"] == str(SIZE)
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"images": np.ascontiguousarray(x)})[0]  # noqa: E731
    # At the training size, NHWC (or NCHW for TorchScript): the model's own preprocessing, so equal to float
    # precision. ONNX declares one layout, NHWC with the band axis fixed, and onnxruntime refuses the other.
    np.testing.assert_allclose(run(cached), expected, atol=1e-5)
    if fmt == "torchscript":
        np.testing.assert_allclose(run(cached.transpose(0, 3, 1, 2)), expected, atol=1e-5)
    else:
        with pytest.raises(Exception, match="index: 3 Got: 32 Expected: 3"):
            run(cached.transpose(0, 3, 1, 2))
    # The files as stored: resized inside the export as ingest resized them (shrinking: OpenCV's area mean).
    np.testing.assert_allclose(run(files), expected, atol=1e-4)


def test_export_writes_to_paths_exports_by_default(project, monkeypatch):
    monkeypatch.chdir(project)
    assert cli(project, "export", "--format", "torchscript") == 0
    assert (project / "exports" / "model.pt").stat().st_size > 1_000_000


def test_export_records_the_models_sha256_and_the_train_run_tagged_with_it(
    project, tmp_path, capsys, monkeypatch
):
    """run.json names no MLflow run: export finds the train run by its model.sha256 tag, and without one in the
    store says so and records the sha256 alone."""
    import onnx

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's params.yaml names its store
    sha = RunInfo.read(project / "models").model_sha256
    assert sha == model_sha256([project / "models" / "best.ckpt"])
    out = tmp_path / "m.onnx"
    assert cli(project, "export", "--format", "onnx", "--out", str(out)) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["model_sha256"] == sha and "mlflow_run_id" not in meta
    assert f"no MLflow train run tagged model.sha256 = {sha}" in capsys.readouterr().out
    previous = mlflow.get_tracking_uri()
    try:
        store = config.Tracking(
            tracking_uri=f"sqlite:///{project}/mlflow.db", artifact_root=str(project / "mlartifacts")
        )
        tracking.setup(store)
        with mlflow.start_run(tags={"stage": "train", "model.sha256": sha}) as run:
            pass
        with mlflow.start_run(tags={"stage": "train", "model.sha256": "0" * 64}):  # a later, other model
            pass
        assert cli(project, "export", "--format", "onnx", "--out", str(out)) == 0
    finally:
        tracking.use_tracking_uri(previous)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["model_sha256"] == sha and meta["mlflow_run_id"] == run.info.run_id


def _probabilities(model: Classifier, cached: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(cached.transpose(0, 3, 1, 2)))).softmax(-1).numpy()


def test_the_logged_model_gives_the_checkpoints_probabilities_alone_and_in_a_batch(
    project, model, tmp_path, monkeypatch
):
    """What the train stage logs and registers (shipped.log_model over load_trained), loaded back by name."""
    monkeypatch.chdir(tmp_path)
    previous = mlflow.get_tracking_uri()
    try:
        tracking.setup(config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e"))
        trained = shipped.load_trained(project / "models")
        with mlflow.start_run() as run:
            assert shipped.log_model(trained, registered_model="tiny-classifier") == "1"  # the new version
        (version,) = mlflow.MlflowClient().search_model_versions("name='tiny-classifier'")
        assert int(version.version) == 1 and version.run_id == run.info.run_id
        latest = mlflow.pyfunc.load_model("models:/tiny-classifier/latest")
        files, cached = exported_inputs(project)
        expected = _probabilities(model, cached)
        batch = latest.predict(cached)  # NHWC uint8, as cached: probabilities, not logits
        np.testing.assert_allclose(batch, expected, atol=1e-5)
        for i in range(len(cached)):  # one image alone: the same answer as in the batch (eval-mode BatchNorm)
            np.testing.assert_allclose(latest.predict(cached[i : i + 1]), expected[i : i + 1], atol=1e-5)
        np.testing.assert_allclose(latest.predict(files), expected, atol=1e-4)  # stored size: resized inside
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module", params=[1, 5])  # 3 bands: the project fixture's model
def banded(request, tmp_path_factory) -> tuple[shipped.Trained, np.ndarray, list[Path]]:
    """A tiny model on 1- or 5-band TIFFs kept as stored (data.channels: keep), with its cache and files."""
    import tifffile

    bands = request.param
    root = tmp_path_factory.mktemp(f"bands{bands}")
    rng = np.random.default_rng(bands)
    for k, name in enumerate(CLASSES[:2]):
        (root / "raw" / name).mkdir(parents=True)
        for i in range(6):
            img = rng.integers(0, 120, (RAW_SIZE, RAW_SIZE, bands)).astype(np.uint8)
            img[..., 0] += np.uint8(100 * k)
            tifffile.imwrite(root / "raw" / name / f"{name}_{i}.tif", img[..., 0] if bands == 1 else img)
    data = config.Data(image_size=SIZE, val_fraction=0.25, test_fraction=0.25, channels="keep")
    ingest(root / "raw", root / "prepared", seed=0, data=data)
    prepared = load_prepared(root / "prepared")
    train_tiny(root, prepared, "keep")
    rows = prepared.table.iloc[:4]
    return (
        shipped.load_trained(root / "models"),
        np.asarray(prepared.images[rows["cache_index"].to_numpy()]),
        [Path(p) for p in rows["path"]],
    )


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_of_1_3_and_n_band_models_equal_predict_and_reject_other_layouts(banded, fmt, tmp_path):
    import onnx
    import onnxruntime

    trained, cached, files = banded
    bands = trained.in_channels
    expected = predict.predict(trained, files)[[f"prob_{c}" for c in trained.classes]].to_numpy(float)
    out = export.export(trained, fmt, tmp_path / f"m{export.SUFFIX[fmt]}")
    if fmt == "torchscript":
        extra = {"metadata.json": ""}
        loaded = torch.jit.load(str(out), _extra_files=extra)
        meta = json.loads(extra["metadata.json"])
        run = lambda x: loaded(torch.from_numpy(np.ascontiguousarray(x))).detach().numpy()  # noqa: E731
        layouts = [cached, cached.transpose(0, 3, 1, 2)] + ([cached[..., 0]] if bands == 1 else [])
    else:
        meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"images": np.ascontiguousarray(x)})[0]  # noqa: E731
        layouts = [cached]
    assert meta["channels"] == str(bands) and meta["dtype"] and meta["value_range"] and meta["layout"]
    for x in layouts:  # every documented layout gives predict's probabilities
        np.testing.assert_allclose(run(x), expected, atol=1e-4)
    wrong = np.zeros((2, SIZE, SIZE, bands + 1), np.uint8)  # another band count: refused, not guessed
    with pytest.raises(Exception, match=r"band|channel|dimension|index: 3"):
        run(wrong)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_an_rgb_model_takes_a_gray_batch_as_ingest_does(project, model, tmp_path):
    """data.channels: rgb replicates a gray image into 3 bands at ingest; the export must do the same."""
    _, cached = exported_inputs(project)
    gray = cached[..., :1]
    expected = _probabilities(model, np.repeat(gray, 3, axis=-1))
    out = export.export(shipped.load_trained(project / "models"), "torchscript", tmp_path / "m.pt")
    loaded = torch.jit.load(str(out))
    for x in (gray, gray.transpose(0, 3, 1, 2), gray[..., 0]):
        with torch.no_grad():
            np.testing.assert_allclose(
                loaded(torch.from_numpy(np.ascontiguousarray(x))).numpy(), expected, atol=1e-5
            )
    # ONNX fixes the band axis: --gray exports (N, H, W, 1), replicated inside; no 3-band copy by hand.
    import onnx
    import onnxruntime

    assert cli(project, "export", "--format", "onnx", "--gray", "--out", str(tmp_path / "g.onnx")) == 0
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "g.onnx")).metadata_props}
    assert meta["channels"] == "1"
    session = onnxruntime.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        session.run(None, {"images": np.ascontiguousarray(gray)})[0], expected, atol=1e-5
    )


def test_gray_is_refused_where_it_means_nothing(banded, tmp_path):
    trained = banded[0]
    with pytest.raises(shipped.ServeError, match=r"--gray: only an ONNX export of an RGB model"):
        export.export(trained, "onnx", tmp_path / "m.onnx", gray=True)
    assert not (tmp_path / "m.onnx").exists()


def test_predict_writes_conformal_sets_of_this_models_decision_only(project, tmp_path, caplog):
    from pipeline.evaluation.decision import Decision

    src, out = project / "raw" / "alpha", tmp_path / "preds.csv"
    sha = RunInfo.read(project / "models").model_sha256
    made = Decision(
        model_sha256=sha, classes=CLASSES, selection="val", conformal_alpha=0.1, conformal_quantile=0.6
    )
    made.write(tmp_path / "decision.json")
    assert (
        cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "decision.json"))
        == 0
    )
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table.columns) == ["path", "predicted", *(f"prob_{c}" for c in CLASSES), "set", "error"]
    probs = table[[f"prob_{c}" for c in CLASSES]].to_numpy(float)
    expected = [
        "|".join(c for c, p in zip(CLASSES, row, strict=True) if p >= 1 - 0.6 - 1e-6) for row in probs
    ]
    assert list(table["set"]) == expected
    Decision(model_sha256="0" * 64, classes=CLASSES, selection="val", conformal_quantile=0.6).write(
        tmp_path / "other.json"
    )
    assert (
        cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "other.json")) == 0
    )
    assert "set" not in pd.read_csv(out).columns and "not for this model" in caplog.text
    assert f"the model with sha256 {'0' * 64}" in caplog.text and "dvc repro evaluate" in caplog.text
    assert "coverage" not in caplog.text  # the first decision measured no coverage: nothing to warn about
    caplog.clear()
    # A decision.json from before model_sha256 named the MLflow run: ignored the same way, with the fix.
    old = json.loads((tmp_path / "decision.json").read_text())
    old.pop("model_sha256")
    (tmp_path / "old.json").write_text(json.dumps(old | {"run_id": "r0"}))
    assert cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "old.json")) == 0
    assert "set" not in pd.read_csv(out).columns and "a decision.json from before model_sha256" in caplog.text
    assert "not for this model" in caplog.text and "dvc repro evaluate" in caplog.text


def test_predict_warns_when_the_sets_missed_their_level_on_test(project, tmp_path, caplog):
    from pipeline.evaluation.decision import Decision

    src, out = project / "raw" / "alpha", tmp_path / "preds.csv"
    sha = RunInfo.read(project / "models").model_sha256
    covered = dict(
        model_sha256=sha, classes=CLASSES, selection="val", conformal_alpha=0.1, conformal_quantile=0.6
    )
    Decision(**covered, test_coverage=0.8, test_coverage_ci_low=0.71, test_coverage_ci_high=0.878).write(
        tmp_path / "under.json"
    )
    assert (
        cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "under.json")) == 0
    )
    assert "test coverage 0.800 (95% CI 0.710 – 0.878) is below the target 90%" in caplog.text
    assert "not exchangeable with test" in caplog.text and "empty set means" in caplog.text
    caplog.clear()
    Decision(**covered, test_coverage=0.9, test_coverage_ci_low=0.85, test_coverage_ci_high=0.95).write(
        tmp_path / "fine.json"
    )
    assert (
        cli(project, "predict", str(src), "--out", str(out), "--decision", str(tmp_path / "fine.json")) == 0
    )
    assert "coverage" not in caplog.text


def test_predict_applies_the_configured_pixel_budget(project, tmp_path):
    """data.max_image_pixels reaches predict's reader as it reaches ingest's: a file over it is a row with a reason."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params | {"data": {"max_image_pixels": 1000}}))
    src = shutil.copytree(project / "raw" / "alpha", tmp_path / "few")
    out = tmp_path / "p.csv"
    assert main(["predict", "--params", str(tmp_path / "params.yaml"), str(src), "--out", str(out)]) == 2
    errors = pd.read_csv(out)["error"]
    assert errors.str.contains("over data.max_image_pixels \\(1000\\)").all()  # 40x40 = 1600 pixels each


def test_predict_names_a_fifo_a_folder_and_an_unreadable_png_instead_of_file_not_found(project, tmp_path):
    import os

    from PIL import PngImagePlugin

    files = [Path(shutil.copy(f, tmp_path)) for f in sorted((project / "raw" / "beta").glob("*.png"))[:1]]
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    text = (
        PngImagePlugin.PngInfo()
    )  # a 2 MB text chunk compressed to a few bytes: Pillow refuses to inflate it
    text.add_text("comment", "a" * (2 << 20), zip=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "text.png", pnginfo=text)
    names = ["pipe.png", "folder.png", "text.png", "gone.png"]
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"{n}\n" for n in [files[0].name, *names]))
    assert cli(project, "predict", str(tmp_path / "list.csv"), "--out", str(tmp_path / "p.csv")) == 0
    errors = dict(pd.read_csv(tmp_path / "p.csv", keep_default_na=False)[["path", "error"]].to_numpy())
    assert errors[str(files[0])] == ""
    assert "FIFO" in errors[str(tmp_path / "pipe.png")] and "folder" in errors[str(tmp_path / "folder.png")]
    assert "MAX_TEXT_CHUNK" in errors[str(tmp_path / "text.png")]
    assert errors[str(tmp_path / "gone.png")] == "file not found"


@pytest.mark.parametrize("kind", ["link", "folder", "fifo"])
def test_predict_and_export_never_replace_anything_but_a_regular_file(project, tmp_path, capsys, kind):
    # A device node is checked in tests/test_fsutil.py without a CLI run: code that replaced it would replace
    # the machine's own /dev/null.
    import os

    out = tmp_path / "out.csv"
    if kind == "link":
        (tmp_path / "kept.csv").write_text("someone's file\n")
        out.symlink_to(tmp_path / "kept.csv")
    elif kind == "folder":
        out.mkdir()
    else:
        os.mkfifo(out)
    what = {"link": "a symbolic link", "folder": "a folder", "fifo": "a FIFO"}[kind]
    assert cli(project, "predict", str(project / "raw"), "--out", str(out)) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}: is {what}, which is never replaced; name a new file or a regular one"
    )
    assert cli(project, "export", "--format", "onnx", "--out", str(out)) == 2
    assert f"is {what}" in capsys.readouterr().err
    assert out.is_symlink() or out.is_dir() or out.is_fifo()
    if kind == "link":
        assert (tmp_path / "kept.csv").read_text() == "someone's file\n"


@pytest.mark.parametrize("damage", ["truncated", "architecture", "run.json", "decision.json"])
def test_a_damaged_model_folder_or_decision_is_one_error_line(project, tmp_path, capsys, damage):
    models = shutil.copytree(project / "models", tmp_path / "models")
    decision = tmp_path / "decision.json"
    if damage == "truncated":
        (models / "best.ckpt").write_bytes((models / "best.ckpt").read_bytes()[:4000])
    elif damage == "architecture":  # a resnet18's weights under a resnet34's hyperparameters
        checkpoint = torch.load(models / "best.ckpt", weights_only=False)
        checkpoint["hyper_parameters"]["arch"] = "resnet34"
        torch.save(checkpoint, models / "best.ckpt")
    elif damage == "run.json":
        (models / "run.json").write_text('{"model_sha256": "0", "classes": ')
    else:
        decision.write_text("[1, 2]")
    argv = ["predict", str(project / "raw"), "--out", str(tmp_path / "p.csv"), "--model-dir", str(models)]
    assert cli(project, *argv, "--decision", str(decision)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    where = {"truncated": "best.ckpt", "architecture": "best.ckpt", "run.json": "run.json"}.get(
        damage, damage
    )
    assert len(err) == 1 and err[0].startswith("error: ") and where in err[0], err
    assert not (tmp_path / "p.csv").exists()
