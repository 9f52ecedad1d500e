"""``make bench``: speed and memory of the pipeline's hot paths, one JSON object per line.
(``python -m pipeline bench quality``: test quality on real X-rays instead, see ``benchmarks.quality``;
``python -m pipeline bench scale``: the pipeline on the 27,000 EuroSAT tiles, see ``benchmarks.scale``;
``python -m pipeline bench transfer``: transfer from the pipeline's own pretraining, ``benchmarks.transfer``.)

Measured on a generated demo set in a temporary folder, so it needs no prior ``dvc repro``:
- ``ingest``: decode + resize + cache throughput;
- ``loader``: augmented training batches per second from the cache, against decoding the PNGs
  in every epoch (what the cache saves);
- ``augment``: per preset, augmented images/s in one thread (what one loader worker gets) with
  albumentations against the equivalent ``torchvision.transforms.v2`` pipeline on the same images;
- ``train_step``: Lightning ``fit`` images/s against a plain PyTorch loop over the same data, model
  and optimizer, epochs after the first (the ratio is the pipeline's overhead, target >= 0.95);
- ``train_memory``: peak memory (RSS, and GPU when there is one) of a training run at the demo's
  params.yaml settings, in a fresh process;
- ``dataloader``: images/s the training loader delivers against what training consumes (target
  ratio >= 3: the model, not the data, is the bottleneck);
- ``tune_pruning``: the same seeded Optuna study (small demo set, 32 px, a wide learning-rate range)
  with the median pruner and without: trial wall time, epochs trained, best validation loss.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F
from torchvision.transforms import v2

from pipeline import augment, config, demo
from pipeline.data import readers
from pipeline.data.datamodule import CachedImageDataset
from pipeline.data.ingest import ingest
from pipeline.data.prepared import load_prepared
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Classifier

N_PER_CLASS, SIZE, EPOCHS = 48, 64, 3
# The recipe before issue 12's defaults: no MixUp/CutMix, no EMA, the best epoch ships. Benchmarks that
# compare against a bare loop or keep documented tables comparable start from it, whatever params.yaml says.
PLAIN_RECIPE: dict[str, dict] = {
    "augment": {"mixup_alpha": 0.0, "cutmix_alpha": 0.0},
    "train": {"ema_decay": None, "checkpoint": "best"},
}
AUGMENT = config.parse({}).augment
AUGMENT_SECONDS = 1.5  # per library and preset
# tune_pruning: a study small enough for ~2 minutes on 2 cores, long enough for the pruner to act
TUNE_PER_CLASS, TUNE_SIZE, TUNE_TRIALS, TUNE_EPOCHS, TUNE_ROUND = 24, 32, 10, 4, 2
# A first search's wide learning-rate range: the poor corners are what pruning saves time on.
TUNE_SPACE = {
    "train.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "train.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
}


def decode(path: Path, size: int) -> np.ndarray:
    """One file as (size, size, 3) uint8 RGB (the decode-every-epoch loader)."""
    pixels = readers.conform(readers.read(path), size, "rgb")
    if pixels.dtype == np.uint16:
        return (pixels / 257).round().astype(np.uint8)
    return (pixels * 255).round().astype(np.uint8) if pixels.dtype.kind == "f" else pixels


def emit(name: str, **values) -> None:
    print(json.dumps({"bench": name, **values}), flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def bench_ingest(raw: Path, out: Path) -> None:
    start = time.perf_counter()
    report = ingest(
        raw, out, image_size=SIZE, val_fraction=0.15, test_fraction=0.15, seed=0, on_bad_file="skip"
    )
    seconds = time.perf_counter() - start
    emit(
        "ingest",
        images=report["n_images"],
        seconds=round(seconds, 2),
        images_per_s=round(report["n_images"] / seconds, 1),
    )


def bench_loader(prepared, pipeline) -> None:
    rows = prepared.split("train")
    dataset = CachedImageDataset(
        prepared.images[rows["cache_index"].to_numpy()], rows["label_index"].to_numpy(), pipeline
    )
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    cached = len(dataset) / (time.perf_counter() - start)
    paths = [Path(p) for p in rows["path"]]
    start = time.perf_counter()
    for p in paths:
        pipeline(image=decode(p, SIZE))
    decoded = len(paths) / (time.perf_counter() - start)
    emit(
        "loader",
        workers=0,
        cached_images_per_s=round(cached, 1),
        decode_each_epoch_images_per_s=round(decoded, 1),
        speedup=round(cached / decoded, 2),
    )


def _random_gamma(x: torch.Tensor) -> torch.Tensor:
    return v2.functional.adjust_gamma(x, float(torch.empty(1).uniform_(0.9, 1.1)))


def _random_rot90(x: torch.Tensor) -> torch.Tensor:
    return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


def _band_gain(x: torch.Tensor) -> torch.Tensor:
    gain = torch.empty(x.shape[0], 1, 1).uniform_(0.9, 1.1)
    return (x.float() * gain).round_().clamp_(0, 255).to(x.dtype)


def torchvision_equivalent(preset: str) -> v2.Compose:
    """Each preset (``augment.PRESETS``) in torchvision v2: same probabilities and ranges where v2 has
    the transform, a small lambda where it does not (gamma, 90-degree rotation, per-band gain)."""
    bilinear = v2.InterpolationMode.BILINEAR
    return v2.Compose(
        {
            "medical": [
                v2.RandomApply(
                    [v2.RandomAffine(10, translate=(0.05, 0.05), scale=(0.9, 1.1), interpolation=bilinear)],
                    p=0.5,
                ),
                v2.RandomApply([v2.ElasticTransform(alpha=15.0, sigma=6.0)], p=0.25),
                v2.RandomApply([v2.ColorJitter(brightness=0.1, contrast=0.1)], p=0.5),
                v2.RandomApply([v2.Lambda(_random_gamma)], p=0.3),
            ],
            "satellite": [
                v2.RandomHorizontalFlip(),
                v2.Lambda(_random_rot90),
                v2.RandomApply([v2.Lambda(_band_gain)], p=0.5),
            ],
            "natural": [
                v2.RandomHorizontalFlip(),
                v2.RandomApply(
                    [v2.RandomAffine(15, translate=(0.1, 0.1), scale=(0.8, 1.2), interpolation=bilinear)],
                    p=0.7,
                ),
                v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
            ],
        }[preset]
    )


def _images_per_s(apply, images) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < AUGMENT_SECONDS:
        for image in images:
            apply(image)
        done += len(images)
    return done / (time.perf_counter() - start)


def bench_augment(prepared) -> None:
    images = np.ascontiguousarray(prepared.images[prepared.split("train")["cache_index"].to_numpy()])
    tensors = [
        torch.from_numpy(image.transpose(2, 0, 1).copy()) for image in images
    ]  # v2's own layout, not timed
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # one loader worker: a single thread for both libraries
    cv2.setNumThreads(1)
    try:
        for preset in ("medical", "satellite", "natural"):
            albumentations = augment.build([], seed=0, preset=preset)
            torchvision = torchvision_equivalent(preset)
            ours = _images_per_s(lambda image, pipeline=albumentations: pipeline(image=image), images)
            theirs = _images_per_s(torchvision, tensors)
            emit(
                "augment",
                preset=preset,
                image_size=SIZE,
                threads=1,
                albumentations_img_s=round(ours, 1),
                torchvision_v2_img_s=round(theirs, 1),
                ratio=round(ours / theirs, 2),
            )
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


class EpochClock(Callback):
    """Wall time from the start of the second training epoch to the end of the last validation:
    steady-state throughput, without the first epoch's one-off costs (threads, allocator, setup)."""

    def __init__(self):
        self.start = self.end = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            self.start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def plain_loop(params: config.Params, data) -> float:
    """The baseline: the same network (channels_last as configured), optimizer and batches in a bare
    PyTorch loop; images/s over the epochs after the first, like ``EpochClock``."""
    torch.manual_seed(params.seed)
    train = config.Train(lr=params.train.lr, channels_last=params.train.channels_last)
    model = Classifier(config.Model(arch=params.model.arch), train, num_classes=data.num_classes)
    model.on_fit_start()  # the memory format, as Lightning would set it (on CPU here)
    opt = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    train, val = data.train_dataloader(), data.val_dataloader()
    seen, start = 0, 0.0
    for epoch in range(EPOCHS):
        if epoch == 1:
            seen, start = 0, time.perf_counter()
        model.train()
        for x, y in train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            seen += len(y)
        model.eval()
        with torch.no_grad():
            for x, _ in val:
                model(x)
    return seen / (time.perf_counter() - start)


def bench_train_step(data) -> float:
    """Lightning ``fit`` images/s against the plain loop on the same model, batches and threads; returns ours."""
    params = config.parse(
        {
            "model": {"weights": "none"},
            # The same work as the plain loop: no MixUp/CutMix, no EMA (the loop has neither).
            "augment": PLAIN_RECIPE["augment"],
            "train": {
                "accelerator": "cpu",
                "max_epochs": EPOCHS,
                "patience": EPOCHS,
                **PLAIN_RECIPE["train"],
            },
        }
    )
    n_train = len(data.dataset("train")) // params.train.batch_size * params.train.batch_size
    ours, baseline = [], []
    for _ in range(2):  # interleaved, so a noisy neighbour hits both loops alike
        baseline.append(plain_loop(params, data))
        clock = EpochClock()
        fit(params, data, callbacks=[clock])
        ours.append(n_train * (EPOCHS - 1) / (clock.end - clock.start))
    ours_s, theirs_s = max(ours), max(baseline)
    emit(
        "train_step",
        arch=params.model.arch,
        image_size=SIZE,
        batch_size=params.train.batch_size,
        epochs_timed=EPOCHS - 1,
        channels_last=params.train.channels_last,
        lightning_img_s=round(ours_s, 1),
        torch_img_s=round(theirs_s, 1),
        ratio=round(ours_s / theirs_s, 3),
        threads=torch.get_num_threads(),
    )
    return ours_s


def _train_once(prepared_dir: str, queue) -> None:
    """In a fresh process: one epoch of ``fit`` at the demo's params.yaml settings; reports peak memory."""
    params = config.load()
    params = config.with_overrides(params, {"model.weights": "none", "train.max_epochs": 1})
    prepared = load_prepared(Path(prepared_dir))
    pipeline = augment.build(params.augment.transforms, seed=0, preset=params.augment.preset)
    fit(params, datamodule(params, prepared, pipeline))
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    queue.put((peak_rss_mb(), gpu))


def bench_train_memory(prepared_dir: Path) -> None:
    """Peak memory of a training run at the demo's settings (params.yaml), in a process of its own."""
    params = config.load()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_train_once, args=(str(prepared_dir), queue))
    child.start()
    rss, gpu = queue.get()
    child.join()
    emit(
        "train_memory",
        arch=params.model.arch,
        image_size=int(load_prepared(prepared_dir).images.shape[1]),  # data.image_size may be auto
        batch_size=params.train.batch_size,
        peak_rss_mb=rss,
        peak_gpu_mb=None if gpu is None else round(gpu, 1),
    )


def bench_dataloader(data, train_img_s: float) -> None:
    """Images/s the training DataLoader delivers (cache + augmentation + collation) against what training consumes."""
    seen, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
        for x, _ in data.train_dataloader():
            seen += len(x)
    img_s = seen / (time.perf_counter() - start)
    emit(
        "dataloader",
        workers=data.num_workers,
        img_s=round(img_s, 1),
        train_img_s=round(train_img_s, 1),
        ratio=round(img_s / train_img_s, 1),
    )


def bench_tune_pruning(tmp: Path) -> None:
    """The same study with the median pruner and without it. The two grow by TUNE_ROUND trials in
    turn (the tune stage resumes a study), so a noisy neighbour slows both alike; time is the summed
    wall time of their trials, and epochs the epochs those trials trained."""
    import contextlib

    from pipeline import tracking, tune

    raw, out = tmp / "tune-raw", tmp / "tune-prepared"
    demo.generate(raw, TUNE_PER_CLASS, TUNE_SIZE, seed=0)
    ingest(raw, out, image_size=TUNE_SIZE, val_fraction=0.25, test_fraction=0.15, seed=0, on_bad_file="skip")
    prepared = load_prepared(out)
    pipeline = augment.build(AUGMENT.transforms, seed=0, preset=AUGMENT.preset)
    store = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_root": str(tmp / "mlartifacts")}
    tracking.setup(config.Tracking(**store))
    studies = {}
    for n_trials in range(TUNE_ROUND, TUNE_TRIALS + 1, TUNE_ROUND):
        for pruner in ("median", "none"):
            params = config.parse(
                {
                    "data": {"image_size": TUNE_SIZE},
                    "model": {"weights": "none"},
                    "train": {"accelerator": "cpu", "batch_size": 16, "patience": TUNE_EPOCHS},
                    "tune": {
                        "n_trials": n_trials,
                        "max_epochs": TUNE_EPOCHS,
                        "pruner": pruner,
                        "storage": f"sqlite:///{tmp}/optuna.db",
                        "search_space": TUNE_SPACE,
                    },
                    "mlflow": store,
                }
            )
            with contextlib.redirect_stdout(sys.stderr):  # per-epoch lines; stdout is for the JSON lines
                studies[pruner], _ = tune.run(params, lambda p: datamodule(p, prepared, pipeline), pruner, {})
    seconds = {
        k: sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in s.trials
            if t.datetime_complete and t.datetime_start  # every trial of a finished study has both
        )
        for k, s in studies.items()
    }
    epochs = {k: sum(len(t.intermediate_values) for t in s.trials) for k, s in studies.items()}
    emit(
        "tune_pruning",
        trials=TUNE_TRIALS,
        max_epochs=TUNE_EPOCHS,
        image_size=TUNE_SIZE,
        monitor="val/loss",
        wall_s_pruned=round(seconds["median"], 1),
        wall_s_unpruned=round(seconds["none"], 1),
        speedup=round(seconds["none"] / seconds["median"], 2),
        epochs_pruned=epochs["median"],
        epochs_unpruned=epochs["none"],
        best_pruned=round(studies["median"].best_value, 4),
        best_unpruned=round(studies["none"].best_value, 4),
        pruned_trials=sum(t.state.name == "PRUNED" for t in studies["median"].trials),
    )


def main(params: config.Params, args: argparse.Namespace) -> None:
    """The speed bench (params play no part: it measures the defaults)."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        demo.generate(raw, N_PER_CLASS, SIZE, seed=0)
        bench_ingest(raw, out)
        prepared = load_prepared(out)
        pipeline = augment.build(AUGMENT.transforms, seed=0, preset=AUGMENT.preset)
        bench_loader(prepared, pipeline)
        bench_augment(prepared)
        data = datamodule(config.parse({}), prepared, pipeline)
        bench_dataloader(data, bench_train_step(data))
        bench_tune_pruning(Path(tmp))
        bench_train_memory(out)
