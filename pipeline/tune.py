"""Optuna study over params keys: every trial is a real ``fit`` on train, scored on val, logged to MLflow.

The study lives in ``tune.storage`` (SQLite by default, outside DVC's outputs) under a name derived
from everything that makes trials comparable, so re-running the stage resumes the same study and
only runs the trials still missing; a new search space or data version starts a new study.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import mlflow
import optuna
from lightning.pytorch.loggers import MLFlowLogger
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from pipeline import tracking
from pipeline.config import Params, SearchDim, as_dict, mode_of, with_overrides
from pipeline.data.datamodule import ImageDataModule
from pipeline.errors import PipelineError
from pipeline.fit import fit

log = logging.getLogger(__name__)

class TuneError(PipelineError, RuntimeError):
    """The study produced nothing usable."""


# Failed trials do not count towards tune.n_trials: a rerun after fixing the cause tries again.
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
RUN_ID_ATTR = "mlflow_parent_run_id"


def suggest(trial: optuna.Trial, space: dict[str, SearchDim]) -> dict[str, Any]:
    """Sample one value per searched params key."""
    values: dict[str, Any] = {}
    for key, dim in space.items():
        if dim.type == "categorical":
            values[key] = trial.suggest_categorical(key, list(dim.choices))
        elif dim.type == "int":
            values[key] = trial.suggest_int(key, int(dim.low), int(dim.high), log=dim.log)
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
    return values


def study_name(params: Params, data_version: str) -> str:
    """Same name <=> trials are comparable: same data, search space, fixed params, trial length and seed."""
    fixed = as_dict(params)
    key = {k: fixed[k] for k in ("seed", "model", "train", "augment")}
    key |= {"space": fixed["tune"]["search_space"], "epochs": params.tune.max_epochs, "data": data_version}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return f"{params.data.dataset}-{params.model.arch}-{digest}"


def make_pruner(params: Params) -> optuna.pruners.BasePruner:
    """Pruning is decided on the validation metric after each epoch (optuna-integration's callback)."""
    if params.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_warmup_steps=1)
    if params.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=params.tune.max_epochs)
    return optuna.pruners.NopPruner()


def make_study(params: Params, name: str) -> optuna.Study:
    pruner = make_pruner(params)
    return optuna.create_study(
        study_name=name, storage=params.tune.storage, load_if_exists=True,
        direction="minimize" if mode_of(params.train.monitor) == "min" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=params.seed), pruner=pruner,
    )


def objective(params: Params, data_for: Callable[[Params], ImageDataModule], parent_run_id: str,
              tags: dict[str, str]) -> Callable[[optuna.Trial], float]:
    """A trial: sample, fit for tune.max_epochs with pruning, log everything to a nested MLflow run."""
    monitor = params.train.monitor

    def run_trial(trial: optuna.Trial) -> float:
        values = suggest(trial, params.tune.search_space)
        pruned = None
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, parent_run_id=parent_run_id,
                              tags=tags | {"stage": "tune-trial", "optuna.trial": str(trial.number)}) as run:
            mlflow.log_params(values)
            state = "failed"
            try:
                trial_params = with_overrides(params, values)
                logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)
                result = fit(trial_params, data_for(trial_params), logger=logger, max_epochs=params.tune.max_epochs,
                             callbacks=[PyTorchLightningPruningCallback(trial, monitor=monitor)])
                state = "complete"
                mlflow.log_metric(f"best_{monitor}", result.best_score)
                return result.best_score
            except optuna.TrialPruned as err:  # a deliberate early stop: the MLflow run ends FINISHED
                state, pruned = "pruned", err
            finally:
                mlflow.set_tag("optuna.state", state)
        raise pruned

    return run_trial


def run(params: Params, data_for: Callable[[Params], ImageDataModule], name: str,
        tags: dict[str, str]) -> tuple[optuna.Study, dict[str, Any]]:
    """Run the trials the study still lacks under one MLflow parent run; return the study and a summary."""
    study = make_study(params, name)
    parent_id = study.user_attrs.get(RUN_ID_ATTR)
    start = time.monotonic()
    with mlflow.start_run(run_id=parent_id, run_name=None if parent_id else f"tune {name}",
                          tags=None if parent_id else tags | {"stage": "tune", "optuna.study": name}) as parent:
        if parent_id is None:
            study.set_user_attr(RUN_ID_ATTR, parent.info.run_id)
            mlflow.log_dict({k: as_dict(v) for k, v in params.tune.search_space.items()}, "search_space.json")
        remaining = params.tune.n_trials - len(study.get_trials(deepcopy=False, states=DONE))
        if remaining > 0:
            study.optimize(objective(params, data_for, parent.info.run_id, tags), n_trials=remaining,
                           timeout=params.tune.timeout_s, catch=(Exception,), gc_after_trial=True)
        else:
            log.info("study %s already holds %d finished trials; nothing to run", name, params.tune.n_trials)
        summary = summarize(study, time.monotonic() - start)
        tracking.log_metrics({f"study/{k}": v for k, v in summary.items()})
        log_study_plots(study)
    return study, summary


def summarize(study: optuna.Study, wall_time_s: float) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    if not count[TrialState.COMPLETE]:
        raise TuneError(f"Optuna study '{study.study_name}' has no completed trial "
                           f"({count[TrialState.FAIL]} failed, {count[TrialState.PRUNED]} pruned); "
                           "see the failed trials' errors above")
    return {
        "study": study.study_name,
        "trials_complete": count[TrialState.COMPLETE],
        "trials_pruned": count[TrialState.PRUNED],
        "trials_failed": count[TrialState.FAIL],
        "best_value": study.best_value,
        "best_trial": study.best_trial.number,
        "wall_time_s": round(wall_time_s, 1),
    }


def log_study_plots(study: optuna.Study) -> None:
    """Optimization history and parameter importances on the active (parent) run: PNG, plus HTML with plotly."""
    import importlib.util
    import warnings

    import matplotlib.pyplot as plt  # optuna's matplotlib plots draw with pyplot
    from optuna.visualization import matplotlib as static

    plots = {"optimization_history": "plot_optimization_history"}
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2:
        plots["param_importances"] = "plot_param_importances"
    interactive = importlib.util.find_spec("plotly") is not None
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            try:
                axes = getattr(static, plot)(study)
            except (ValueError, RuntimeError) as err:  # e.g. importances of a parameter that never varied
                log.warning("study plot %s not drawn: %s", name, err)
                continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.tight_layout()
        mlflow.log_figure(figure, f"study/{name}.png")
        plt.close(figure)
        if interactive:
            mlflow.log_figure(getattr(optuna.visualization, plot)(study), f"study/{name}.html")
