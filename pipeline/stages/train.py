"""train: fine-tune with the tuned params; save the best checkpoint and the MLflow run it belongs to.

A killed run (even SIGKILL) resumes where it stopped, in the same MLflow run, when the stage runs
again with the same inputs (see ``pipeline.resume``).
"""

import json
import shutil
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from pipeline import augment, crossval, serve, tracking
from pipeline.config import ConfigError, Params, as_dict, with_overrides
from pipeline.data.prepared import load_prepared
from pipeline.fit import datamodule, fit
from pipeline.fsutil import atomic_dir
from pipeline.resume import Resume
from pipeline.runinfo import RUN_INFO, FoldScore, Preprocessing, RunInfo
from pipeline.stages import dataset_dir, open_tracking, stage_input


def with_best_params(params: Params) -> tuple[Params, dict[str, Any]]:
    """``params`` with the tune stage's best values (``paths.best_params``) applied, and those values."""
    path = stage_input(params.paths.best_params, "paths.best_params", "tune")
    tuned = yaml.safe_load(path.read_text()) or {}
    try:
        return with_overrides(params, tuned), tuned
    except ValueError as err:  # a key or value params.yaml no longer accepts
        raise ConfigError(f"{path}: {err}; rerun the tune stage (dvc repro tune)") from None


def main(params: Params) -> None:
    paths = params.paths
    params, tuned = with_best_params(params)
    prepared = load_prepared(Path(paths.prepared))
    transform = augment.load(Path(paths.augment_pipeline), params.seed)
    resume = Resume.beside(
        paths.model_dir,
        json.dumps(as_dict(params), sort_keys=True),
        prepared.digest,
        Path(paths.augment_pipeline).read_bytes(),
    )
    folds = params.data.folds
    if rank_zero_only.rank != 0:
        # A DDP worker (started by Lightning, torchrun or SLURM) trains its shard and writes nothing:
        # rank 0 owns the MLflow run and the outputs, and broadcasts the checkpoint folder.
        if folds:
            crossval.fit_folds(params, prepared, transform, resume)
        else:
            fit(
                params,
                datamodule(params, prepared, transform),
                out_dir=resume.checkpoints,
                resume_from=resume.last_checkpoint(),
            )
        return

    tags = open_tracking(params)
    run_id, last = resume.run_id(), resume.last_checkpoint()
    name = tracking.run_name("train", params.model.arch, tags)
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else name, tags=None if run_id else tags | {"stage": "train"}
    ) as run:
        if run_id is None:
            resume.start(run.info.run_id)
            tracking.log_dataset(dataset_dir(params), tags["data.version"])
            tracking.log_params(params)
            mlflow.log_dict(tuned, "best_params.json")
            mlflow.log_artifact(paths.augment_preview)
            mlflow.log_artifact(paths.augment_pipeline)
        elif last is not None or folds:
            print(f"train: resuming MLflow run {run_id}" + (f" from {last}" if last else ""), flush=True)
        oof = None
        if folds:
            cv = crossval.fit_folds(
                params, prepared, transform, resume, crossval.FoldRuns(run.info.run_id, name, tags, params)
            )
            results, oof = cv.results, cv.oof
            members = {crossval.member_name(i): r.best_checkpoint for i, r in enumerate(results)}
            tracking.log_metrics(crossval.cv_metrics(oof, prepared.classes))
        else:
            logger = MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)
            results = [
                fit(
                    params,
                    datamodule(params, prepared, transform),
                    out_dir=resume.checkpoints,
                    logger=logger,
                    resume_from=last,
                )
            ]
            members = {results[0].best_checkpoint.name: results[0].best_checkpoint}
        weights = results[0].weights
        mlflow.set_tags(
            {
                "weights.pretrained": str(weights.pretrained).lower(),
                "weights.source": weights.source,
                "train.mode": params.train.mode,
            }
        )
        info = RunInfo(
            run_id=run.info.run_id,
            arch=params.model.arch,
            classes=prepared.classes,
            checkpoints=tuple(members),
            monitor=params.train.monitor,
            best_score=float(np.mean([r.best_score for r in results])),
            epochs_run=int(max(r.epochs_run for r in results)),
            weights=weights,
            preprocessing=Preprocessing(
                image_size=int(prepared.images.shape[1]),
                channels=params.data.channels,
                dicom_window=params.data.dicom_window,
                dtype=str(prepared.images.dtype),
            ),
            mode=params.train.mode,
            folds=tuple(FoldScore(r.best_score, r.epochs_run) for r in results) if folds else (),
        )
        with atomic_dir(paths.model_dir) as staging:
            for member, checkpoint in members.items():
                shutil.copy2(checkpoint, staging / member)
            if oof is not None:
                oof.to_csv(staging / crossval.OOF_CSV, index=False, float_format="%.6f")
            info.write(staging)
        mlflow.log_dict(info.as_dict(), RUN_INFO)
        # What ships: the model as predict and export load it, with its preprocessing, in eval mode.
        serve.log_model(
            serve.load_trained(Path(paths.model_dir)), registered_model=params.mlflow.registered_model
        )
    resume.clear()
    print(
        f"train: best {params.train.monitor}={info.best_score:.4f}"
        + (f" (mean of {folds} folds)" if folds else "")
        + f" after {info.epochs_run} epochs; weights {weights.source}; checkpoint in {paths.model_dir}; "
        f"MLflow run {run.info.run_id}"
    )
