"""MLflow: where runs go, the experiment they belong to, and the lineage tags every run carries.

Nothing here runs at import time; stages call :func:`setup` once and open their own runs.
``python -m pipeline tracking`` prints the MLflow UI's link to the experiment's runs table (``make ui``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import mlflow
import sqlalchemy
import yaml
from mlflow.entities import Run

from pipeline.config import Params, Tracking, as_dict, flatten
from pipeline.credentials import redact
from pipeline.data.layout import SHARDS_CSV
from pipeline.environ import environ
from pipeline.errors import PipelineError, database_advice, database_error
from pipeline.runinfo import MODEL_SHA_TAG, RUN_INFO

HELP = """tracking: print the MLflow UI's link to the experiment's runs table (what `make ui` opens): the store
is --tracking-uri, else $MLFLOW_TRACKING_URI, else mlflow.tracking_uri in params.yaml."""

# The MLflow UI treats experiments with this tag as model-training experiments (runs table first).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# Longer flattened values go to an artifact: the UI's params table and compare view cut long strings.
ENV_URI = "MLFLOW_TRACKING_URI"  # the user's store, which wins over mlflow.tracking_uri
MAX_PARAM_CHARS = 250
PARAMS_ARTIFACT_DIR = "params"
PROBE_TIMEOUT_S = 5.0  # one request to a tracking server; MLflow's own client retries for minutes
# Where a local store records artifact locations (absolute, as MLflow writes them): rewritten when it moved.
ARTIFACT_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


class TrackingError(PipelineError, RuntimeError):
    """The tracking store cannot be reached; the message names its URI and where the URI came from."""


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def absolute_uri(uri: str, root: Path | None = None) -> str:
    """A local store's URI with its path made absolute against ``root`` (default: the cwd).

    MLflow keeps one store object per URI string for the life of the process: a relative
    ``sqlite:///mlflow.db`` would keep pointing at the first project's file after a change of
    directory (a notebook, or tests, working on several projects).
    """
    root = Path.cwd() if root is None else root
    for scheme in ("sqlite:///", "file:"):
        if uri.startswith(scheme) and not uri.startswith(scheme + "/"):
            return scheme + str((root / uri.removeprefix(scheme)).resolve())
    return uri if "://" in uri else str((root / uri).resolve())


def use_tracking_uri(uri: str) -> None:
    """``mlflow.set_tracking_uri`` without its side effect on the environment.

    MLflow also exports the URI as ``$MLFLOW_TRACKING_URI`` (for subprocesses); a later stage or notebook
    call in the same process would then take it for the user's choice, which wins over params.yaml. The
    variable is put back as it was, so it keeps meaning what the user set.
    """
    with environ(keep=[ENV_URI]):
        mlflow.set_tracking_uri(uri)


def check_reachable(uri: str, source: str) -> None:
    """One request with a short timeout to an http(s) tracking server, so that a server that is down is
    one clear error at stage start instead of MLflow's minutes of silent retries and a traceback.

    Any HTTP answer (even 401 or 404) means the server is there; MLflow reports what it answers itself.
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests  # MLflow's own HTTP client

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
    except requests.RequestException as err:
        reason = (
            type(err).__name__
            if isinstance(err, requests.Timeout)
            else redact(str(err.args[0] if err.args else err))
        )
        raise TrackingError(
            f"MLflow tracking server {redact(uri)} (from {source}) cannot be reached within "
            f"{PROBE_TIMEOUT_S:.0f} s ({reason}); start it, or point {source} at a running "
            "one"
        ) from None


def relocate_artifacts(uri: str, cfg: Tracking, experiment: mlflow.entities.Experiment) -> str:
    """Keep a local store usable after its project moved (copied, renamed, cloned elsewhere); return the
    experiment's artifact location as it now is.

    MLflow stores artifact locations as absolute paths (it resolves a relative one at creation), so a
    moved project would keep writing into the original folder. When the experiment's location is
    ``<another folder>/<mlflow.artifact_root>`` for a relative ``artifact_root``, every stored location
    under it (experiment, runs, logged models, model versions) is rewritten to the same path under the
    project's folder (the cwd, as for the store URI). Only a store file inside the project moved with it:
    a store elsewhere (an absolute ``MLFLOW_TRACKING_URI`` shared by ``dvc queue``'s temporary copies of
    the project) keeps its locations. Written here because MLflow has no API to change
    an artifact location (mlflow/mlflow#3144); only these columns are touched, in one transaction.
    """
    stored, root = experiment.artifact_location, Path(cfg.artifact_root)
    if not uri.startswith("sqlite:") or root.is_absolute() or not stored.startswith("file:"):
        return stored
    current = root.resolve().as_uri()
    store_file = Path(uri.removeprefix("sqlite:///")).resolve()
    if (
        stored == current
        or not stored.endswith("/" + root.as_posix().strip("/"))
        or not store_file.is_relative_to(Path.cwd().resolve())
    ):
        return stored

    engine = sqlalchemy.create_engine(uri)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
        with engine.begin() as db:
            for table, column in ARTIFACT_COLUMNS:
                if table in tables:
                    db.execute(
                        sqlalchemy.text(
                            f"UPDATE {table} SET {column} = :new || substr({column}, :n + 1) "
                            f"WHERE {column} = :old OR substr({column}, 1, :n + 1) = :old || '/'"
                        ),
                        {"old": stored, "new": current, "n": len(stored)},
                    )
    finally:
        engine.dispose()
    return current


def setup(cfg: Tracking, env_uri: str | None = None) -> str:
    """Point MLflow at the store (``env_uri`` wins over params) and its experiment; return the experiment id."""
    uri = absolute_uri(env_uri or cfg.tracking_uri)
    check_reachable(uri, ENV_URI if env_uri else "mlflow.tracking_uri in params.yaml")
    use_tracking_uri(uri)
    try:
        return _open_experiment(uri, cfg)
    # The local store file: damaged, truncated, locked, read-only (MLflow wraps the error once its store is open).
    except (sqlalchemy.exc.DatabaseError, mlflow.exceptions.MlflowException) as err:
        if (reason := database_error(err)) is None:
            raise
        raise TrackingError(
            f"MLflow tracking store {redact(uri)} (from {ENV_URI if env_uri else 'mlflow.tracking_uri'}) cannot "
            f"be used ({reason}): {database_advice(reason)}"
        ) from None


def _open_experiment(uri: str, cfg: Tracking) -> str:
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        # A local store keeps artifacts beside it in the repository, not in MLflow's cwd-relative default.
        location = Path(cfg.artifact_root).resolve().as_uri() if _is_local(uri) else None
        experiment_id = mlflow.create_experiment(
            cfg.experiment, artifact_location=location, tags=EXPERIMENT_KIND
        )
    else:
        experiment_id = experiment.experiment_id
        relocate_artifacts(uri, cfg, experiment)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def data_version(raw_dir: Path, lock_file: Path = Path("dvc.lock")) -> str:
    """The DVC hash of a data set folder: from its ``.dvc`` file (intake) or ``dvc.lock`` (a stage output).

    A set in the shard layout: ``md5:`` and the md5 of its manifest, which names every file's sha256, label
    and place in a shard (ingest checks the shards against it), so it identifies the set's content.
    """
    if (manifest := raw_dir / SHARDS_CSV).is_file():
        return "md5:" + hashlib.md5(manifest.read_bytes()).hexdigest()
    dvc_file = raw_dir.with_name(raw_dir.name + ".dvc")
    entries = []
    if dvc_file.is_file():
        entries = yaml.safe_load(dvc_file.read_text()).get("outs", [])
        entries = [dict(e, path=str(raw_dir)) for e in entries]
    elif lock_file.is_file():
        stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
        entries = [out for stage in stages.values() for out in stage.get("outs", [])]
    for out in entries:
        if Path(out["path"]) == raw_dir and "md5" in out:
            return out["md5"]
    return "unversioned"


# What the pipeline runs: a commit that changes none of these (dvc.lock, the reports, docs) leaves the code's
# version as it was. The data are not here: their version is the DVC hash (data_version).
CODE_PATHS = ("pipeline", "params.yaml", "dvc.yaml", "pyproject.toml")


def code_version(paths: tuple[str, ...] = CODE_PATHS) -> tuple[str, bool | None]:
    """The last commit that changed the code the pipeline runs (``paths``), and whether those paths differ from
    it now (new files under them included); ("unknown", None) outside a git repository.

    Unlike HEAD, it stays the same when a later commit only records outputs (dvc.lock, reports/), so a report
    that names it is the same bytes in a fresh clone of either commit.
    """
    commit = _git("log", "-1", "--format=%H", "--", *paths)
    status = _git("status", "--porcelain", "--", *paths)
    return commit or "unknown", None if status is None else bool(status)


def model_run(sha256: str) -> Run:
    """The newest MLflow train run tagged ``model.sha256`` = ``sha256``: the run that trained the model whose
    checkpoints have that hash (``models/run.json``'s ``model_sha256``), in any experiment of the current store."""
    uri = mlflow.get_tracking_uri()
    if not sha256:
        raise TrackingError(
            f"{RUN_INFO}: records no model_sha256 (written before 2026-12-07, when it named the MLflow run): "
            "rerun the train stage (dvc repro train)"
        )
    found = mlflow.search_runs(
        filter_string=f"tags.`{MODEL_SHA_TAG}` = '{sha256}' and tags.stage = 'train'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
        search_all_experiments=True,
    )
    if not found:
        raise TrackingError(
            f"no MLflow train run tagged {MODEL_SHA_TAG} = {sha256} in the store {redact(uri)}: the model in the "
            "model folder was trained against another store (set MLFLOW_TRACKING_URI or mlflow.tracking_uri "
            "to it), or its run was deleted; rerun the train stage (dvc repro train -f) to record it here"
        )
    run: Run = found[0]
    return run


def lineage_tags(raw_dir: Path, exp_name: str | None) -> dict[str, str]:
    """Git commit and dirtiness, DVC experiment name, data version: on every run."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    tags = {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
        "data.dataset": raw_dir.name,
        "data.version": data_version(raw_dir),
    }
    if exp_name:
        tags["dvc.exp_name"] = exp_name
    return tags


def run_name(stage: str, arch: str, tags: dict[str, str]) -> str:
    """``stage:dataset:arch[:dvc experiment]`` (e.g. ``tune:demo:resnet18:exp-1``, ``trial-3:...``), one
    scheme for every run, so the runs table scans by data set, model and experiment."""
    return ":".join(
        part for part in (stage, tags.get("data.dataset"), arch, tags.get("dvc.exp_name")) if part
    )


def log_params(params: Params) -> None:
    """All params under their params.yaml names, plus the full mapping as an artifact.

    A value longer than ``MAX_PARAM_CHARS`` (a transform list, say) is logged whole as
    ``params/<key>.json``; the param then holds a pointer to that artifact instead of a cut string.
    """
    logged = {}
    for key, value in flatten(params).items():
        text = "" if value is None else redact(str(value))
        if len(text) > MAX_PARAM_CHARS:
            artifact = f"{PARAMS_ARTIFACT_DIR}/{key}.json"
            mlflow.log_text(redact(_pretty_json(value)), artifact)
            text = f"see artifact {artifact}"
        logged[key] = text
    mlflow.log_params(logged)
    mlflow.log_text(redact(json.dumps(as_dict(params), indent=2)), "params.json")


def _pretty_json(value: Any) -> str:
    """Indented JSON of a flattened value (``flatten`` has already JSON-encoded lists)."""
    with contextlib.suppress(ValueError):  # a plain long string stays as it is
        value = json.loads(value) if isinstance(value, str) else value
    return json.dumps(value, indent=2)


def log_dataset(raw_dir: Path, version: str, context: str = "training") -> None:
    """Record the data set folder as the active run's MLflow dataset input (the UI's Dataset column).

    Name is the folder's name, source its path, digest the DVC hash (``data_version``), so each run
    shows which data version it used.
    """
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local source twice ('' and 'file') and warns
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(str(raw_dir))
    dataset = MetaDataset(source, name=raw_dir.name, digest=version)  # type: ignore[abstract]  # MLflow's stubs: profile is defined
    mlflow.log_input(dataset, context=context)


def ui_url(experiment_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI's runs table of an experiment (MLflow 3 otherwise opens its GenAI overview)."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_url(experiment_id: str, run_id: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """The MLflow UI's page of one run (params, metrics, artifacts)."""
    return f"http://{host}:{port}/#/experiments/{experiment_id}/runs/{run_id}"


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """The numeric entries of ``metrics`` (strings and flags such as ``weights/pretrained`` are skipped)."""
    numbers = {
        k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    mlflow.log_metrics(numbers, step=step)


def log_model(
    model: Any,
    example: Any,
    name: str = "model",
    registered_model: str | None = None,
    signature: Any = None,
    metadata: dict[str, str] | None = None,
) -> str | None:
    """Log a network with ``mlflow.pytorch`` on the active run (signature given, else inferred from ``example``).

    With ``registered_model`` (``config.Tracking.model_name``), the logged model also becomes the next
    version of that registered model; that version is returned (None when not registered). Serving loads
    the version that ``promote`` named ``champion`` (``pipeline.registry``), never ``latest``.
    """
    import lightning
    import mlflow.pytorch
    import torch
    import torchmetrics
    import torchvision

    # Explicit requirements: MLflow's inference would reload the model in a subprocess (slow).
    requirements = [
        f"{m.__name__}=={m.__version__.split('+')[0]}" for m in (torch, torchvision, lightning, torchmetrics)
    ]
    info = mlflow.pytorch.log_model(
        model,
        name=name,
        input_example=example,
        signature=signature,
        metadata=metadata,
        pip_requirements=requirements,
        registered_model_name=registered_model,
        # torch.export, never pickle (MLflow's default on Databricks): weights loads only pt2 (transfer.py)
        serialization_format="pt2",
    )
    version = info.registered_model_version
    return None if version is None else str(version)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="store to look in (default: $MLFLOW_TRACKING_URI, else mlflow.tracking_uri)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the UI's host (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="the UI's port (default: %(default)s)")


def main(params: Params, args: argparse.Namespace) -> None:
    """Print the UI link to the runs table of the params' experiment (created when missing, as stages do)."""
    experiment_id = setup(params.mlflow, args.tracking_uri or os.environ.get(ENV_URI))
    print(ui_url(experiment_id, args.host, args.port))
