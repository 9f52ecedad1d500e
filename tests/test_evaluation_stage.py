"""The evaluate stage on a tiny untrained model: the files it writes, dvc.yaml's declarations of them
(as `dvc plots show` reads them), the train run in MLflow, and the report."""

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import mlflow
import pandas as pd
import pytest
import torch
import yaml

from pipeline import config, registry, tracking
from pipeline.data.ingest import ingest
from pipeline.data.prepared import load_prepared
from pipeline.evaluation import decision, plots, reporting
from pipeline.evaluation import evaluate as evaluation
from pipeline.runinfo import MODEL_SHA_TAG, model_sha256
from pipeline.stages import evaluate as stage
from pipeline.training.model import Classifier
from tests.conftest import CLASSES, run_info, write_class_folders

REPO = Path(__file__).resolve().parents[1]


def tiny_params(**evaluate) -> config.Params:
    return config.parse(
        {
            "data": {"dataset": "tiny", "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
            "model": {"weights": "none"},
            "evaluate": {"tta": ["HorizontalFlip"], "bootstrap": 200} | evaluate,
        }
    )


def save_untrained_model(params: config.Params, classes: tuple[str, ...]) -> str:
    """A random-init checkpoint in Lightning's format and the run.json the train stage would write; its sha256."""
    model = Classifier(params.model, num_classes=len(classes), class_names=classes)
    model_dir = Path(params.paths.model_dir)
    model_dir.mkdir(parents=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        model_dir / "best.ckpt",
    )
    sha = model_sha256([model_dir / "best.ckpt"])
    run_info(model_sha256=sha, arch=params.model.arch, classes=classes, best_score=1.1).write(model_dir)
    return sha


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder after ingest and train (untrained model), then the evaluate stage; cwd is the folder."""
    root = tmp_path_factory.mktemp("evaluate")
    params = tiny_params()
    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        write_class_folders(Path(params.paths.raw) / "tiny", per_class=8)
        ingest(Path(params.paths.raw) / "tiny", Path(params.paths.prepared), seed=0, data=params.data)
        tracking.setup(params.mlflow)
        sha = save_untrained_model(params, load_prepared(Path(params.paths.prepared)).classes)
        with mlflow.start_run(run_name="train", tags={"stage": "train", MODEL_SHA_TAG: sha}) as run:
            pass
        # A later train run of another model: evaluate must nest under the run tagged with this model's sha.
        with mlflow.start_run(run_name="train", tags={"stage": "train", MODEL_SHA_TAG: "0" * 64}):
            pass
        stage.main(params, argparse.Namespace())
        try:
            yield root, params, run.info.run_id
        finally:
            tracking.use_tracking_uri(previous_uri)  # set_tracking_uri would export $MLFLOW_TRACKING_URI


def all_metrics(params) -> dict:
    """The headline metrics file and the detail file together."""
    return {
        k: v
        for path in (params.paths.metrics, params.paths.metrics_detail)
        for k, v in json.loads(Path(path).read_text(), parse_constant=pytest.fail).items()
    }  # no NaN/Infinity


def test_stage_writes_metrics_with_intervals_and_calibration(project):
    _, params, _ = project
    metrics = all_metrics(params)
    for split in ("test", "test_tta"):
        for name in (*evaluation.HEADLINE, *evaluation.CALIBRATION):
            assert (
                metrics[f"{split}/{name}_ci_low"]
                <= metrics[f"{split}/{name}"]
                <= metrics[f"{split}/{name}_ci_high"]
            )
    assert {"test_calibrated/ece", "test_calibrated/brier_ci_high", "calibration/temperature"} <= set(metrics)
    assert metrics["test/support/alpha"] == 2 and metrics["weights/pretrained"] is False
    assert len(pd.read_csv(params.paths.confusion)) == 6
    headline = json.loads(Path(params.paths.metrics).read_text())  # what dvc metrics show / exp show print
    assert list(headline) == [k for k in reporting.HEADLINE_KEYS if k in metrics]
    assert "test/accuracy" in headline and "test_tta/auroc" in headline and len(headline) <= 16
    assert not set(headline) & set(json.loads(Path(params.paths.metrics_detail).read_text()))


def test_plots_folder_holds_the_images_and_the_curve_data(project):
    _, params, _ = project
    folder = Path(params.paths.plots)
    assert all((folder / image).stat().st_size > 1000 for image in evaluation.IMAGES)
    for kind in plots.CURVES:
        assert sorted(p.name for p in (folder / kind).iterdir()) == [f"{c}.csv" for c in CLASSES]
    assert sorted(p.name for p in (folder / plots.RELIABILITY).iterdir()) == [
        "test.csv",
        "test_calibrated.csv",
    ]
    for kind, (x, y) in plots.AXES.items():
        for csv in (folder / kind).iterdir():
            table = pd.read_csv(csv)
            assert {x, y} <= set(table.columns) and table[[x, y]].apply(lambda s: s.between(0, 1).all()).all()


def test_dvc_yaml_declares_what_the_stage_writes():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    evaluate = dvc["stages"]["evaluate"]
    assert (
        evaluate["outs"]
        == [
            "${paths.plots}",
            "${paths.report}",  # DVC-versioned: it names the run's commit, date and MLflow run (a clean git status)
            {"${paths.metrics_detail}": {"cache": False}},
            "${paths.decision}",  # likewise: the MLflow run it was decided in
            {"${paths.label_audit}": {"cache": False}},
        ]
    )
    assert evaluate["metrics"] == [{"${paths.metrics}": {"cache": False}}]
    assert [next(iter(p)) for p in evaluate["plots"]] == ["${paths.confusion}"]
    assert {"seed", "evaluate"} <= set(evaluate["params"])
    code = {dep for dep in evaluate["deps"] if not dep.startswith("$")}
    assert all(
        (REPO / dep).is_file() for dep in code
    )  # files, not folders: __pycache__ would change the hash
    assert {str(p.relative_to(REPO)) for p in (REPO / "pipeline" / "evaluation").glob("*.py")} <= code
    declared = {next(iter(p)): next(iter(p.values())) for p in dvc["plots"] if isinstance(p, dict)}
    assert "${paths.plots}" in dvc["plots"]
    assert declared == {
        f"${{paths.plots}}/{kind}": {
            "x": x,
            "y": y,
            "template": declared[f"${{paths.plots}}/{kind}"]["template"],
        }
        for kind, (x, y) in plots.AXES.items()
    }


def test_dvc_plots_show_renders_every_plot(project):
    root, params, _ = project
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root / name)
    dvc = [str(Path(sys.executable).with_name("dvc"))]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    done = subprocess.run(
        [*dvc, "plots", "show", "--json"], cwd=root, capture_output=True, text=True, timeout=120
    )
    shown = json.loads(done.stdout)
    ours = [e for e in shown.get("errors", []) if e["name"].startswith(params.paths.plots)]
    assert not ours, ours
    data = {
        name: entries[0] for name, entries in shown["data"].items() if entries
    }  # empty: missing elsewhere
    vega = {name: entry["content"] for name, entry in data.items() if entry["type"] == "vega"}
    roc = vega[f"{params.paths.plots}/roc/alpha.csv"]
    assert roc["encoding"]["x"]["field"] == "fpr" and len(roc["data"]["values"]) > 2
    assert f"{params.paths.plots}/reliability/test_calibrated.csv" in vega
    images = {name for name, entry in data.items() if entry["type"] == "image"}
    assert {f"{params.paths.plots}/{image}" for image in evaluation.IMAGES} <= images


def evaluation_runs(run_id: str) -> list:
    """The evaluate stage's runs nested under the train run ``run_id``, oldest first."""
    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.stage = 'evaluate'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    return list(runs)


def test_each_evaluation_is_a_run_nested_under_the_train_run_with_the_same_names(project):
    _, params, run_id = project
    metrics = all_metrics(params)
    first = evaluation_runs(run_id)[0]
    logged = first.data.metrics
    for name in (
        "test/accuracy",
        "test/accuracy_ci_low",
        "test_tta/auroc_ci_high",
        "test_calibrated/ece",
        "calibration/temperature",
    ):
        assert logged[name] == pytest.approx(metrics[name])
    assert first.data.tags["data.dataset"] == "tiny" and first.data.params["evaluate.threshold"] == "0.5"
    # Found by the model's sha256 (run.json names no run), not the newest train run; the report points here.
    sha = model_sha256([Path(params.paths.model_dir) / "best.ckpt"])
    assert first.data.tags[MODEL_SHA_TAG] == sha and "run_id" not in json.loads(
        Path(params.paths.model_dir, "run.json").read_text()
    )
    assert not evaluation_runs(tracking.model_run("0" * 64).info.run_id)  # the decoy got nothing
    assert not mlflow.MlflowClient().get_run(run_id).data.metrics  # the train run's record is its own
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(first.info.run_id, "evaluation")}
    assert {
        f"evaluation/{name}"
        for name in (
            "plots",
            "metrics.json",
            "metrics_detail.json",
            "report.md",
            "confusion.csv",
            "decision.json",
            "label_audit.csv",
        )
    } <= listed
    # The report's relative links resolve in the artifact viewer: plots/<image> beside report.md.
    report = Path(mlflow.artifacts.download_artifacts(run_id=first.info.run_id, artifact_path="evaluation"))
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", (report / "report.md").read_text())
    assert links and all((report / link).is_file() for link in links)


def test_an_evaluate_only_experiment_adds_a_record_and_leaves_the_earlier_one(project, monkeypatch):
    """`dvc exp run -S evaluate.…=…` reruns only evaluate: its record is a new nested run named after the
    experiment; the earlier evaluation's metrics and report stay as they were."""
    _, params, run_id = project
    first = evaluation_runs(run_id)[0]
    client = mlflow.MlflowClient()
    before = client.get_run(first.info.run_id).data.metrics
    before_report = client.download_artifacts(first.info.run_id, "evaluation/report.md")
    before_text = Path(before_report).read_text()
    monkeypatch.setenv("DVC_EXP_NAME", "wide-sets")
    stage.main(tiny_params(conformal_alpha=0.3), argparse.Namespace())
    runs = evaluation_runs(run_id)
    latest = runs[-1]
    assert latest.info.run_id != first.info.run_id and latest.data.tags["dvc.exp_name"] == "wide-sets"
    assert latest.info.run_name.endswith(":wide-sets") and latest.data.metrics["conformal/alpha"] == 0.3
    assert client.get_run(first.info.run_id).data.metrics == before
    after = Path(client.download_artifacts(first.info.run_id, "evaluation/report.md")).read_text()
    assert after == before_text and "Conformal" not in after
    assert not client.get_run(run_id).data.metrics
    stage.main(params, argparse.Namespace())  # back to the fixture's settings for the other tests


def test_report_warns_and_embeds_the_plots(project):
    _, params, _ = project
    report = Path(params.paths.report)
    text = report.read_text()
    warnings = text.split("## Warnings")[1].split("\n## ")[0]
    assert (
        "Random initialization" in warnings and "Wide intervals" in warnings and "Fewer than 10" in warnings
    )
    for image in evaluation.IMAGES:
        assert f"]({Path(params.paths.plots).name}/{image})" in text
        assert (report.parent / Path(params.paths.plots).name / image).is_file()
    assert "## Calibration" in text and "Temperature T =" in text and "| model | `resnet18` |" in text
    stage.main(params, argparse.Namespace())  # an identical run: the report (git-tracked) does not change
    assert report.read_text() == text


def test_the_report_is_the_same_bytes_for_the_same_inputs_and_says_where_its_date_and_run_are(project):
    """The report is a DVC output: no date and no MLflow run id in it (dvc.lock reproduces in a fresh clone);
    its provenance names the model's sha256, under which MLflow holds the evaluation's date and run."""
    _, params, run_id = project
    first = Path(params.paths.report).read_text()
    provenance = first[first.index("## Provenance") :].split("\n## ")[0]
    sha = model_sha256([Path(params.paths.model_dir) / "best.ckpt"])
    assert f"`{MODEL_SHA_TAG}` = `{sha}`" in provenance and "| code (git commit) |" in provenance
    assert re.search(r"\d{4}-\d{2}-\d{2}", first) is None and run_id not in first
    for latest in evaluation_runs(run_id):
        assert latest.info.run_id not in first
    stage.main(params, argparse.Namespace())
    assert Path(params.paths.report).read_text() == first


def test_evaluate_names_the_sha_and_store_when_no_train_run_has_the_model(project, monkeypatch, tmp_path):
    _, params, _ = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    sha = model_sha256([Path(params.paths.model_dir) / "best.ckpt"])
    with pytest.raises(
        tracking.TrackingError, match=f"{MODEL_SHA_TAG} = {sha} in the store sqlite:///.*other.db"
    ):
        stage.main(params, argparse.Namespace())
    tracking.use_tracking_uri(f"sqlite:///{Path.cwd() / 'mlflow.db'}")  # as set_tracking_uri, env untouched


def test_a_positive_class_on_a_multiclass_set_fails_before_any_work(project):
    _, params, _ = project
    before = Path(params.paths.metrics).stat().st_mtime_ns
    with pytest.raises(evaluation.EvaluationError, match=r"evaluate.positive_class"):
        stage.main(tiny_params(positive_class="alpha"), argparse.Namespace())
    with pytest.raises(decision.DecisionError, match=r"evaluate.threshold"):
        stage.main(tiny_params(threshold="youden"), argparse.Namespace())
    assert Path(params.paths.metrics).stat().st_mtime_ns == before


def test_dvc_plots_output_is_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "dvc_plots/index.html"], cwd=REPO)
    assert ignored.returncode == 0  # `dvc plots show` leaves the tree clean


def test_label_audit_and_decision_are_written_for_the_validation_split(project):
    _, params, _ = project
    table = pd.read_csv(params.paths.label_audit)
    val = load_prepared(Path(params.paths.prepared)).split("val")
    assert list(table.columns) == ["path", "given", "suggested", "score", "issue"]
    assert sorted(table["path"]) == sorted(val["path"]) and table["score"].is_monotonic_increasing
    text = Path(params.paths.report).read_text()
    assert "## Label audit" in text and f"]({Path(params.paths.plots).name}/label_audit.png)" in text
    assert (Path(params.paths.plots) / "label_audit.png").stat().st_size > 1000
    made = decision.Decision.read(params.paths.decision)
    assert (
        made.model_sha256 == model_sha256([Path(params.paths.model_dir) / "best.ckpt"])
        and made.threshold is None
        and made.conformal_quantile is None
    )  # 3 classes, off


def test_the_registered_version_gets_the_test_metrics_and_promote_finds_its_evaluation(project, capsys):
    """The train run's registered version (here registered by hand, as log_model does) is tagged by evaluate;
    promote matches reports/metrics.json to the evaluate run that wrote it and moves the alias."""
    from pipeline.__main__ import main as cli

    root, params, run_id = project
    client = mlflow.MlflowClient()
    name = params.mlflow.model_name("tiny")
    client.create_registered_model(name)
    version = str(client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id).version)
    (root / "params.yaml").write_text(yaml.safe_dump(config.as_dict(params)))
    stage.main(params, argparse.Namespace())
    tags = client.get_model_version(name, version).tags
    headline = json.loads(Path(params.paths.metrics).read_text())
    assert tags["test/accuracy"] == f"{headline['test/accuracy']:.4f}"
    assert tags[registry.EVALUATED] == evaluation_runs(run_id)[-1].info.run_id
    assert cli(["--params", str(root / "params.yaml"), "promote"]) == 0
    assert f"models:/{name}@champion is now version {version}" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
