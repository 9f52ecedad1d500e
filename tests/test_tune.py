import json
import os

import mlflow
import optuna
import pytest

from pipeline import augment, config, tracking, tune
from pipeline.config import with_overrides
from pipeline.training.fit import datamodule
from pipeline.tune import study as tune_study
from pipeline.tune import trial as tune_trial
from pipeline.tune import workers as tune_workers


def test_study_logs_nested_trials_and_resumes_instead_of_restarting(
    tiny_params, prepared, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    params = with_overrides(tiny_params, {"tune.storage": f"sqlite:///{tmp_path}/optuna.db"})
    params = with_overrides(params, {"mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    exp_id = tracking.setup(params.mlflow)
    transform = augment.build([{"name": "HorizontalFlip", "p": 0.5}], seed=0)

    def data_for(p):
        return datamodule(p, prepared, transform)

    study, summary = tune.run(params, data_for, "s1", {"data.version": "v1"})
    assert summary["trials_complete"] + summary["trials_pruned"] == 2
    assert set(study.best_params) == {"train.lr", "train.weight_decay"}
    runs = mlflow.search_runs([exp_id], output_format="list")
    parent = [r for r in runs if r.data.tags.get("stage") == "tune"]
    trials = [r for r in runs if r.data.tags.get("stage") == "tune-trial"]
    assert len(parent) == 1 and len(trials) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in trials)
    assert all("val/loss" in r.data.metrics and "train.lr" in r.data.params for r in trials)
    assert {r.data.tags["optuna.state"] for r in trials} <= {"complete", "pruned"}

    # Same study again: nothing to run, same parent run. One more trial wanted: exactly one runs.
    tune.run(params, data_for, "s1", {"data.version": "v1"})
    more = with_overrides(params, {"tune.n_trials": 3})
    study, _ = tune.run(more, data_for, "s1", {"data.version": "v1"})
    assert len(study.trials) == 3
    assert len({t.params["train.lr"] for t in study.trials}) == 3, "a resumed sampler draws new values"
    runs = mlflow.search_runs([exp_id], output_format="list")
    assert sum(r.data.tags.get("stage") == "tune" for r in runs) == 1
    assert sum(r.data.tags.get("stage") == "tune-trial" for r in runs) == 3


def test_study_name_changes_with_search_space_and_data(tiny_params):
    base = tune.study_name(tiny_params, "v1")
    assert tune.study_name(tiny_params, "v1") == base
    assert tune.study_name(tiny_params, "v2") != base
    wider = with_overrides(
        tiny_params, {"tune.search_space": {"train.lr": {"type": "float", "low": 1e-5, "high": 1e-1}}}
    )
    assert tune.study_name(wider, "v1") != base
    # n_trials is a budget, not part of what makes trials comparable
    assert tune.study_name(with_overrides(tiny_params, {"tune.n_trials": 9}), "v1") == base


def test_suggest_covers_every_kind():
    from pipeline.config import SearchDim

    space = {
        "train.lr": SearchDim(type="float", low=1e-4, high=1e-2, log=True),
        "train.batch_size": SearchDim(type="categorical", choices=(8, 16)),
        "train.patience": SearchDim(type="int", low=1, high=4),
    }
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    values = tune.suggest(trial, space)
    assert (
        1e-4 <= values["train.lr"] <= 1e-2
        and values["train.batch_size"] in (8, 16)
        and 1 <= values["train.patience"] <= 4
    )


class PruneOddTrials(optuna.pruners.BasePruner):
    """Deterministic pruning for tests: every odd-numbered trial is pruned at its first report."""

    def prune(self, study, trial):
        return trial.number % 2 == 1


def _setup(tiny_params, prepared, tmp_path, monkeypatch, **overrides):
    monkeypatch.chdir(tmp_path)
    params = with_overrides(tiny_params, {"tune.storage": f"sqlite:///{tmp_path}/optuna.db", **overrides})
    params = with_overrides(params, {"mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"})
    exp_id = tracking.setup(params.mlflow)
    transform = augment.build([{"name": "HorizontalFlip", "p": 0.5}], seed=0)
    return params, exp_id, lambda p: datamodule(p, prepared, transform)


def trial_runs(exp_id):
    return [
        r
        for r in mlflow.search_runs([exp_id], output_format="list")
        if r.data.tags.get("stage") == "tune-trial"
    ]


def test_pruned_trials_are_pruned_in_optuna_and_mlflow_and_plots_reach_the_parent(
    tiny_params, prepared, tmp_path, monkeypatch
):
    params, exp_id, data_for = _setup(tiny_params, prepared, tmp_path, monkeypatch, **{"tune.max_epochs": 2})
    real = tune_study.make_pruner
    monkeypatch.setattr(tune_study, "make_pruner", lambda p: PruneOddTrials())
    study, summary = tune.run(params, data_for, "s", {})
    monkeypatch.setattr(tune_study, "make_pruner", real)
    assert [t.state for t in study.trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
    ]
    assert (summary["trials_complete"], summary["trials_pruned"]) == (1, 1)
    states = {
        r.data.tags["optuna.trial"]: (r.data.tags["optuna.state"], r.info.status) for r in trial_runs(exp_id)
    }
    assert states == {"0": ("complete", "FINISHED"), "1": ("pruned", "FINISHED")}
    parent = study.user_attrs[tune.RUN_ID_ATTR]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent, "study")}
    assert "study/optimization_history.png" in artifacts


def test_an_interrupted_study_resumes_and_its_trial_count_continues(
    tiny_params, prepared, tmp_path, monkeypatch, caplog
):
    params, exp_id, data_for = _setup(tiny_params, prepared, tmp_path, monkeypatch, **{"tune.n_trials": 3})
    real_fit, calls = tune_trial.fit, []

    def interrupted_on_second_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what Ctrl-C raises inside a trial
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(tune_trial, "fit", interrupted_on_second_trial)
    import pytest

    with pytest.raises(KeyboardInterrupt):
        tune.run(params, data_for, "s", {})
    # Optuna's line says the trial failed; its traceback of Ctrl-C is left out (the CLI says how to go on).
    failed = [
        r for r in caplog.records if r.name == "optuna.study._optimize" and "failed with param" in r.msg
    ]
    assert failed and not any(r.exc_info for r in failed)
    monkeypatch.setattr(tune_trial, "fit", real_fit)
    study = optuna.load_study(study_name="s", storage=params.tune.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]

    study, summary = tune.run(params, data_for, "s", {})
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert (summary["trials_complete"], summary["trials_failed"]) == (3, 1)
    states = sorted(r.data.tags["optuna.state"] for r in trial_runs(exp_id))
    assert states == ["complete", "complete", "complete", "failed"]
    parents = [
        r for r in mlflow.search_runs([exp_id], output_format="list") if r.data.tags.get("stage") == "tune"
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_trials_rank_settings_on_the_train_schedule_through_hyperband_rungs(tiny_params):
    params = with_overrides(
        tiny_params,
        {"tune.max_epochs": None, "tune.pruner": "hyperband", "train.max_epochs": 27, "tune.min_epochs": 3},
    )
    assert tune.trial_epochs(params) == 27  # null: the train stage's schedule
    assert tune.trial_epochs(with_overrides(params, {"tune.max_epochs": 5})) == 5
    pruner = tune.make_pruner(params)
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)

    # A synthetic objective (no training): the curve of a good lr keeps rising, a bad one stalls early.
    def objective(trial: optuna.Trial) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        quality = 1 - abs(lr - 1e-2) / 1e-1
        for epoch in range(27):
            value = quality * (1 - 0.5 ** (epoch + 1))
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned
        return value

    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=0), pruner=pruner
    )
    study.optimize(objective, n_trials=30)
    ran = {t.number: max(t.intermediate_values) + 1 for t in study.trials}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(ran[t.number] == 27 for t in complete), "survivors run the whole schedule"
    # Steps are 0-based epochs, as the Lightning callback reports them: rung 3 x 3^k is met after 4, 10 epochs.
    assert {ran[t.number] for t in pruned} <= {4, 10}, "pruned at the rungs 3 x 3^k"
    assert sum(ran.values()) < 0.7 * 27 * len(study.trials)


def test_a_failing_trial_is_recorded_as_failed_and_the_study_goes_on(
    tiny_params, prepared, tmp_path, monkeypatch
):
    # batch_size 0 is invalid: the seeded sampler draws it for the second trial.
    space = {
        "train.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
        "train.batch_size": {"type": "categorical", "choices": [0, 4]},
    }
    params, exp_id, data_for = _setup(
        tiny_params, prepared, tmp_path, monkeypatch, **{"tune.search_space": space}
    )
    tags = {"data.dataset": "tiny", "dvc.exp_name": "exp-1"}
    study, summary = tune.run(params, data_for, "s", tags)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert study.trials[1].params["train.batch_size"] == 0
    assert (summary["trials_complete"], summary["trials_failed"]) == (2, 1)
    runs = {r.data.tags["optuna.trial"]: r for r in trial_runs(exp_id)}
    assert (runs["1"].info.status, runs["1"].data.tags["optuna.state"]) == ("FAILED", "failed")
    assert "train.batch_size" in runs["1"].data.tags["optuna.error"]
    # Run names: stage, data set, arch, DVC experiment (issue #8)
    assert runs["2"].info.run_name == "trial-2:tiny:resnet18:exp-1"
    assert mlflow.get_run(study.user_attrs[tune.RUN_ID_ATTR]).info.run_name == "tune:tiny:resnet18:exp-1"


def test_a_worker_whose_slot_was_taken_meanwhile_stands_down(tiny_params):
    # Two workers counted one open slot at the same moment and both started a trial: the later one yields.
    params = with_overrides(tiny_params, {"tune.n_trials": 2})
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=1.0))
    first, second = study.ask(), study.ask()
    run_trial = tune.objective(params, data_for=None, parent_run_id="", experiment_id="", tags={})
    import pytest

    with pytest.raises(tune.SlotTaken):
        run_trial(second)
    assert second.user_attrs == {tune.SURPLUS_ATTR: True}
    assert not tune_trial._slot_taken(first, 2)


def test_best_params_reach_the_train_stage(tiny_params, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.stages import train

    best = tmp_path / "best_params.yaml"
    params = with_overrides(tiny_params, {"paths.best_params": str(best)})
    best.write_text("train.lr: 0.000123\ntrain.batch_size: 8\n")  # as the tune stage writes them
    tuned, values = train.with_best_params(params)
    assert (tuned.train.lr, tuned.train.batch_size) == (0.000123, 8) and values == {
        "train.lr": 0.000123,
        "train.batch_size": 8,
    }
    best.write_text("train.nope: 1\n")
    import pytest

    with pytest.raises(ConfigError, match=r"train.nope"):
        train.with_best_params(params)


def test_ctrl_c_inside_lightning_fails_the_trial_instead_of_leaving_it_running(
    tiny_params, prepared, tmp_path, monkeypatch, caplog
):
    import pytest

    params, _, data_for = _setup(tiny_params, prepared, tmp_path, monkeypatch, **{"tune.n_trials": 2})

    def ctrl_c_in_lightning(*args, **kwargs):
        raise SystemExit(1)  # what Lightning's trainer does on KeyboardInterrupt, after its graceful shutdown

    monkeypatch.setattr(tune_trial, "fit", ctrl_c_in_lightning)
    with pytest.raises(KeyboardInterrupt):
        tune.run(params, data_for, "s", {})
    # Optuna's line says the trial failed; its traceback of Ctrl-C is left out (the CLI says how to go on).
    failed = [
        r for r in caplog.records if r.name == "optuna.study._optimize" and "failed with param" in r.msg
    ]
    assert failed and not any(r.exc_info for r in failed)
    study = optuna.load_study(study_name="s", storage=params.tune.storage)
    assert [t.state.name for t in study.trials] == ["FAIL"]


def test_a_running_trial_whose_worker_process_is_gone_is_reclaimed(tmp_path):
    import socket
    import subprocess
    import sys

    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan, alive = study.ask(), study.ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{int(dead.stdout)}")  # killed by Ctrl-C, say
    alive.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    assert [t.number for t in tune_workers._trials(study, (optuna.trial.TrialState.RUNNING,))] == [
        alive.number
    ]
    assert study.trials[orphan.number].state == optuna.trial.TrialState.FAIL


def test_an_unreachable_postgresql_server_is_named_with_host_and_port(tiny_params):
    import socket

    import pytest

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    params = with_overrides(tiny_params, {"tune.storage": f"postgresql://optuna@127.0.0.1:{port}/optuna"})
    for create in (True, False):  # the tune stage, and tune --worker
        with pytest.raises(tune.TuneError, match=rf"server 127.0.0.1:{port} cannot be reached"):
            tune.open_study(params, "s", create=create)


def test_a_study_whose_mlflow_parent_run_is_gone_is_one_error_naming_both(
    tiny_params, prepared, tmp_path, monkeypatch
):
    from pipeline.tune.runs import create

    params, _, data_for = _setup(tiny_params, prepared, tmp_path, monkeypatch)
    parent = create(params, "s", {}).user_attrs[tune.RUN_ID_ATTR]
    mlflow.delete_run(parent)
    with pytest.raises(tune.TuneError, match=rf"study 's' .* parent run {parent} is deleted .*runs restore"):
        tune.run(params, data_for, "s", {})
    tracking.setup(
        config.Tracking(tracking_uri=f"sqlite:///{tmp_path}/other.db", experiment="e")
    )  # a new store
    with pytest.raises(
        tune.TuneError, match=rf"parent run {parent} is gone .*optuna delete-study --study-name s"
    ):
        tune.run(params, data_for, "s", {})


def test_a_worker_process_interrupted_by_ctrl_c_exits_without_a_traceback(tiny_params, monkeypatch):
    import logging
    import queue

    ours = logging.getLogger("pipeline")
    monkeypatch.setattr(ours, "handlers", list(ours.handlers))  # the worker adds its own: put back after
    monkeypatch.setattr(ours, "level", ours.level)
    monkeypatch.setattr(tracking, "use_tracking_uri", lambda uri: None)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_workers.Worker, "fill", interrupted)
    worker = tune_workers.Worker(tiny_params, lambda p: None, "s", "r", "0", {}, "sqlite:///x.db", None, 0)
    # multiprocessing prints a traceback for any exception but SystemExit
    with pytest.raises(SystemExit) as stopped:
        tune_workers._run_worker(worker, 0, 1, queue.Queue())
    assert stopped.value.code == 130


def test_the_demo_runs_a_small_study_and_users_sets_keep_the_budget_rule(tiny_params):
    """tune.enabled auto: the demo set gets a demo-sized study (a fresh clone's dvc repro shows one); any other
    set none, since a trial there trains the whole schedule; true and false are what they say."""
    auto = with_overrides(tiny_params, {"tune.enabled": "auto", "tune.n_trials": 20, "tune.max_epochs": None})
    on_demo = with_overrides(auto, {"data.dataset": auto.demo.name})
    study, plan = tune.planned(on_demo)
    assert study is not None and study.tune.enabled is True and "demo-sized study" in plan
    assert (study.tune.n_trials, study.tune.max_epochs) == (auto.tune.demo_trials, auto.tune.demo_max_epochs)
    assert tune.trial_epochs(study) == auto.tune.demo_max_epochs
    assert study.tune.min_epochs == max(1, auto.tune.demo_max_epochs // 3)  # a rung before the end: pruning
    study, plan = tune.planned(with_overrides(auto, {"data.dataset": "chest-xray"}))
    assert study is None and "no study on data set 'chest-xray'" in plan and "tune.enabled true" in plan
    study, _ = tune.planned(with_overrides(auto, {"tune.enabled": True, "data.dataset": "chest-xray"}))
    assert study is not None and study.tune.n_trials == 20  # the user's own numbers
    assert tune.planned(with_overrides(on_demo, {"tune.enabled": False}))[0] is None


def test_the_default_params_run_a_study_on_the_demo(tmp_path):
    """The committed params.yaml: the demo's tune stage runs a real study (trials nested in MLflow, pruning on)."""
    from conftest import in_project, run_stages, write_tiny_params

    write_tiny_params(
        tmp_path / "params.yaml", tune={"enabled": "auto", "demo_trials": 3, "demo_max_epochs": 2}
    )
    with in_project(tmp_path):
        run_stages("demo", "ingest", "augment", "tune")
        summary = json.loads((tmp_path / "data" / "tune" / "summary.json").read_text())
        assert summary["trials_complete"] + summary["trials_pruned"] == 3
        assert "wall_time_s" not in summary  # the file is kept in git: what the next run reproduces
        runs = mlflow.search_runs(experiment_names=["pipeline"])
        assert sorted(runs["tags.stage"]) == ["tune", "tune-trial", "tune-trial", "tune-trial"]
