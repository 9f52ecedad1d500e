"""``make bench``: speed and memory of the pipeline's hot paths, one JSON object per line.

Measured on a generated demo set in a temporary folder, so it needs no prior ``dvc repro``:
- ``ingest``: decode + resize + cache throughput;
- ``loader``: augmented training batches per second from the cache, against decoding the PNGs
  in every epoch (what the cache saves);
- ``augment``: per preset, augmented images/s in one thread (what one loader worker gets) with
  albumentations against the equivalent ``torchvision.transforms.v2`` pipeline on the same images;
- ``train_step``: Lightning ``fit`` images/s against a plain PyTorch loop over the same data, model
  and optimizer (the ratio is the pipeline's overhead, target >= 0.95), plus peak resident memory;
- ``dataloader``: images/s the training loader delivers against what training consumes (target
  ratio >= 3: the model, not the data, is the bottleneck).
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from pipeline import augment, config, demo
from pipeline.data.datamodule import CachedImageDataset
from pipeline.data.ingest import decode, ingest, load_prepared
from pipeline.fit import datamodule, fit
from pipeline.model import Classifier

N_PER_CLASS, SIZE, EPOCHS = 48, 64, 2
AUGMENT = config.parse({}).augment
AUGMENT_SECONDS = 1.5  # per library and preset


def emit(name: str, **values) -> None:
    print(json.dumps({"bench": name, **values}), flush=True)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def bench_ingest(raw: Path, out: Path) -> None:
    start = time.perf_counter()
    report = ingest(raw, out, image_size=SIZE, val_fraction=0.15, test_fraction=0.15, seed=0, on_bad_file="skip")
    seconds = time.perf_counter() - start
    emit("ingest", images=report["n_images"], seconds=round(seconds, 2), images_per_s=round(report["n_images"] / seconds, 1))


def bench_loader(raw: Path, prepared, pipeline) -> None:
    rows = prepared.split("train")
    dataset = CachedImageDataset(prepared.images[rows["cache_index"].to_numpy()], rows["label_index"].to_numpy(), pipeline)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    cached = len(dataset) / (time.perf_counter() - start)
    paths = [Path(p) for p in rows["path"]]
    start = time.perf_counter()
    for p in paths:
        pipeline(image=decode(p, SIZE))
    decoded = len(paths) / (time.perf_counter() - start)
    emit("loader", workers=0, cached_images_per_s=round(cached, 1), decode_each_epoch_images_per_s=round(decoded, 1),
         speedup=round(cached / decoded, 2))


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
    return v2.Compose({
        "medical": [
            v2.RandomApply([v2.RandomAffine(10, translate=(0.05, 0.05), scale=(0.9, 1.1), interpolation=bilinear)], p=0.5),
            v2.RandomApply([v2.ElasticTransform(alpha=15.0, sigma=6.0)], p=0.25),
            v2.RandomApply([v2.ColorJitter(brightness=0.1, contrast=0.1)], p=0.5),
            v2.RandomApply([v2.Lambda(_random_gamma)], p=0.3),
        ],
        "satellite": [v2.RandomHorizontalFlip(), v2.Lambda(_random_rot90), v2.RandomApply([v2.Lambda(_band_gain)], p=0.5)],
        "natural": [
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomAffine(15, translate=(0.1, 0.1), scale=(0.8, 1.2), interpolation=bilinear)], p=0.7),
            v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),
        ],
    }[preset])


def _images_per_s(apply, images) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < AUGMENT_SECONDS:
        for image in images:
            apply(image)
        done += len(images)
    return done / (time.perf_counter() - start)


def bench_augment(prepared) -> None:
    images = np.ascontiguousarray(prepared.images[prepared.split("train")["cache_index"].to_numpy()])
    tensors = [torch.from_numpy(image.transpose(2, 0, 1).copy()) for image in images]  # v2's own layout, not timed
    threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # one loader worker: a single thread for both libraries
    cv2.setNumThreads(1)
    try:
        for preset in ("medical", "satellite", "natural"):
            albumentations = augment.build([], seed=0, preset=preset)
            torchvision = torchvision_equivalent(preset)
            ours = _images_per_s(lambda image: albumentations(image=image), images)
            theirs = _images_per_s(torchvision, tensors)
            emit("augment", preset=preset, image_size=SIZE, threads=1, albumentations_img_s=round(ours, 1),
                 torchvision_v2_img_s=round(theirs, 1), ratio=round(ours / theirs, 2))
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


def plain_loop(params: config.Params, data) -> float:
    """The baseline: the same network, optimizer and batches, in a bare PyTorch loop; images/s."""
    torch.manual_seed(params.seed)
    model = Classifier(params.model.arch, data.num_classes, lr=params.train.lr)
    opt = torch.optim.AdamW(model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay)
    train, val = data.train_dataloader(), data.val_dataloader()
    seen, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
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
    params = config.parse({"model": {"weights": "none"}, "train": {"accelerator": "cpu", "max_epochs": EPOCHS,
                                                                   "patience": EPOCHS}})
    baseline = plain_loop(params, data)
    n_train = len(data.dataset("train")) // params.train.batch_size * params.train.batch_size
    start = time.perf_counter()
    fit(params, data)
    ours = n_train * EPOCHS / (time.perf_counter() - start)
    emit("train_step", arch=params.model.arch, image_size=SIZE, epochs=EPOCHS, lightning_img_s=round(ours, 1),
         torch_img_s=round(baseline, 1), ratio=round(ours / baseline, 3), peak_rss_mb=peak_rss_mb(),
         threads=torch.get_num_threads())
    return ours


def bench_dataloader(data, train_img_s: float) -> None:
    """Images/s the training DataLoader delivers (cache + augmentation + collation) against what training consumes."""
    seen, start = 0, time.perf_counter()
    for _ in range(EPOCHS):
        for x, _ in data.train_dataloader():
            seen += len(x)
    img_s = seen / (time.perf_counter() - start)
    emit("dataloader", workers=data.num_workers, img_s=round(img_s, 1), train_img_s=round(train_img_s, 1),
         ratio=round(img_s / train_img_s, 1))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        demo.generate(raw, N_PER_CLASS, SIZE, seed=0)
        bench_ingest(raw, out)
        prepared = load_prepared(out)
        pipeline = augment.build(AUGMENT.transforms, seed=0, preset=AUGMENT.preset)
        bench_loader(raw, prepared, pipeline)
        bench_augment(prepared)
        data = datamodule(config.parse({}), prepared, pipeline)
        bench_dataloader(data, bench_train_step(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
