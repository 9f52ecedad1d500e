"""The notebooks and pipeline.notebook: each notebook runs end to end against a tiny pipeline run, and
is committed without outputs."""

import io
import shutil
from pathlib import Path

import mlflow
import nbformat
import pandas as pd
import pytest
from conftest import REPO, in_project, run_stages, write_tiny_params
from nbclient import NotebookClient

from pipeline import notebook as nb
from pipeline.errors import PipelineError

NOTEBOOKS = REPO / "notebooks"
# What each notebook must show when run against the tiny run below (its text outputs), and how many figures.
EXPECTED = {
    "01_explore_data": (["1 sets of identical files", "copy_of_", "share"], 2),
    "02_compare_runs": (["tune-trial", "one-epoch", "best train run:", "train.max_epochs"], 2),
    "03_error_analysis": (["test images misclassified", "p_actual", "share_of_actual"], 2),
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """Every stage on tiny params, then a second train, as `dvc exp run -n one-epoch -S train.max_epochs=1` would."""
    root = tmp_path_factory.mktemp("notebooks") / "project"
    root.mkdir()
    write_tiny_params(root / "params.yaml")
    write_tiny_params(root / "one_epoch.yaml", train={"max_epochs": 1})
    with in_project(root):
        run_stages("demo")
        first = sorted((root / "data" / "raw" / "demo").rglob("*.png"))[0]
        shutil.copy2(first, first.with_name(f"copy_of_{first.name}"))  # an exact duplicate for 01 to find
        run_stages("ingest", "augment", "tune", "train", "evaluate")
    with in_project(root, exp_name="one-epoch"):
        run_stages("train", params="one_epoch.yaml")
    return root


def demo_store(root: Path, experiments: dict[str, dict] | None = None) -> Path:
    """A project whose MLflow store has the default demo's shape, written through the pipeline's own tracking:
    tune.enabled false, so one train run and no tune runs; then a train run per ``experiments`` entry
    (``dvc exp run -n NAME -S key=value ...``), with the validation and test metrics a train run gets."""
    from pipeline import config, tracking

    root.mkdir(parents=True, exist_ok=True)
    write_tiny_params(root / "params.yaml", tune={"enabled": False})
    with in_project(root):
        base = config.load(root / "params.yaml")
        tracking.setup(base.mlflow)
        for i, (name, changes) in enumerate({"": {}, **(experiments or {})}.items()):
            params = config.with_overrides(base, changes)
            tags = tracking.lineage_tags(root / "data" / "raw" / "demo", name or None)
            with mlflow.start_run(
                run_name=tracking.run_name("train", "resnet18", tags), tags=tags | {"stage": "train"}
            ):
                tracking.log_params(params)
                for epoch in range(2):
                    mlflow.log_metrics(
                        {"val/auroc": 0.8 + 0.05 * epoch + 0.01 * i, "val/loss": 0.5 - 0.1 * epoch},
                        step=epoch,
                    )
                mlflow.log_metrics({"test/balanced_accuracy": 0.7 + 0.01 * i, "test/auroc": 0.85})
    return root


STRING_PARAMS = {  # each dvc exp run varies a string-valued param; threshold is a number in the first run
    "preset-none": {"augment.preset": "none"},
    "youden": {"evaluate.threshold": "youden", "augment.preset": "natural"},
}


@pytest.mark.slow
@pytest.mark.parametrize("experiments", [None, STRING_PARAMS], ids=["default-demo", "string-params"])
def test_compare_runs_notebook_on_the_default_demo_and_string_params(tmp_path, experiments):
    """The default demo runs no study (no tune-trial run: best_run raised), and a string param on a plot's axis
    raised matplotlib's 'This method only works with the ScalarFormatter'."""
    root = demo_store(tmp_path / "project", experiments)
    text, images = outputs(execute(NOTEBOOKS / "02_compare_runs.ipynb", root))
    assert "best train run:" in text and "No Optuna trial ran" in text and images == 2
    if experiments:
        assert "youden" in text and "augment.preset" in text


def test_metric_against_a_string_or_mixed_param_is_a_categorical_axis(tmp_path):
    root = demo_store(tmp_path / "project", STRING_PARAMS)
    runs = nb.runs_table(nb.open_project(root))
    assert not pd.api.types.is_numeric_dtype(runs["evaluate.threshold"])  # 0.5 beside youden
    varying = nb.param_columns(runs)
    assert {"augment.preset", "evaluate.threshold"} <= set(varying)
    fig = nb.plot_metric_vs_params(runs, "val/auroc", varying, by="dvc_exp")
    fig.savefig(io.BytesIO(), format="png")  # draws the tick labels
    labels = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()}
    assert {"youden", "0.5", "none", "natural", "medical"} <= labels
    assert nb.best_trial(runs, "val/auroc") is None


@pytest.fixture(autouse=True)
def mlflow_uri_restored(monkeypatch):
    """runs_table points MLflow (and so $MLFLOW_TRACKING_URI) at a project's store: undone after each test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # recorded, so that teardown removes it again
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    uri = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(uri)


def execute(path: Path, root: Path) -> nbformat.NotebookNode:
    """Run a notebook as Jupyter would (cwd: its folder), with ROOT set after its parameters cell (as papermill does)."""
    notebook = nbformat.read(path, as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell(f"ROOT = {str(root)!r}", metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(at + 1, injected)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # the kernel inherits this environment
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
        ).execute()
    return notebook


def outputs(notebook: nbformat.NotebookNode) -> tuple[str, int]:
    """All text the code cells showed, and the number of images."""
    texts, images = [], 0
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            texts.append(out.get("text", ""))
            data = out.get("data", {})
            texts.append(data.get("text/plain", "") + data.get("text/html", ""))
            images += "image/png" in data
    return "\n".join(texts), images


def test_notebooks_are_committed_thin_and_without_outputs():
    found = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert found == sorted(EXPECTED)
    for path in NOTEBOOKS.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        code = [c for c in notebook.cells if c.cell_type == "code"]
        dirty = [i for i, c in enumerate(code) if c.outputs or c.execution_count is not None]
        assert not dirty, (
            f"{path.name}: code cells {dirty} hold outputs; clear them before committing "
            "(Jupyter: Edit > Clear Outputs of All Cells)"
        )
        params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1 and params[0].source.startswith("ROOT = "), (
            f"{path.name}: no ROOT parameters cell"
        )
        source = "\n".join(c.source for c in code)
        assert "from pipeline import notebook as nb" in source
        logic = [
            line for line in source.splitlines() if line.lstrip().startswith(("def ", "class ", "lambda"))
        ]
        assert not logic, f"{path.name}: defines {logic}; put functions in pipeline/notebook.py"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_against_a_tiny_pipeline_run(name, tiny_run):
    text, images = outputs(execute(NOTEBOOKS / f"{name}.ipynb", tiny_run))
    expected, figures = EXPECTED[name]
    missing = [s for s in expected if s not in text]
    assert not missing, f"{name} did not show {missing}"
    assert images == figures


def test_runs_table_has_trials_and_experiments_with_params_as_numbers(tiny_run):
    runs = nb.runs_table(nb.open_project(tiny_run))
    assert sorted(runs["stage"]) == ["evaluate", "train", "train", "tune", "tune-trial", "tune-trial"]
    assert runs["train.lr"].dtype.kind == "f" and runs["train.max_epochs"].dtype.kind in "if"
    trials = runs[runs["stage"] == "tune-trial"]
    assert set(trials["parent_run_id"]) == set(runs.loc[runs["stage"] == "tune", "run_id"])
    train = runs[runs["stage"] == "train"]
    assert sorted(train["dvc_exp"].fillna("")) == ["", "one-epoch"]
    assert nb.param_columns(train) == ["train.max_epochs"]
    # The evaluated train run shows its nested evaluate run's test metrics, and says which run they are from.
    assert train["test/accuracy"].notna().sum() == 1 and "val/loss" in nb.metric_columns(runs)
    evaluated = train[train["test/accuracy"].notna()].iloc[0]
    evaluation = runs[runs["stage"] == "evaluate"].iloc[0]
    assert evaluated["evaluation_run_id"] == evaluation["run_id"] == runs.loc[evaluation.name, "run_id"]
    assert evaluation["parent_run_id"] == evaluated["run_id"]
    assert evaluated["test/accuracy"] == evaluation["test/accuracy"]
    best = nb.best_run(runs, "val/loss", stage="tune-trial")
    assert best["val/loss"] == trials["val/loss"].min()
    assert (
        nb.best_run(runs, "val/loss", stage="tune-trial", mode="max")["val/loss"] == trials["val/loss"].max()
    )
    with pytest.raises(PipelineError, match="no tune run has the metric 'test/accuracy'"):
        nb.best_run(runs, "test/accuracy", stage="tune")


def test_data_helpers_show_the_report(tiny_run):
    project = nb.open_project(tiny_run)
    report = nb.data_report(project)
    balance = nb.class_balance(report)
    assert balance["total"].sum() == report["n_images"] == 4 * 8 + 1
    assert list(balance.index) == report["classes"] and balance["share"].sum() == pytest.approx(1, abs=0.01)
    dups = nb.duplicates(report, project.root)
    assert len(dups) == 2 and set(dups["kind"]) == {"exact"} and dups["path"].str.contains("copy_of_").any()
    assert not dups["path"].str.startswith("/").any()
    assert set(nb.formats(report)["property"]) == {"mode", "bits", "size"}


def test_error_helpers_on_the_test_split(tiny_run):
    project = nb.open_project(tiny_run)
    data = nb.prepared(project)
    predictions = nb.predict_test_split(nb.load_model(project), data)
    evaluated = pd.read_csv(project.path("confusion"))  # evaluate's predictions of the first model
    assert list(predictions["actual"]) == list(evaluated["actual"])
    mistakes = nb.misclassified(predictions)
    assert len(mistakes) == (predictions["actual"] != predictions["predicted"]).sum()
    assert mistakes["confidence"].is_monotonic_decreasing
    assert nb.confusion_pairs(predictions)["count"].sum() == len(mistakes)
    assert nb.mistakes_gradcam(nb.load_model(project), predictions, data, n=2).startswith(b"\x89PNG")


def test_confusion_pairs_counts_and_shares():
    predictions = pd.DataFrame(
        {
            "actual": ["a", "a", "a", "a", "b", "b"],
            "predicted": ["a", "b", "b", "c", "b", "a"],
            "confidence": [0.9, 0.8, 0.6, 0.7, 0.9, 0.5],
        }
    )
    assert list(nb.misclassified(predictions)["confidence"]) == [0.8, 0.7, 0.6, 0.5]
    pairs = nb.confusion_pairs(predictions)
    assert pairs.values.tolist() == [["a", "b", 2, 0.5], ["a", "c", 1, 0.25], ["b", "a", 1, 0.5]]


def test_tracking_uri_is_resolved_against_the_project(tmp_path, monkeypatch):
    write_tiny_params(tmp_path / "params.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert nb.open_project(tmp_path).tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert nb.open_project(tmp_path).tracking_uri == "http://127.0.0.1:5001"


def test_runs_of_other_data_sets_are_not_ranked_together():
    import pandas as pd

    runs = pd.DataFrame(
        {
            "run_id": ["a", "b", "c"],
            "stage": "train",
            "dataset": ["demo", "xray", "xray"],
            "val/loss": [0.1, 0.5, 0.4],
        }
    )
    xray = nb.for_dataset(runs, "xray")
    assert list(xray["run_id"]) == ["b", "c"] and nb.best_run(xray, "val/loss")["run_id"] == "c"
    assert nb.best_run(nb.for_dataset(runs, None), "val/loss")["run_id"] == "a"  # demo's easy tiles would win
    with pytest.raises(PipelineError, match=r"no run on data set 'ct'.*\['demo', 'xray'\]"):
        nb.for_dataset(runs, "ct")
