"""The trained-model contract: ``run.json`` beside the checkpoints in ``paths.model_dir``.

The train stage writes it (and logs it on its MLflow run); evaluate, predict, export, the report and an
earlier-run ``model.weights`` read it, always through :meth:`RunInfo.read`, never as a dict by key.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.weights import WeightsInfo

RUN_INFO = "run.json"


class RunInfoError(PipelineError, ValueError):
    """No ``run.json``, or one this code cannot read; the message names the file."""


@dataclass(frozen=True)
class Preprocessing:
    """What predict and export must do to a new file to give the pixels the model was trained on."""

    image_size: int
    channels: str  # data.channels
    dicom_window: tuple[float, float] | None
    dtype: str  # of the training cache: uint8, uint16 or float32


@dataclass(frozen=True)
class FoldScore:
    best_score: float
    epochs_run: int


@dataclass(frozen=True)
class RunInfo:
    """One train stage's model: its MLflow run, checkpoints, scores, weights and preprocessing."""

    run_id: str
    arch: str
    classes: tuple[str, ...]
    checkpoints: tuple[str, ...]  # file names in the model folder: one, or one per fold (data.folds)
    monitor: str  # train.monitor
    best_score: float  # of the monitor; the mean over folds with data.folds
    epochs_run: int  # the most any fold ran
    weights: WeightsInfo
    preprocessing: Preprocessing
    mode: str = "finetune"  # train.mode
    folds: tuple[FoldScore, ...] = ()  # one per fold with data.folds, else empty
    checkpoint: str = "best"  # train.checkpoint: best (the best epoch's weights) or last (the schedule's end)
    ema_decay: float | None = None  # train.ema_decay: the shipped weights are that average; None: off

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write(self, model_dir: Path) -> Path:
        path = Path(model_dir) / RUN_INFO
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = RUN_INFO) -> RunInfo:
        try:
            pre = raw["preprocessing"]
            window = pre.get("dicom_window")
            weights: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in raw["weights"].items()
            }
            return cls(
                run_id=raw["run_id"],
                arch=raw["arch"],
                classes=tuple(raw["classes"]),
                checkpoints=tuple(raw["checkpoints"]),
                monitor=raw["monitor"],
                best_score=float(raw["best_score"]),
                epochs_run=int(raw["epochs_run"]),
                weights=WeightsInfo(**weights),
                preprocessing=Preprocessing(
                    image_size=int(pre["image_size"]),
                    channels=pre["channels"],
                    dicom_window=(float(window[0]), float(window[1])) if window else None,
                    dtype=pre["dtype"],
                ),
                mode=raw["mode"],
                folds=tuple(FoldScore(float(f["best_score"]), int(f["epochs_run"])) for f in raw["folds"]),
                checkpoint=raw.get("checkpoint", "best"),  # run.json files from before train.checkpoint: best
                ema_decay=raw.get("ema_decay"),  # absent before 2026-12-02: not recorded (read as off)
            )
        except (KeyError, TypeError, AttributeError, ValueError, IndexError) as err:
            raise RunInfoError(
                f"{where}: not a run.json this code can read (missing or malformed {err}); rerun the train "
                "stage (dvc repro train)"
            ) from None

    @classmethod
    def read(cls, model_dir: Path) -> RunInfo:
        path = Path(model_dir) / RUN_INFO
        if not path.is_file():
            raise RunInfoError(f"{path}: not found; train a model first (dvc repro train)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunInfoError(
                f"{path}: not valid JSON ({err}); rerun the train stage (dvc repro train)"
            ) from None
        return cls.from_dict(raw, str(path))
