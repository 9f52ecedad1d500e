"""k-fold cross-validation over train+val, and the fold ensemble it yields (``data.folds: k``).

Ingest's ``fold`` column (grouped and stratified: a patient or a set of near duplicates never
straddles two folds) says which fold each train or val image is in. Fold model i trains on the other
folds and selects its checkpoint on fold i, so every labelled image trains k-1 models and scores one:
its out-of-fold (OOF) prediction. The final model is the ensemble of the k fold models (the mean of
their class probabilities), evaluated once on the untouched test split.

Each fold is a resumable unit of its own inside the train stage's resume folder (``fold_<i>/``): a
killed run restarts at the fold and epoch where it stopped, and finished folds are not retrained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from pipeline import tracking
from pipeline.config import Params
from pipeline.data.prepared import Prepared
from pipeline.errors import PipelineError
from pipeline.evaluation.predictions import predict_proba
from pipeline.fsutil import write_json
from pipeline.runinfo import WeightsInfo, member_name
from pipeline.training.fit import FitResult, Fitted, datamodule, fit
from pipeline.training.oof import OOF_CSV, oof_table
from pipeline.training.resume import Resume

DONE = "done.json"  # in a fold's resume folder once its model and OOF predictions are saved


class FoldError(PipelineError, ValueError):
    """Cross-validation cannot run on these inputs; the message names the key to change."""


def fold_count(prepared: Prepared) -> int:
    """The number of folds ingest assigned (0: no fold column)."""
    if "fold" not in prepared.table:
        return 0
    return int(prepared.table["fold"].max()) + 1


def fold_view(prepared: Prepared, fold: int) -> Prepared:
    """``prepared`` with fold ``fold`` as the val split and the other train+val images as train; test kept.

    Normalization statistics stay ingest's (train split); they shift by well under a grey level
    between folds, and one set keeps every member's input scaling alike.
    """
    table = prepared.table.copy()
    pool = table["split"] != "test"
    table.loc[pool, "split"] = np.where(table.loc[pool, "fold"] == fold, "val", "train")
    return replace(prepared, table=table)


def members(results: list[FitResult]) -> dict[str, Path]:
    """The fold models as the model folder names them (``fold_<i>.ckpt``) -> where each fit saved it."""
    return {member_name(i): r.saved() for i, r in enumerate(results)}


def check(params: Params, prepared: Prepared) -> int:
    """The fold count to train, or an error when the inputs cannot be cross-validated."""
    k = fold_count(prepared)
    if k != params.data.folds:
        raise FoldError(
            f"data.folds is {params.data.folds} but the prepared data has {k} folds; "
            "rerun the ingest stage (dvc repro ingest)"
        )
    if params.augment.offline_copies:
        raise FoldError(
            "augment.offline_copies makes copies of the train split, which folds redraw: "
            "set it to 0 with data.folds"
        )
    return k


def fit_folds(
    params: Params,
    prepared: Prepared,
    transform: A.BasicTransform | None,
    resume: Resume,
    runs: FoldRuns | None = None,
    batch_size: int = 64,
) -> Fitted:
    """Train the k fold models (resuming, skipping finished folds) and collect their OOF predictions.

    ``runs``: the nested MLflow run of each fold (rank 0); every DDP rank runs this loop, the others
    with ``runs=None``.
    """
    k = check(params, prepared)
    results, tables = [], []
    for i in range(k):
        part = Resume(resume.dir / f"fold_{i}", resume.key)
        done = part.dir / DONE
        if done.is_file():  # finished before a kill: its model and predictions are kept
            results.append(FitResult(**_load_done(done)))
            tables.append(pd.read_csv(part.dir / OOF_CSV))
            continue
        print(f"train: fold {i + 1}/{k}", flush=True)
        view = fold_view(prepared, i)
        logger = runs.logger(i, part) if runs else False
        result = fit(
            params,
            datamodule(params, view, transform),
            out_dir=part.checkpoints,
            logger=logger,
            resume_from=part.last_checkpoint(),
        )
        results.append(result)
        # rank 0 predicts and writes; the others only train (Lightning sets .rank at import, untyped)
        if getattr(rank_zero_only, "rank", 0) != 0:
            continue
        member = result.best_model()
        rows = view.split("val")["cache_index"].to_numpy()
        tables.append(oof_table(prepared, i, predict_proba(member, prepared.images[rows], batch_size)))
        tables[-1].to_csv(part.dir / OOF_CSV, index=False)
        if runs:
            runs.done(i, part, result)
        write_json(done, _as_done(result))  # last: a kill before it retrains (or resumes) this fold
    if not tables:
        return Fitted(results, members(results), oof=pd.DataFrame())
    oof = (
        pd.concat(tables, ignore_index=True).sort_values("cache_index", kind="stable").reset_index(drop=True)
    )
    return Fitted(results, members(results), oof)


def _as_done(result: FitResult) -> dict:
    return asdict(result) | {"best_checkpoint": str(result.best_checkpoint)}


def _load_done(path: Path) -> dict:
    done = json.loads(path.read_text())
    return done | {
        "best_checkpoint": Path(done["best_checkpoint"]),
        "weights": WeightsInfo(**done["weights"]),
    }


class FoldRuns:
    """One nested MLflow run per fold under the training run, resumed with its fold: params, curves, checkpoint."""

    def __init__(self, parent_run_id: str, run_name: str, tags: dict[str, str], params: Params):
        self.parent_run_id, self.run_name, self.tags, self.params = parent_run_id, run_name, tags, params

    def logger(self, fold: int, part: Resume) -> Logger:
        import mlflow
        from lightning.pytorch.loggers import MLFlowLogger

        run_id = part.run_id()
        if run_id is None:
            with mlflow.start_run(
                run_name=f"fold-{fold}:{self.run_name}",
                nested=True,
                parent_run_id=self.parent_run_id,
                tags=self.tags | {"stage": "train", "fold": str(fold)},
            ) as run:
                run_id = run.info.run_id
                part.start(run_id)
                tracking.log_params(self.params)
        return MLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)

    def done(self, fold: int, part: Resume, result: FitResult) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        run_id = part.run_id()
        assert run_id is not None, "logger() started this fold's run"
        client.log_artifact(run_id, str(result.best_checkpoint), artifact_path="checkpoint")
        client.set_terminated(run_id, "FINISHED")
