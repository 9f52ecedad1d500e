"""Several processes fill one study: tune.n_jobs local workers on SQLite, `tune --worker` commands on PostgreSQL.

The PostgreSQL tests use $PIPELINE_TEST_POSTGRES_URL (a server whose user may create databases), else
start a throwaway server from the local PostgreSQL binaries (`apt-get install postgresql`; as root,
through the `postgres` user), else skip saying so.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
import sqlalchemy
import yaml

from pipeline import augment, tune
from pipeline.config import as_dict, with_overrides
from pipeline.stages import train
from pipeline.stages import tune as tune_stage

POSTGRES_ENV = "PIPELINE_TEST_POSTGRES_URL"
STAGE = argparse.Namespace(worker=False, params="params.yaml")  # `python -m pipeline tune`


def _postgres_bindir() -> Path | None:
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return installed[-1].parent if installed else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server URL: $PIPELINE_TEST_POSTGRES_URL, else a throwaway server for this session."""
    if url := os.environ.get(POSTGRES_ENV):
        yield url
        return
    bindir = _postgres_bindir()
    if bindir is None:
        pytest.skip(
            f"PostgreSQL tests need ${POSTGRES_ENV} or the server binaries (apt-get install postgresql)"
        )
    as_postgres = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("PostgreSQL tests run as root need a 'postgres' user to run the server as")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="pipeline-postgres-"))  # under /tmp: the postgres user can reach it
    if as_postgres:
        shutil.chown(root, "postgres")
    data, port = root / "data", _free_port()
    ctl = [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [
            *as_postgres,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*ctl, "-l", str(root / "server.log"), "-w", "-o", f"-h 127.0.0.1 -p {port} -k {root} -F", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh database for one test, so a kept server never holds an earlier run's study."""
    name = f"optuna_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield sqlalchemy.make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


def stage_params(tiny_params, prepared, tmp_path, storage: str, **overrides):
    """Params whose paths point at the tiny prepared set in tmp_path, as the tune stage reads them."""
    pipeline_file = tmp_path / "augment" / "train_transforms.json"
    pipeline_file.parent.mkdir()
    augment.save(augment.build([{"name": "HorizontalFlip", "p": 0.5}], seed=0), pipeline_file)
    return with_overrides(
        tiny_params,
        {
            "paths.raw": str(tmp_path / "raw"),
            "paths.prepared": str(tmp_path / "prepared"),
            "paths.augment_pipeline": str(pipeline_file),
            "paths.best_params": str(tmp_path / "tune" / "best.yaml"),
            "paths.tune_summary": str(tmp_path / "tune" / "summary.json"),
            "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "mlflow.artifact_root": str(tmp_path / "mlartifacts"),
            "tune.storage": storage,
            "tune.n_trials": 3,
            **overrides,
        },
    )


def check_filled(study: optuna.Study, n_trials: int) -> None:
    """Exactly n_trials finished trials, each with one MLflow run nested under the study's parent run;
    a failed trial only where a worker found its slot taken (it never ran)."""
    finished = study.get_trials(deepcopy=False, states=tune.DONE)
    assert len(finished) == n_trials
    assert all(t.user_attrs.get(tune.SURPLUS_ATTR) for t in study.trials if t.state not in tune.DONE)
    parent = study.user_attrs[tune.RUN_ID_ATTR]
    runs = [
        r
        for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
        if r.data.tags.get("stage") == "tune-trial"
    ]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == sorted(t.number for t in finished)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert len({t.user_attrs["worker"] for t in finished}) == 2, "both workers ran trials"


def test_n_jobs_worker_processes_fill_one_sqlite_study_and_best_params_reach_train(
    tiny_params, prepared, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = stage_params(
        tiny_params, prepared, tmp_path, f"sqlite:///{tmp_path}/optuna.db", **{"tune.n_jobs": 2}
    )
    tune_stage.main(params, STAGE)
    name, _, _ = tune_stage.study_of(params)
    study = optuna.load_study(study_name=name, storage=params.tune.storage)
    check_filled(study, 3)
    tuned, values = train.with_best_params(params)
    assert values == study.best_params and tuned.train.lr == study.best_params["train.lr"]


def test_worker_commands_fill_one_postgresql_study(
    tiny_params, prepared, tmp_path, postgres_url, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = stage_params(tiny_params, prepared, tmp_path, postgres_url)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(as_dict(params)))
    name, tags, _ = tune_stage.study_of(params)
    tune.create(params, name, tags)  # what the tune stage does first; workers on other machines then join

    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    command = [sys.executable, "-m", "pipeline", "--params", str(params_file), "tune", "--worker"]
    workers = [
        subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(outputs)

    study = optuna.load_study(study_name=name, storage=postgres_url)
    check_filled(study, 3)
    tune_stage.main(params, STAGE)  # the stage finds the study full: summary and best params, no new trial
    assert len(optuna.load_study(study_name=name, storage=postgres_url).trials) == len(study.trials)
    assert yaml.safe_load(Path(params.paths.best_params).read_text()) == study.best_params


def test_a_worker_needs_the_study_created_by_the_tune_stage(
    tiny_params, prepared, tmp_path, postgres_url, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    params = stage_params(tiny_params, prepared, tmp_path, postgres_url)
    with pytest.raises(tune.TuneError, match="start the tune stage first"):
        tune_stage.main(params, argparse.Namespace(worker=True, params="params.yaml"))


def test_a_launch_of_two_ranks_runs_one_trial_at_a_time_not_one_per_rank(tiny_params, prepared, tmp_path):
    """torchrun starts `python -m pipeline tune` once per rank: only rank 0 is a worker (trials are one-device
    fits); rank 1 starts no trial and writes nothing, so the study holds n_trials trials of one worker."""
    params = stage_params(
        tiny_params, prepared, tmp_path, f"sqlite:///{tmp_path}/optuna.db", **{"tune.n_trials": 2}
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(as_dict(params), sort_keys=False))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*launch, "-m", "pipeline", "tune", "--params", "params.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "rank 1 of a multi-process launch starts no trial" in done.stdout
    name, _, _ = tune_stage.study_of(params)
    study = optuna.load_study(study_name=name, storage=params.tune.storage)
    assert len(study.trials) == 2 and {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 1  # one worker process, not one per rank
    assert (tmp_path / "tune" / "best.yaml").is_file()
