"""The MLflow model registry: one registered model per data set, versions tagged with where they came from and
how they scored, and the alias that serving loads (``champion``), moved only by ``python -m pipeline promote``.

MLflow's own conventions (tags, descriptions and aliases on model versions): ``models:/<name>/latest`` is
whatever trained last (a queued throwaway experiment included), ``models:/<name>@champion`` is what a person
decided to serve. The train stage tags a new version with its lineage; each evaluate run tags it with its
test metrics (the headline, at the operating point that ships), the latest winning; ``promote`` re-tags it
from the evaluation the workspace holds (:func:`evaluation_of`), then moves the alias: nothing else does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.runinfo import MODEL_SHA_TAG

CHAMPION = "champion"
LINEAGE = ("data.dataset", "data.version", "git.commit", "git.dirty", "dvc.exp_name", MODEL_SHA_TAG)
EVALUATED = "evaluation.run_id"  # the tag that says a version's test metrics were recorded
EXPERIMENT = "evaluation.exp_name"  # the DVC experiment of that evaluation, if any


class RegistryError(PipelineError, LookupError):
    """No registered version for a run, or a version not fit to promote; the message names it."""


def version_of_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    """The newest version of ``name`` logged by the MLflow run ``run_id``; None when there is none."""
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return max(found, key=lambda v: int(v.version), default=None)


def tag_trained(client: MlflowClient, name: str, version: str, lineage: Mapping[str, str]) -> None:
    """A new version's lineage tags (data set, DVC data hash, git commit, DVC experiment, the checkpoints'
    SHA-256) and description."""
    for key in LINEAGE:
        if key in lineage:
            client.set_model_version_tag(name, version, key, lineage[key])
    client.update_model_version(name, version, description=_describe(lineage, None))


def tag_evaluated(
    client: MlflowClient,
    name: str,
    train_run_id: str,
    metrics: Mapping[str, Any],
    evaluation: Mapping[str, str],
) -> ModelVersion | None:
    """Tag the version the train run ``train_run_id`` registered with the test metrics ``metrics`` (the
    headline, at the operating point that ships) and ``evaluation`` (its run id, threshold, experiment name);
    None when that run registered no version (``mlflow.registered_model: null``)."""
    version = version_of_run(client, name, train_run_id)
    if version is None:
        return None
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    # An earlier evaluation's metrics or experiment name that this one lacks would mix two records: dropped.
    for key in version.tags:
        if ("/" in key and key not in numbers) or (key == EXPERIMENT and key not in evaluation):
            client.delete_model_version_tag(name, version.version, key)
    for key, number in numbers.items():
        client.set_model_version_tag(name, version.version, key, f"{number:.4f}")
    for key, text in evaluation.items():
        client.set_model_version_tag(name, version.version, key, text)
    tags = dict(version.tags) | dict(evaluation)
    client.update_model_version(name, version.version, description=_describe(tags, metrics))
    return version


def evaluation_of(client: MlflowClient, train_run_id: str, headline: Mapping[str, Any]) -> Run | None:
    """The newest evaluate run nested under ``train_run_id`` whose metrics are ``headline`` (the workspace's
    reports/metrics.json): the evaluation that produced the files predict uses; None when none did."""
    experiment = client.get_run(train_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.mlflow.parentRunId = '{train_run_id}' and tags.stage = 'evaluate'",
        order_by=["attributes.start_time DESC"],
    )
    numbers = {k: v for k, v in headline.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for run in runs:
        if numbers and all(abs(run.data.metrics.get(k, math.inf) - v) < 1e-9 for k, v in numbers.items()):
            return run
    return None


def evaluation_tags(run: Run) -> dict[str, str]:
    """The tags that say which evaluation a version's test metrics come from."""
    tags = {EVALUATED: run.info.run_id, "evaluate.threshold": run.data.params.get("evaluate.threshold", "?")}
    if run.data.tags.get("dvc.exp_name"):
        tags[EXPERIMENT] = run.data.tags["dvc.exp_name"]
    return tags


def _describe(tags: Mapping[str, str], metrics: Mapping[str, Any] | None) -> str:
    where = (
        f"Trained on data set `{tags.get('data.dataset', '?')}` (DVC data version `{tags.get('data.version', '?')}`) "
        f"at git commit `{tags.get('git.commit', '?')}`"
        + (" with uncommitted changes" if tags.get("git.dirty") == "true" else "")
        + (f", DVC experiment `{tags['dvc.exp_name']}`" if tags.get("dvc.exp_name") else "")
        + "."
    )
    if metrics is None:
        return where + " Not evaluated yet."
    scores = ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    return (
        f"{where} Test ({tags.get('evaluate.threshold', 'threshold ?')}): {scores} "
        f"(evaluation run `{tags.get(EVALUATED, '?')}`)."
    )


def promote(
    client: MlflowClient,
    name: str,
    *,
    run_id: str | None = None,
    version: str | None = None,
    alias: str = CHAMPION,
) -> ModelVersion:
    """Point ``alias`` at a version of ``name``: the one the run ``run_id`` registered, or ``version``.

    Only an evaluated version (it carries the ``evaluation.run_id`` tag) is promoted: an alias on a model
    nobody scored is how a throwaway ends up served.
    """
    if version is not None:
        try:
            chosen = client.get_model_version(name, version)
        except MlflowException:
            chosen = None
        what = f"version {version} of registered model '{name}'"
    else:
        assert run_id is not None, "promote needs a run id or a version"
        chosen = version_of_run(client, name, run_id)
        what = f"a version of registered model '{name}' from MLflow run {run_id}"
    if chosen is None:
        raise RegistryError(f"{what}: not found in the registry (was mlflow.registered_model null at train?)")
    if EVALUATED not in chosen.tags:
        raise RegistryError(
            f"version {chosen.version} of '{name}' has no test metrics (tag {EVALUATED}): run the evaluate "
            "stage on it (dvc repro evaluate) before promoting it"
        )
    client.set_registered_model_alias(name, alias, chosen.version)
    return chosen
