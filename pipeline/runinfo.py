"""The trained-model contract: ``run.json`` beside the checkpoints in ``paths.model_dir``, and the names of
every file in that folder and in a fit's checkpoint folder (one place for the model folder's layout).

The train stage writes it (and logs it on its MLflow run); evaluate, predict, export, the report and an
earlier-run ``model.weights`` read it, always through :meth:`RunInfo.read`, never as a dict by key.
Nothing here imports torch: reading what a run produced costs no deep-learning stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

RUN_INFO = "run.json"
CHECKPOINT_SUFFIX = ".ckpt"
BEST = "best"  # <checkpoints>/best.ckpt: the weights that ship (the best epoch's, or the last's); so named in models/
LAST = "last"  # <checkpoints>/last.ckpt, every epoch: the full state a killed run resumes from
OOF_CSV = "oof.csv"  # beside the fold members in paths.model_dir: one row per train+val image
PRETRAIN_BACKBONE = "backbone.ckpt"  # in paths.pretrain: the backbone model.weights: pretrain starts from
PRETRAIN_RECORD = "pretrain.json"  # beside it: what the pretrain stage did (Pretrained)
PRETRAIN = "pretrain"  # model.weights' value that names the pretrain stage's output
PRETRAIN_POOL = (
    "pool.npy"  # in paths.pretrain with train.semi: the pool's kept images, handed to train (a link)
)


MODEL_SHA_TAG = "model.sha256"  # on the MLflow runs and registered versions of a model: its model_sha256


def model_sha256(checkpoints: Iterable[Path]) -> str:
    """The model's identity by content: the SHA-256 of its checkpoint file, or of the fold members' bytes one
    after the other in order (``cat fold_0.ckpt fold_1.ckpt ... | sha256sum``)."""
    digest = hashlib.sha256()
    for path in checkpoints:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def member_name(fold: int) -> str:
    """A fold model's checkpoint in the model folder (``data.folds``)."""
    return f"fold_{fold}{CHECKPOINT_SUFFIX}"


@dataclass(frozen=True)
class WeightsInfo:
    """What was actually loaded; recorded on the MLflow run, the metrics file and the report."""

    requested: str
    source: str  # URL or file the tensors came from, or "random-init"
    pretrained: bool
    fallback_reason: str | None = None
    # Weights that bring their own input statistics (an earlier run, a domain backbone): the normalization
    # the model must use, the band count the weights were trained on, the classes of the head they had.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    in_channels: int | None = None
    source_classes: tuple[str, ...] | None = None
    # The full SHA-256 of the file the tensors were read from (checked against the publisher's prefix).
    sha256: str | None = None
    # A named domain backbone's preprocessing: the bands in the order it expects them, and the raw value
    # its scaling maps to 1 (mean/std above apply to ``raw / value_range``, adapted to the pixel dtype).
    bands: tuple[str, ...] | None = None
    value_range: float | None = None

    def preprocessing_tags(self) -> dict[str, str]:
        """MLflow tags for what the run started from beyond its source: the file's SHA-256 and, for weights
        that bring their preprocessing, the bands, value range and mean/std the model normalizes with."""
        tags = {"weights.sha256": self.sha256} if self.sha256 else {}
        if self.bands:
            tags["weights.bands"] = ",".join(self.bands)
        if self.value_range is not None:
            tags["weights.value_range"] = f"{self.value_range:g}"
        if self.mean is not None and self.std is not None:
            tags["weights.mean"] = ",".join(f"{v:.6g}" for v in self.mean)
            tags["weights.std"] = ",".join(f"{v:.6g}" for v in self.std)
        return tags


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
    """One train stage's model: its checkpoints and their SHA-256, scores, weights and preprocessing.

    No MLflow run id: the file is a DVC output, the same bytes whenever the same inputs train the same weights.
    The MLflow train run that made the model carries the tag ``model.sha256`` (``tracking.model_run`` finds it).
    """

    model_sha256: str  # model_sha256() of the checkpoints; "" in a run.json from before 2026-12-07 (run_id)
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
                model_sha256=raw.get("model_sha256", ""),  # older ones named the MLflow run (run_id) instead
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


@dataclass(frozen=True)
class Pretrained:
    """What the pretrain stage produced (``paths.pretrain/pretrain.json``); ``method`` none: nothing (the stage
    was off), and there is no backbone beside it."""

    method: str
    arch: str = ""
    in_channels: int = 0
    image_size: int = 0
    images: int = 0  # pretraining images per epoch (pool + train split)
    epochs: int = 0
    final_loss: float | None = None
    knn_accuracy: float | None = (
        None  # the last kNN monitor's val accuracy; None when pretrain.knn_every is 0
    )
    starts_from: str = "none"  # pretrain.weights
    # No MLflow run id: a DVC output holds nothing that differs between two runs of the same inputs.
    pool_digest: str = ""  # of the pool handed to train beside it (train.semi), else empty

    def write(self, folder: Path) -> None:
        (folder / PRETRAIN_RECORD).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> Pretrained:
        path = folder / PRETRAIN_RECORD
        try:
            raw = json.loads(path.read_text())
            return cls(**{k: v for k, v in raw.items() if k != "run_id"})  # older records named the run
        except (OSError, ValueError, TypeError) as err:
            raise RunInfoError(
                f"{path}: not a pretrain stage's record ({err}); rerun dvc repro pretrain"
            ) from err
