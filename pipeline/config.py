"""params.yaml loaded into typed, validated, frozen objects.

params.yaml is the project's only configuration. Each section is a frozen pydantic dataclass, so
``dataclasses.replace`` (used by the tuner) re-validates, and a bad key, type or value fails with a
message that names it. Every field carries a ``description`` that the docs are generated from.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from pipeline import backbones, vocabulary
from pipeline.credentials import redact, refuse_in_params
from pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"
FROZEN_MODES = ("linear_probe", "knn")  # train.mode values that never train the backbone
MIN_SIDE, MAX_SIDE = 16, 1024  # data.image_size's range (auto resolves within it)

Arch = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "wide_resnet50_2",
]
Preset = Literal["none", "medical", "satellite", "natural"]  # augment.PRESETS holds their transforms
_STRICT = ConfigDict(extra="forbid")


class ConfigError(PipelineError, ValueError):
    """A params.yaml problem a user can fix; the message names the key."""


@dataclass(frozen=True, config=_STRICT)
class Paths:
    """Every file and folder the stages read or write; dvc.yaml refers to these with ${paths.*}."""

    raw: str = Field(default="data/raw", description="Folder of handed-in data sets, one subfolder each.")
    prepared: str = Field(
        default="data/prepared", description="Ingest output: splits.csv, report.json, image cache."
    )
    unlabelled: str = Field(
        default="data/unlabelled",
        description="Folder of handed-in unlabelled pools (intake --unlabelled), one subfolder each; "
        "data.unlabelled selects one.",
    )
    image_size: str = Field(
        default="data/image_size.yaml",
        description="Size stage output: data.image_size resolved (image_size, reason, basis); ingest "
        "depends on its image_size value only, so other weights of the same size do not rerun it.",
    )
    pool: str = Field(
        default="data/pool",
        description="Pool stage output: the selected pool's kept pixels (images.npy), pool.csv (a row per file: "
        "path, sha256, dhash, group, status, reason, cache_index) and report.json.",
    )
    validated: str = Field(
        default=".dvc/tmp/validated",
        description="What intake's validation decoded (pixels, hashes), a folder per data set; the ingest "
        "stage reuses it where a file's bytes are unchanged. Machine-local, never versioned; safe to delete.",
    )
    augment_pipeline: str = Field(
        default="data/augment/train_transforms.json",
        description="Serialized albumentations training pipeline.",
    )
    augment_preview: str = Field(default="data/augment/preview.png", description="Grid of augmented samples.")
    augment_offline: str = Field(
        default="data/augment/offline",
        description="Offline augmented training copies (images.npy, labels.npy).",
    )
    best_params: str = Field(
        default="data/tune/best_params.yaml", description="Tuned values the train stage uses."
    )
    tune_summary: str = Field(default="data/tune/summary.json", description="Study summary (DVC metrics).")
    model_dir: str = Field(default="models", description="Best checkpoint and the MLflow run it belongs to.")
    pretrain: str = Field(
        default="data/pretrain",
        description="Pretrain stage output: backbone.ckpt (model.weights: pretrain starts from it) and "
        "pretrain.json (what it did; method none: pretraining was off).",
    )
    metrics: str = Field(
        default="reports/metrics.json",
        description="Headline test metrics (DVC metrics: what `dvc metrics show` and `dvc exp show` print).",
    )
    metrics_detail: str = Field(
        default="reports/metrics_detail.json",
        description="Every other test metric: intervals, per class, calibration "
        "(`dvc metrics show reports/metrics_detail.json`).",
    )
    confusion: str = Field(
        default="reports/confusion.csv", description="Test predictions for the DVC confusion plot."
    )
    plots: str = Field(default="reports/plots", description="Evaluation images (confusion matrix).")
    report: str = Field(default="reports/report.md", description="Human-readable evaluation report.")
    decision: str = Field(
        default="reports/decision.json",
        description="The decision threshold and conformal quantile evaluate chose; predict applies them.",
    )
    label_audit: str = Field(
        default="reports/label_audit.csv",
        description="Likely label errors (cleanlab), most suspect first: path, given, suggested, score.",
    )
    suggest: str = Field(
        default="reports/suggest.csv",
        description="python -m pipeline suggest writes the images to label next here (path, rank, score, "
        "predicted, probability, why); not a DVC output.",
    )
    suggest_sheet: str = Field(
        default="reports/suggest.png", description="The suggested images as a contact sheet (suggest)."
    )
    exports: str = Field(
        default="exports",
        description="Where 'python -m pipeline export' writes model.pt / model.onnx "
        "by default (outside the DVC-tracked model_dir).",
    )


@dataclass(frozen=True, config=_STRICT)
class Demo:
    """The embedded, generated demo set (synthetic H&E-like tissue tiles)."""

    name: str = Field(default="demo", description="Data set name under paths.raw.")
    n_per_class: int = Field(default=100, ge=1, description="Images generated per class.")
    image_size: int = Field(default=64, ge=16, le=1024, description="Side of the generated PNGs, pixels.")


@dataclass(frozen=True, config=_STRICT)
class Data:
    """Which data set to ingest and how to split it."""

    dataset: str = Field(default="demo", min_length=1, description="Data set folder under paths.raw.")
    unlabelled: str | None = Field(
        default=None,
        min_length=1,
        description="Unlabelled pool folder under paths.unlabelled (intake SRC --unlabelled) for self- and "
        "semi-supervised training; the pool stage leaves out its duplicates of labelled images and its "
        "patients (groups) in val or test. null: none.",
    )
    image_size: int | Literal["auto"] = Field(
        default="auto",
        description="Images are resized to this square side at ingest. auto: the size the starting weights "
        "were trained at (224 for ImageNet and torchgeo weights, an earlier run's or the pretraining run's "
        "size), or the images' own size capped at 64 px when no pretrained weights load (random init); the "
        "size stage resolves it into paths.image_size, with the reason (docs/data.md). A number wins.",
    )
    val_fraction: float = Field(default=0.15, gt=0, lt=0.5, description="Share of each class for validation.")
    test_fraction: float = Field(default=0.15, gt=0, lt=0.5, description="Share of each class for test.")
    on_bad_file: Literal["skip", "fail"] = Field(
        default="skip", description="Unreadable image files: skip with a warning, or stop."
    )
    channels: Literal["rgb", "keep"] = Field(
        default="rgb",
        description="rgb: grayscale replicated to 3 channels, alpha dropped (for ImageNet weights); "
        "keep: 1 or N bands as the files hold them (all files must agree).",
    )
    dicom_window: tuple[float, float] | None = Field(
        default=None,
        description="DICOM [center, width] in modality units (after rescale slope/intercept); "
        "null: each file's WindowCenter/WindowWidth tags, else its own min..max.",
    )
    dicom_group: Literal["PatientID", "StudyInstanceUID"] | None = Field(
        default="PatientID",
        description="intake of a set without a group column: each DICOM file's group is this header "
        "element, stored as a salted hash, so one patient's (or study's) slices share a "
        "split; null: DICOM files are not grouped.",
    )
    min_images_per_class: int = Field(
        default=20,
        ge=3,
        description="Classes with fewer readable images get a warning (fewer than 3 is an error).",
    )
    near_duplicate_bits: int | None = Field(
        default=10,
        ge=0,
        le=64,
        description="Images whose 256-bit difference hashes differ in at most this many bits "
        "are near duplicates; null turns the check off.",
    )
    on_leakage: Literal["fail", "warn"] = Field(
        default="fail",
        description="Duplicates or one group in two splits of a predefined split: stop, or warn.",
    )
    on_label_conflict: Literal["fail", "drop"] = Field(
        default="fail",
        description="Identical files under different labels: stop, or leave every copy out (listed in "
        "the data card and report.json label_conflicts), e.g. to keep a published split.",
    )
    max_image_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="Pixel budget per image (width x height, times frames for DICOM), checked "
        "before decoding: larger files are skipped as unreadable (decompression "
        "bombs). Pillow refuses PNG/JPEG past about 179 million on its own.",
    )
    folds: int = Field(
        default=0,
        ge=0,
        le=20,
        description="0: no cross-validation; k >= 2: k-fold cross-validation over train+val. "
        "Ingest writes a 'fold' column (0..k-1, grouped, stratified; -1 for test) "
        "to splits.csv; train fits one model per fold, selected on its fold, and "
        "ships their ensemble with out-of-fold predictions (models/oof.csv).",
    )
    exclude: str | None = Field(
        default=None,
        min_length=1,
        description="A CSV with a 'path' column (e.g. rows kept from the label audit, "
        "paths.label_audit): those files are left out at ingest and listed in "
        "report.json as excluded; the source files are not touched. null: none.",
    )

    def __post_init__(self) -> None:
        if self.folds == 1:
            raise ValueError("folds must be 0 (off) or at least 2")
        if self.image_size != "auto" and not MIN_SIDE <= self.image_size <= MAX_SIDE:
            raise ValueError(f"image_size must be auto or a side from {MIN_SIDE} to {MAX_SIDE} px")
        if self.dicom_window is not None and self.dicom_window[1] <= 0:
            raise ValueError("dicom_window width (second value) must be > 0")


@dataclass(frozen=True, config=_STRICT)
class Augment:
    """The training augmentation pipeline: a domain preset, overridden or extended by albumentations entries."""

    preset: Preset = Field(
        default="medical",
        description="Starting list of transforms (pipeline/augment.py PRESETS); 'none' starts empty.",
    )
    transforms: tuple[dict[str, Any], ...] = Field(
        default=({"name": "SquareSymmetry", "p": 1.0},),
        description="List of {name: <albumentations transform>, <argument>: <value>, ...}. An entry named like "
        "a preset transform updates that transform's arguments; other entries are appended.",
    )
    offline_copies: int = Field(
        default=0,
        ge=0,
        le=20,
        description="Augmented copies of each training image written "
        "at the augment stage and added to the train split.",
    )
    preview_images: int = Field(
        default=6, ge=1, le=32, description="Training images shown in the preview grid."
    )
    preview_draws: int = Field(default=5, ge=1, le=16, description="Augmented draws per preview image.")
    # Batch-level mixing, applied in the training step (pipeline/training/model.py), not by the augment stage.
    mixup_alpha: float = Field(
        default=0.2,
        ge=0,
        le=10,
        description="MixUp: each training batch is blended with a shuffled copy of itself, "
        "labels too, by a Beta(alpha, alpha) weight; 0 turns it off (0.2-0.4 is usual).",
    )
    cutmix_alpha: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="CutMix: a box of a shuffled copy is pasted in, labels mixed by its area; "
        "Beta(alpha, alpha); 0 turns it off (1.0 is usual).",
    )
    mix_prob: float = Field(
        default=1.0, ge=0, le=1, description="Share of training batches mixed (when MixUp or CutMix is on)."
    )
    cutmix_switch_prob: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="With both on: the chance that a mixed batch uses CutMix rather than MixUp.",
    )


@dataclass(frozen=True, config=_STRICT)
class Model:
    arch: Arch = Field(default="resnet18", description="torchvision architecture.")
    weights: str = Field(
        default="imagenet",
        min_length=1,
        description="'imagenet' (the arch's default torchvision weights), a torchvision weight enum name "
        "(e.g. ResNet50_Weights.IMAGENET1K_V2), a named domain backbone (torchgeo's satellite ResNets: "
        + backbones.choices()
        + "), a path to a .pth state dict, an earlier run (its models/ folder, a .ckpt, runs:/ or models:/ "
        "URI), or 'none'.",
    )
    weights_sha256: str | None = Field(
        default=None,
        pattern=r"^[0-9a-fA-F]{64}$",
        description="SHA-256 of the weights file (a local .pth, or the downloaded checkpoint); a file with "
        "another hash is refused. null: torchvision's own hash-prefix check only.",
    )
    require_pretrained: bool = Field(
        default=False,
        description="Fail instead of falling back to random init when weights cannot be obtained.",
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout before the classification head.")
    stem: Literal["imagenet", "small"] = Field(
        default="imagenet",
        description="imagenet: torchvision's stem (a stride-2 7x7 conv, then a stride-2 max-pool: a 64 px "
        "image leaves a 2x2 map at layer4); small: the max-pool left out (4x4 at 64 px, about 4x the "
        "compute), for images of 64 px and below. The weights are the same tensors either way.",
    )

    def __post_init__(self) -> None:
        refuse_in_params("model.weights", self.weights)  # a runs:/ or https:// source, logged as a param
        spelled = next((b.name for b in backbones.NAMED.values() if b.enum == self.weights), None)
        if spelled is not None:  # torchgeo's spelling looks like a torchvision enum name: one vocabulary
            raise ValueError(f"weights: {self.weights} is torchgeo's name; write model.weights: {spelled}")
        named = backbones.NAMED.get(self.weights)
        if named is not None and named.arch != self.arch:
            raise ValueError(
                f"weights: {self.weights} is a {named.arch} backbone, but arch is {self.arch}; "
                f"set model.arch: {named.arch}"
            )
        # A lowercase snake name is meant as a backbone name unless it is a file or folder (a run's copy).
        if (
            named is None
            and self.weights not in ("imagenet", "none")
            and re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", self.weights)
            and not Path(self.weights).exists()
        ):
            raise ValueError(
                f"weights: '{self.weights}' is neither a named backbone nor an existing file or folder; "
                f"named backbones: {backbones.choices()}"
            )


@dataclass(frozen=True, config=_STRICT)
class Pretrain:
    """Self-supervised pretraining of the backbone on unlabelled images (the pool and the train split, never
    val or test) before the classifier trains; ``model.weights: pretrain`` starts training from its output."""

    method: Literal["none", "simclr", "byol"] = Field(
        default="none",
        description="none: no pretraining | simclr: contrastive (negatives gathered across GPUs) | byol: a "
        "momentum target, no negatives (steadier at the small batches a CPU affords).",
    )
    epochs: int = Field(default=20, ge=1, description="Passes over the pretraining images.")
    batch_size: int = Field(default=64, ge=2, description="Images per step (per device); two views each.")
    lr: float = Field(
        default=1e-3, gt=0, lt=10, description="Peak AdamW learning rate (warm-up, cosine decay)."
    )
    weight_decay: float = Field(default=1e-4, ge=0, lt=1, description="AdamW weight decay.")
    temperature: float = Field(default=0.2, gt=0, le=1, description="simclr: the NT-Xent loss's temperature.")
    momentum: float = Field(default=0.99, gt=0, lt=1, description="byol: the target network's EMA momentum.")
    weights: str = Field(
        default="none",
        description="What pretraining starts from: none (random init) | imagenet | any model.weights value but "
        "pretrain (continued pretraining of an ImageNet or domain backbone on the pool).",
    )
    knn_every: int = Field(
        default=5,
        ge=0,
        description="Every this many epochs, the kNN accuracy of the frozen features on val "
        "(pretrain/knn_accuracy in MLflow): whether it learns anything a classifier can use; 0: never.",
    )

    def __post_init__(self) -> None:
        if self.weights == "pretrain":
            raise ValueError(
                "weights: pretraining cannot start from its own output; use none, imagenet or another "
                "model.weights value"
            )


@dataclass(frozen=True, config=_STRICT)
class Train:
    max_epochs: int = Field(
        default=40,
        ge=1,
        description="Training epochs: all of them with train.checkpoint last, an upper bound with best "
        "(docs/benchmarks.md: 20 epochs chosen on val/loss lost up to 52 points on a small real set).",
    )
    batch_size: int = Field(default=32, ge=1, description="Images per step (per device).")
    lr: float = Field(default=1e-3, gt=0, lt=10, description="Peak learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0, lt=1, description="AdamW / SGD weight decay.")
    optimizer: Literal["adamw", "sgd"] = Field(default="adamw", description="Optimizer.")
    monitor: Literal["val/loss", "val/accuracy", "val/balanced_accuracy", "val/auroc"] = Field(
        default="val/auroc",
        description="Validation metric for checkpointing, early stopping and tuning (val/auroc: a "
        "label-smoothed loss on a few dozen val images stops and selects poor epochs); which way is better "
        "comes with the metric (pipeline/vocabulary.py).",
    )
    patience: int = Field(
        default=15,
        ge=1,
        description="Epochs without improvement before early stopping (train.checkpoint: best only).",
    )
    checkpoint: Literal["best", "last"] = Field(
        default="last",
        description="The weights that ship: best (the epoch with the best train.monitor, early stopping "
        "after train.patience epochs without improvement) or last (the end of the whole schedule, no early "
        "stopping: the lr decays to 0 by then, and with EMA the weights are averaged; on a val split of a "
        "few dozen images 'best' can pick an early epoch by noise: docs/benchmarks.md).",
    )
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = Field(
        default="auto", description="Lightning accelerator."
    )
    devices: int | Literal["auto"] = Field(
        default=1, description="Devices to train on (DDP when > 1); per node."
    )
    num_nodes: int = Field(
        default=1,
        ge=1,
        description="Machines in a multi-node DDP run (devices on each); must match "
        "the launcher's node count (torchrun --nnodes, SLURM --nodes).",
    )
    strategy: Literal["auto", "ddp", "ddp_spawn"] = Field(default="auto", description="Lightning strategy.")
    precision: Literal["32", "16-mixed", "bf16-mixed"] = Field(default="32", description="Numeric precision.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes.")
    cpu_threads: int | None = Field(
        default=2,
        ge=1,
        description="torch's CPU threads in the train, tune and evaluate stages. A fixed count makes a CPU "
        "run's numbers the same on any machine (the float sums depend on it: the demo's committed reports "
        "are what make demo reproduces); raise it on a big CPU-only machine (faster, numbers then differ in "
        "the last digits). null: the cores the machine has free (its load average subtracted).",
    )
    channels_last: bool | Literal["auto"] = Field(
        default="auto",
        description="Run the network and its inputs in channels_last memory format: faster convolutions "
        "on GPUs (tensor cores, mixed precision). auto: on CUDA devices only (on CPU it was "
        "no faster here, see make bench).",
    )
    mode: Literal["finetune", "linear_probe", "knn", "lp_ft"] = Field(
        default="finetune",
        description="finetune: train the network (the recipe below); linear_probe: a logistic "
        "regression head on the frozen backbone's pooled features; knn: a cosine "
        "k-nearest-neighbour vote over them (pipeline/training/probe.py). The frozen modes compute "
        "each image's features once and train in seconds; with under ~10 images per "
        "class they often beat fine-tuning. lp_ft: the linear probe first (to convergence), then "
        "fine-tuning everything from that head at train.lr x train.lp_ft_lr_mult (Kumar et al., ICLR "
        "2022: about +1 point in distribution, +10 under a sensor or scanner shift); random init: finetune.",
    )
    lp_ft_lr_mult: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="train.mode lp_ft: the fine-tuning phase's learning rate is train.lr x this (a head that "
        "already fits lets a lower rate keep the pretrained features: large early gradients through a "
        "random head are what distorts them).",
    )
    knn_k: int = Field(
        default=20, ge=1, description="train.mode knn: neighbours that vote (at most the training images)."
    )
    # The small-data recipe (pipeline/training/recipe.py).
    # Off by default: on real pretrained features it lost to fine-tuning everything at one learning rate at
    # every shot count and draw (docs/benchmarks.md, "Transfer learning"); kept as keys to compare.
    freeze_epochs: int = Field(
        default=0,
        ge=0,
        description="Epochs that train only the new head, backbone frozen (BatchNorm statistics "
        "too); 0: the whole network trains from the first epoch. Ignored, with a warning, when the backbone "
        "is randomly initialised.",
    )
    unfreeze: Literal["all", "gradual"] = Field(
        default="all",
        description="After the frozen epochs: 'all' unfreezes the whole backbone at once; 'gradual' "
        "one residual stage per epoch, layer4 first, the stem last.",
    )
    backbone_lr_mult: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Backbone learning rate = train.lr x this (the head gets train.lr). "
        "1.0 when the backbone is randomly initialised.",
    )
    warmup_epochs: float = Field(
        default=1.0,
        ge=0,
        description="Linear learning-rate warm-up (per step) over this many epochs, then cosine "
        "decay to zero at train.max_epochs.",
    )
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    balance: Literal["none", "loss", "sampler"] = Field(
        default="none",
        description="Imbalanced classes: 'loss' weights the cross-entropy by inverse class frequency; "
        "'sampler' draws training batches class-balanced (with replacement).",
    )
    semi: Literal["none", "fixmatch"] = Field(
        default="none",
        description="Semi-supervised training on the unlabelled pool (data.unlabelled): fixmatch trains each "
        "pool image's strong view to predict its weak view's class where the model is confident "
        "(docs/training.md); none: labelled images only.",
    )
    semi_threshold: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="fixmatch: a pool image's pseudo-label counts where its weak-view top probability reaches "
        "this share of the top probability the training targets ask for (1 - label_smoothing + "
        "label_smoothing / classes: 0.95 x 0.95 for two classes at the default smoothing); below it the image "
        "adds no loss.",
    )
    semi_ratio: int = Field(
        default=3, ge=1, le=16, description="fixmatch: unlabelled images per labelled image in a step."
    )
    semi_weight: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="fixmatch: weight of the unlabelled loss beside the labelled one.",
    )
    ema_decay: float | None = Field(
        default=0.995,
        ge=0,
        lt=1,
        description="Exponential moving average of the weights (and BatchNorm statistics), "
        "updated every step with this decay (warmed up as min(decay, (1+n)/(10+n))); "
        "the averaged weights are validated, checkpointed, evaluated and exported. "
        "null or 0: off.",
    )

    @field_validator("monitor", mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if value in vocabulary.RENAMED:
            raise ValueError(f"'{value}' is now called '{vocabulary.RENAMED[value]}' (one metric vocabulary)")
        return value

    def __post_init__(self) -> None:
        if isinstance(self.devices, int) and self.devices < 1:
            raise ValueError("devices must be >= 1 or 'auto'")


@dataclass(frozen=True, config=_STRICT)
class SearchDim:
    """One searched params key: a float/int range or a list of choices."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def __post_init__(self) -> None:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError("float/int need 'low' < 'high'")
        elif self.log and self.low <= 0:
            raise ValueError("log scale needs 'low' > 0")

    def bounds(self) -> tuple[float, float]:
        """(low, high) of a float or int range (``__post_init__`` checked both are there)."""
        assert self.low is not None and self.high is not None, f"{self.type} dimension without bounds"
        return self.low, self.high


@dataclass(frozen=True, config=_STRICT)
class Tune:
    enabled: bool | Literal["auto"] = Field(
        default="auto",
        description="Run the Optuna study; false passes params.yaml values through. auto: a small study "
        "on the demo set only (demo_trials trials of at most demo_max_epochs epochs, pruned), "
        "so a fresh clone's dvc repro shows one; none on any other set, where a trial trains the whole "
        "schedule and a study costs about n_trials trainings: true runs it (n_trials >= 9 for Hyperband to "
        "act; docs/tuning.md).",
    )
    demo_trials: int = Field(
        default=4,
        ge=1,
        description="enabled auto on the demo set: the study's n_trials (a demo-sized study).",
    )
    demo_max_epochs: int = Field(
        default=3,
        ge=1,
        description="enabled auto on the demo set: the study's max_epochs (short trials; Hyperband's first "
        "rung at a third of them, where the weaker trials are pruned).",
    )
    n_trials: int = Field(default=4, ge=1, description="Completed-or-pruned trials the study should hold.")
    max_epochs: int | None = Field(
        default=None,
        ge=1,
        description="Epochs a trial may train; null: train.max_epochs, the schedule the train stage uses "
        "(a shorter trial ranks settings for a schedule that is not the one shipped).",
    )
    min_epochs: int = Field(
        default=3,
        ge=1,
        description="pruner hyperband: the first rung; rungs at min_epochs x 3^k epochs up to the trial's "
        "full length, where the unpromising third of the trials that reached it is stopped.",
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="Stop starting new trials after this many seconds."
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        default="hyperband",
        description="Optuna pruner, applied to train.monitor after every epoch: hyperband (multi-fidelity "
        "rungs, see min_epochs), median (below the running median after the first epoch) or none.",
    )
    storage: str = Field(
        default="sqlite:///optuna.db",
        description="Optuna storage URL, kept between runs: SQLite for one machine, "
        "postgresql://user@host:port/db for workers on several "
        "(python -m pipeline tune --worker); the password comes from PGPASSWORD "
        "or ~/.pgpass, never from here (a URI with one is refused).",
    )
    n_jobs: int = Field(
        default=1,
        ge=1,
        description="Worker processes on this machine filling the study at once, one "
        "trial each: GPU i for worker i when there are GPUs, else the CPU "
        "cores split between them.",
    )
    search_space: dict[str, SearchDim] = Field(
        default_factory=lambda: {
            "train.lr": SearchDim(type="float", low=1e-4, high=3e-3, log=True),
            "train.weight_decay": SearchDim(type="float", low=1e-6, high=1e-2, log=True),
        },
        description="params key -> {type: float|int|categorical, low, high, log, choices}.",
    )

    def __post_init__(self) -> None:
        refuse_in_params("tune.storage", self.storage)


ThresholdObjective = Literal["fixed", "youden", "balanced_accuracy", "f1", "sensitivity", "specificity"]
NAMED_THRESHOLDS: tuple[ThresholdObjective, ...] = ("youden", "balanced_accuracy", "f1")  # without a target
TARGET_THRESHOLDS: tuple[ThresholdObjective, ...] = (
    "sensitivity",
    "specificity",
)  # written '<name>:<target>', e.g. sensitivity:0.95


def parse_threshold(value: float | str) -> tuple[ThresholdObjective, float | None]:
    """``evaluate.threshold`` as (objective, number): ('fixed', cut), (name, None) or (name, target)."""
    text = str(value).strip()
    name, _, target = text.partition(":")
    try:
        number = float(target if target else text)
    except ValueError:
        number = None
    for objective in NAMED_THRESHOLDS:  # the name as its Literal
        if name == objective and not target:
            return objective, None
    for objective in TARGET_THRESHOLDS:
        if name == objective and number is not None and 0 < number < 1:
            return objective, number
    if not target and number is not None and 0 < number < 1:
        return "fixed", number
    raise ValueError(
        f"threshold {value!r}: expected a number in (0, 1), {' | '.join(NAMED_THRESHOLDS)}, or "
        f"sensitivity:<target> / specificity:<target> with a target in (0, 1), e.g. sensitivity:0.95"
    )


@dataclass(frozen=True, config=_STRICT)
class Evaluate:
    batch_size: int = Field(default=64, ge=1, description="Images per inference batch.")
    gradcam_per_class: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Grad-CAM panel (pipeline/evaluation/explain.py): the most confident correct and the most "
        "confident wrong test images per true class, this many of each; 0 turns it off.",
    )
    tta: tuple[str | dict[str, Any], ...] = Field(
        default=("HorizontalFlip", "VerticalFlip"),
        description="Test-time augmentation: deterministic albumentations transforms (names, or {name, args}); "
        "predictions are averaged over the image and each transform. [] turns it off.",
    )
    positive_class: str | None = Field(
        default=None,
        min_length=1,
        description="Binary tasks: the class whose recall is the sensitivity (the other's is the specificity). "
        "null: the class whose name does not mean healthy (normal, benign, negative, healthy, no_...) when the "
        "other's does, else the second name in sorted order. Must be null for more than two classes.",
    )
    bootstrap: int = Field(
        default=1000,
        ge=0,
        description="Bootstrap resamples of the test set (seeded by seed) for the 95% intervals "
        "stored as <metric>_ci_low / _ci_high; 0 turns the intervals off.",
    )
    ece_bins: int = Field(
        default=15,
        ge=2,
        le=100,
        description="Equal-width confidence bins of the expected calibration "
        "error and the reliability diagram.",
    )
    temperature_scaling: bool = Field(
        default=True,
        description="Fit one temperature on the validation split's logits and report the test calibration "
        "metrics before (test/*) and after (test_calibrated/*) it.",
    )
    ci_warn_width: float = Field(
        default=0.2,
        gt=0,
        le=1,
        description="The report warns when a headline metric's 95% interval is wider than this "
        "(the test set is too small to pin it down).",
    )
    threshold: float | str = Field(
        default=0.5,
        description="Binary tasks: the positive-class probability at or above which an image is called "
        "positive. A number in (0, 1), or chosen on the selection set (the validation split's "
        "predictions) for an objective: youden | balanced_accuracy (the same cut) | f1 | "
        "sensitivity:<target> (the highest cut reaching it) | specificity:<target> (the lowest); "
        "then applied unchanged to test and predict.",
    )
    conformal_alpha: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Split conformal prediction sets (LAC) fitted on the selection set: each "
        "image gets the classes whose set covers the truth with probability "
        ">= 1 - alpha; null turns them off.",
    )
    label_audit_panel: int = Field(
        default=8,
        ge=0,
        le=64,
        description="Thumbnails of the most suspect labels (cleanlab on the selection set) shown "
        "in the report; 0: no panel (the ranked CSV is written either way).",
    )

    def __post_init__(self) -> None:
        parse_threshold(self.threshold)


@dataclass(frozen=True, config=_STRICT)
class Tracking:
    tracking_uri: str = Field(
        default="sqlite:///mlflow.db",
        description="MLflow store; the MLFLOW_TRACKING_URI environment variable wins.",
    )
    experiment: str = Field(default="pipeline", min_length=1, description="MLflow experiment name.")
    artifact_root: str = Field(
        default="mlartifacts", description="Artifact folder for a local (sqlite/file) store."
    )
    registered_model: str | None = Field(
        default="pipeline-{dataset}",
        min_length=1,
        pattern=r"^[\w.-]*(\{dataset\}[\w.-]*)*$",
        description="The train stage registers its model under this name in the MLflow model registry, "
        "{dataset} replaced by data.dataset (one registered model per data set); letters, digits, _ . - "
        "and {dataset}. Serve the version that `python -m pipeline promote` gave the alias 'champion': "
        "models:/<name>@champion (docs/serving.md). null: log the model without registering it.",
    )

    def __post_init__(self) -> None:
        refuse_in_params("mlflow.tracking_uri", self.tracking_uri)

    def model_name(self, dataset: str) -> str | None:
        """The registered model's name for ``dataset`` (``registered_model`` with ``{dataset}`` filled in)."""
        return None if self.registered_model is None else self.registered_model.replace("{dataset}", dataset)


@dataclass(frozen=True, config=_STRICT)
class Params:
    seed: int = Field(default=42, ge=0, description="Seed for splitting, augmentation, training and tuning.")
    paths: Paths = Field(default_factory=Paths)
    demo: Demo = Field(default_factory=Demo)
    data: Data = Field(default_factory=Data)
    augment: Augment = Field(default_factory=Augment)
    model: Model = Field(default_factory=Model)
    pretrain: Pretrain = Field(default_factory=Pretrain)
    train: Train = Field(default_factory=Train)
    tune: Tune = Field(default_factory=Tune)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    mlflow: Tracking = Field(default_factory=Tracking)

    def __post_init__(self) -> None:
        if self.data.val_fraction + self.data.test_fraction >= 0.8:
            raise ValueError("data.val_fraction + data.test_fraction must leave at least 20% for training")
        for key in self.tune.search_space:
            _check_key(self, key)


_ADAPTER = TypeAdapter(Params)


def _check_key(params: Params, key: str) -> None:
    """Raise unless ``key`` ('section.name') names a scalar params field."""
    section, _, name = key.partition(".")
    fields = {f.name for f in dataclasses.fields(Params)}
    if (
        section not in fields
        or not dataclasses.is_dataclass(getattr(params, section))
        or name not in {f.name for f in dataclasses.fields(getattr(params, section))}
    ):
        raise ValueError(
            f"tune.search_space: '{key}' is not a params key (use 'section.name', e.g. 'train.lr')"
        )


def parse(raw: dict[str, Any] | None, source: str = PARAMS_FILE) -> Params:
    """Validate a params mapping; errors name every offending key and the value given."""
    try:
        return _ADAPTER.validate_python(raw or {})
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


# A params file is a few hundred values; aliases may repeat a block, but an "alias bomb" (each anchor
# naming the one before ten times) expands to billions and would hang validation: count before building.
MAX_YAML_NODES = 100_000


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader refusing what DVC's parser refuses (a key given twice in one mapping)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override, as YAML allows
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line}; first on line {seen[key]})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node) -> int:
    """How many nodes ``root`` holds with every alias expanded (a recursive alias counts as too many)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = MAX_YAML_NODES + 1  # while in progress: a cycle is unbounded
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            sizes[id(node)] = min(1 + sum(size(c) for c in children), MAX_YAML_NODES + 1)
        return sizes[id(node)]

    return size(root)


def read_yaml(path: Path) -> Any:
    """A YAML file's document, bounded and with duplicate keys refused; ``yaml.YAMLError`` when it is not."""
    loader = _Loader(path.read_text())
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_YAML_NODES:
            raise yaml.YAMLError(
                f"its aliases expand to more than {MAX_YAML_NODES:,} values (an alias bomb?); "
                "write the values out instead"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found (run from the repository root)")
    try:
        raw = read_yaml(path)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:  # an emptied file must not silently mean "all defaults" (an explicit {} still does)
        raise ConfigError(
            f"{path}: is empty; it must hold the project's params (restore it: git checkout {path})"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse(raw, str(path))


def _describe(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join([prefix, *map(str, e["loc"])] if prefix else map(str, e["loc"])) or "params"
        if e["type"] == "unexpected_keyword_argument":
            lines.append(f"  {key}: unknown key")
        elif isinstance(e.get("input"), dict):  # a whole-section check: the message names the keys
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return redact(f"{source}: invalid params\n" + "\n".join(lines))  # a refused password is not echoed


def value_at(params: Params, key: str) -> Any:
    """The value of a 'section.name' params key."""
    _check_key(params, key)
    section, _, name = key.partition(".")
    return getattr(getattr(params, section), name)


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """Return params with 'section.name' keys replaced (validated again, as the tuner needs)."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        _check_key(params, key)
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = value
    changed = {}
    for section, values in sections.items():
        try:
            changed[section] = dataclasses.replace(getattr(params, section), **values)
        except ValidationError as err:
            raise ConfigError(_describe(err, "overrides", section)) from None
    return dataclasses.replace(params, **changed)


def as_dict(params: Any) -> dict[str, Any]:
    """Plain, JSON-serialisable dict of the params (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(params), default=list))


def flatten(params: Params) -> dict[str, Any]:
    """params.yaml names flattened with dots ('train.lr'), as MLflow params."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list):
            flat[prefix] = json.dumps(value)
        else:
            flat[prefix] = value

    walk("", as_dict(params))
    return flat
