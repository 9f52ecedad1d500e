"""The train stage's work: the fit (or one per fold) inside its MLflow run, resumable, and the model folder.

A killed run (even SIGKILL) resumes where it stopped, in the same MLflow run, when the stage runs again with
the same inputs (``pipeline.training.resume``). Rank 0 owns the MLflow run and the outputs; a DDP worker (started by
Lightning, torchrun or SLURM) trains its shard and writes nothing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from lightning.pytorch.loggers import Logger, MLFlowLogger

from pipeline import augment, registry, tracking
from pipeline.config import FROZEN_MODES, Params, as_dict
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.fsutil import atomic_dir
from pipeline.runinfo import (
    MODEL_SHA_TAG,
    OOF_CSV,
    RUN_INFO,
    FoldScore,
    Preprocessing,
    Pretrained,
    RunInfo,
    model_sha256,
)
from pipeline.serve.shipped import load_trained, log_model
from pipeline.training import crossval
from pipeline.training.fit import Fitted, datamodule, fit
from pipeline.training.oof import cv_metrics
from pipeline.training.resume import Resume


@dataclass(frozen=True)
class Inputs:
    """What the train stage reads: the prepared data, the augmentation pipeline and the resume state."""

    params: Params
    prepared: Prepared
    transform: Any  # an albumentations pipeline, or None
    resume: Resume


def inputs(params: Params) -> Inputs:
    paths = params.paths
    prepared = load_prepared(Path(paths.prepared))
    resume = Resume.beside(
        paths.model_dir,
        json.dumps(as_dict(params), sort_keys=True),
        prepared.digest,
        Path(paths.augment_pipeline).read_bytes(),
        _pool_digest(params),
    )
    return Inputs(params, prepared, augment.load(Path(paths.augment_pipeline), params.seed), resume)


def _pool_digest(params: Params) -> str:
    """The digest of the pool training learns from (train.semi; the pretrain stage's record says which), so a
    changed pool starts a run afresh."""
    folder = Path(params.paths.pretrain)
    return Pretrained.read(folder).pool_digest if params.train.semi != "none" and folder.is_dir() else ""


def fit_all(run: Inputs, fold_runs: crossval.FoldRuns | None = None, logger: Logger | bool = False) -> Fitted:
    """One fit, or one per fold (``data.folds``), resumed from the last checkpoint where there is one;
    ``fold_runs``: the folds' nested MLflow runs, ``logger``: the single fit's."""
    params, resume = run.params, run.resume
    if params.data.folds:
        return crossval.fit_folds(params, run.prepared, run.transform, resume, fold_runs)
    data = datamodule(params, run.prepared, run.transform)
    result = fit(
        params, data, out_dir=resume.checkpoints, logger=logger, resume_from=resume.last_checkpoint()
    )
    return Fitted.one(result)


def run_info(params: Params, prepared: Prepared, fitted: Fitted) -> RunInfo:
    results = fitted.results
    return RunInfo(
        model_sha256=model_sha256(fitted.members.values()),  # the files save_model copies, in member order
        arch=params.model.arch,
        classes=prepared.classes,
        checkpoints=tuple(fitted.members),
        monitor=params.train.monitor,
        best_score=float(np.mean([r.best_score for r in results])),
        epochs_run=int(max(r.epochs_run for r in results)),
        weights=results[0].weights,
        preprocessing=Preprocessing(
            image_size=int(prepared.images.shape[1]),
            channels=params.data.channels,
            dicom_window=params.data.dicom_window,
            dtype=str(prepared.images.dtype),
        ),
        mode=params.train.mode,
        folds=tuple(FoldScore(r.best_score, r.epochs_run) for r in results) if params.data.folds else (),
        checkpoint=params.train.checkpoint,
        # The frozen-feature modes fit a head without the training step's EMA (pipeline/probe.py).
        ema_decay=(params.train.ema_decay or None) if params.train.mode not in FROZEN_MODES else None,
    )


def save_model(model_dir: Path, fitted: Fitted, info: RunInfo) -> None:
    """The model folder, replaced whole: the checkpoints, the OOF predictions and ``run.json``."""
    with atomic_dir(model_dir) as staging:
        for member, checkpoint in fitted.members.items():
            shutil.copy2(checkpoint, staging / member)
        if fitted.oof is not None:
            fitted.oof.to_csv(staging / OOF_CSV, index=False, float_format="%.6f")
        info.write(staging)


def _log_inputs(params: Params, tags: dict[str, str], tuned: dict[str, Any], prepared: Prepared) -> None:
    """A new MLflow run's inputs, logged once (a resumed run already has them); the image size as resolved
    (``data.image_size`` may be auto) beside the params, and why."""
    paths = params.paths
    tracking.log_dataset(Path(paths.raw) / params.data.dataset, tags["data.version"])
    tracking.log_params(params)
    mlflow.log_param("data.image_size_used", int(prepared.images.shape[1]))
    mlflow.set_tag("data.image_size_reason", prepared.report.get("image_size_reason") or "not recorded")
    mlflow.log_dict(tuned, "best_params.json")
    mlflow.log_artifact(paths.augment_preview)
    mlflow.log_artifact(paths.augment_pipeline)


def train(params: Params, tuned: dict[str, Any], tags: dict[str, str] | None) -> RunInfo | None:
    """Fit with ``params`` (the tuned values applied) in the train run, save and log the model; the run's
    ``RunInfo``, or None on a DDP worker (``tags``: the lineage tags, None there)."""
    run = inputs(params)
    if tags is None:
        fit_all(run)
        return None
    run_id, last = run.resume.run_id(), run.resume.last_checkpoint()
    name = tracking.run_name("train", params.model.arch, tags)
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else name, tags=None if run_id else tags | {"stage": "train"}
    ) as active:
        this = active.info.run_id
        if run_id is None:
            run.resume.start(this)
            _log_inputs(params, tags, tuned, run.prepared)
        elif last is not None or params.data.folds:
            print(f"train: resuming MLflow run {run_id}" + (f" from {last}" if last else ""), flush=True)
        if params.data.folds:
            fitted = fit_all(run, fold_runs=crossval.FoldRuns(this, name, tags, params))
            tracking.log_metrics(cv_metrics(fitted.oof, run.prepared.classes))
        else:
            fitted = fit_all(run, logger=MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=this))
        weights = fitted.results[0].weights
        info = run_info(params, run.prepared, fitted)
        mlflow.set_tags(
            {
                "weights.pretrained": str(weights.pretrained).lower(),
                "weights.source": weights.source,
                "train.mode": params.train.mode,
                MODEL_SHA_TAG: info.model_sha256,  # how evaluate, promote and export find this run
            }
            | weights.preprocessing_tags()
        )
        save_model(Path(params.paths.model_dir), fitted, info)
        mlflow.log_dict(info.as_dict(), RUN_INFO)
        # What ships: the model as predict and export load it, with its preprocessing, in eval mode.
        model = load_trained(Path(params.paths.model_dir))
        registered = params.mlflow.model_name(params.data.dataset)
        version = log_model(model, registered_model=registered)
        if registered is not None and version is not None:  # lineage on the version; evaluate adds metrics
            lineage = tags | {MODEL_SHA_TAG: info.model_sha256}
            registry.tag_trained(mlflow.MlflowClient(), registered, version, lineage)
    run.resume.clear()
    return info
