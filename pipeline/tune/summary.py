"""What a finished study says: counts, the best value, and its plots on the MLflow parent run."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline.tune.study import SURPLUS_ATTR, TuneError

log = logging.getLogger(__name__)


def summarize(study: optuna.Study, wall_time_s: float) -> dict[str, Any]:
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SURPLUS_ATTR)]
    count = {
        s: sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    if not count[TrialState.COMPLETE]:
        raise TuneError(
            f"Optuna study '{study.study_name}' has no completed trial "
            f"({count[TrialState.FAIL]} failed, {count[TrialState.PRUNED]} pruned); "
            "see the failed trials' errors above"
        )
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
