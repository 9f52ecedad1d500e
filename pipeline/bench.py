"""``make bench``: speed and memory of the pipeline's hot paths, one JSON object per line.

Measured on a generated demo set in a temporary folder, so it needs no prior ``dvc repro``:
- ``ingest``: decode + resize + cache throughput;
- ``loader``: augmented training batches per second from the cache, against decoding the PNGs
  in every epoch (what the cache saves);
- ``fit``: Lightning ``fit`` images/s against a plain PyTorch loop over the same data, model and
  optimizer (the ratio is the pipeline's overhead), plus peak resident memory.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from pipeline import augment, config, demo
from pipeline.data.datamodule import CachedImageDataset
from pipeline.data.ingest import decode, ingest, load_prepared
from pipeline.fit import datamodule, fit
from pipeline.model import Classifier

N_PER_CLASS, SIZE, EPOCHS = 48, 64, 2
TRANSFORMS = config.parse({}).augment.transforms


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


def bench_fit(prepared, pipeline) -> None:
    params = config.parse({"model": {"weights": "none"}, "train": {"accelerator": "cpu", "max_epochs": EPOCHS,
                                                                   "patience": EPOCHS}})
    data = datamodule(params, prepared, pipeline)
    baseline = plain_loop(params, data)
    n_train = len(data.dataset("train")) // params.train.batch_size * params.train.batch_size
    start = time.perf_counter()
    fit(params, data)
    ours = n_train * EPOCHS / (time.perf_counter() - start)
    emit("fit", arch=params.model.arch, image_size=SIZE, epochs=EPOCHS, pipeline_images_per_s=round(ours, 1),
         plain_pytorch_images_per_s=round(baseline, 1), ratio=round(ours / baseline, 3),
         peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "prepared"
        demo.generate(raw, N_PER_CLASS, SIZE, seed=0)
        bench_ingest(raw, out)
        prepared = load_prepared(out)
        pipeline = augment.build(TRANSFORMS, seed=0)
        bench_loader(raw, prepared, pipeline)
        bench_fit(prepared, pipeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
