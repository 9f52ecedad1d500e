"""``python -m pipeline bench unlabelled``: does self-supervised pretraining on unlabelled tiles learn features?

``--set eurosat`` (the default): EuroSAT RGB (``../shared/data``), bench quality's draw: ``--per-class``
labelled tiles per class (a fifth of them val), 200 per class for test, and ``--pool`` of the remaining tiles as
the unlabelled pool (their labels are never read), 64 px, the satellite preset's views. ``--set pneumonia``:
PneumoniaMNIST as bench quality's ``--fraction`` rows see it (the same labelled share of its train split, its
published val and test splits, ingested at ``--size`` by the product's ingest; the rest of the train split as
the pool, through the pool stage's ``prepare_pool``, the first ``--pool`` of it or all with ``--pool 0``), the
medical preset's views (no flips). Each row is the kNN accuracy (k=20, cosine, the pretrain stage's monitor) of the frozen
features on the test tiles, the labelled train tiles as neighbours, with a Wilson 95% interval: before
pretraining (the random init it starts from) and after ``--epochs`` of ``--method`` on the pool and the train
split (``pipeline.training.pretraining.pretrain``, the pretrain stage's work). One JSON line per row. Minutes
to hours on a CPU: outside ``make bench`` and ``make test``.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.stats import binomtest

from benchmarks.quality import DATA, EUROSAT, base_params, eurosat_draw, ingested, pooled, write_pngs
from pipeline import augment, config
from pipeline.config import Params
from pipeline.training.pretraining import pretrain
from pipeline.training.resume import Resume
from pipeline.training.selfsup import SelfSupervised, knn_accuracy


def emit(**values) -> None:
    print(json.dumps({"bench": "unlabelled", **values}), flush=True)


def load_pneumonia(
    fraction: float, size: int, pool: int, scratch: Path
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pixels N x size x size x 1 uint8, label indices) per split, as bench quality's ``--fraction`` rows
    ingest them: train (``fraction`` of the train split, draw 0), val, test, and pool (the rest of the train
    split after the pool stage's exclusions, the first ``pool`` of it or all with 0; labels -1, never read)."""
    raw = write_pngs(DATA, scratch / "raw", fraction, pool=scratch / "unlabelled")
    data = base_params(size, 1, 0).data
    prepared = ingested(raw, scratch, data)
    pool_images, _ = pooled(scratch / "unlabelled", scratch, data)
    pool_images = np.array(pool_images[:pool] if pool else pool_images)  # a copy: the scratch goes
    out = {
        s: (
            np.asarray(prepared.images[prepared.split(s)["cache_index"].to_numpy()]),
            prepared.split(s)["label_index"].to_numpy(),
        )
        for s in ("train", "val", "test")
    }
    return out | {"pool": (pool_images, np.full(len(pool_images), -1))}


def load(per_class: int, pool: int, draw: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(pixels N x 64 x 64 x 3 uint8, label indices) per split: train, val, test, pool (``pool`` at random)."""
    out: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test", "pool")}
    classes: dict[str, int] = {}
    with tarfile.open(EUROSAT) as archive:
        # ``pool`` tiles at random (before 2026-12-07 the first ones: one or two classes, see docs/benchmarks.md)
        for member, cls, split in eurosat_draw(archive, per_class, draw, pool=True, pool_size=pool):
            stream = archive.extractfile(member)
            assert stream is not None, member.name
            out[split][0].append(np.asarray(Image.open(io.BytesIO(stream.read())).convert("RGB")))
            out[split][1].append(classes.setdefault(cls, len(classes)))
    return {s: (np.stack(x), np.asarray(y)) for s, (x, y) in out.items()}


def scored(row: str, correct: float, n: int, **extra) -> None:
    hits = round(correct * n)
    ci = binomtest(hits, n).proportion_ci(method="wilson")
    emit(
        row=row,
        knn_test_accuracy=round(correct, 4),
        ci95=[round(ci.low, 4), round(ci.high, 4)],
        n_test=n,
        **extra,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", choices=["eurosat", "pneumonia"], default="eurosat", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.1,
        help="pneumonia: labelled share of the train split (default: %(default)s)",
    )
    parser.add_argument(
        "--size", type=int, default=64, help="pneumonia: data.image_size (default: %(default)s)"
    )
    parser.add_argument(
        "--per-class", type=int, default=50, help="labelled tiles per class (default: %(default)s)"
    )
    parser.add_argument("--pool", type=int, default=2000, help="unlabelled tiles (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="pretraining epochs (default: %(default)s)")
    parser.add_argument(
        "--method", choices=["simclr", "byol"], default="simclr", help="(default: %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--draw", type=int, default=0, help="which labelled/test draw (default: %(default)s)")
    parser.add_argument(
        "--save",
        type=Path,
        metavar="CKPT",
        help="also save the pretrained backbone there: bench quality --extra model.weights=CKPT fine-tunes from it",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    """``params`` play no part: the rows use their own (random init, the set's size and preset)."""
    if args.set == "eurosat":
        data = load(args.per_class, args.pool, args.draw)
    else:  # ingested and pooled in a scratch folder, as bench quality's rows are
        with tempfile.TemporaryDirectory(prefix="bench-unlabelled-data-") as scratch:
            data = load_pneumonia(args.fraction, args.size, args.pool, Path(scratch))
    images = np.concatenate([data["train"][0], data["pool"][0]])
    bands = images.shape[-1]
    unit = images.reshape(-1, bands).astype(np.float64) / 255
    mean, std = unit.mean(0).tolist(), unit.std(0).tolist()
    settings = config.parse(
        {
            "seed": args.seed,
            "model": {"weights": "none"},
            "train": {"accelerator": "cpu", "num_workers": 0},
            "pretrain": {
                "method": args.method,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "knn_every": max(1, args.epochs // 5),
            },
        }
    )
    bank = (
        torch.from_numpy(data["train"][0].transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(data["train"][1]),
    )
    test = (torch.from_numpy(data["test"][0].transpose(0, 3, 1, 2).copy()), torch.from_numpy(data["test"][1]))
    torch.manual_seed(args.seed)
    start = SelfSupervised("resnet18", args.method, mean=mean, std=std, in_channels=bands)
    labelled = (
        {"per_class": args.per_class}
        if args.set == "eurosat"
        else {"fraction": args.fraction, "size": args.size}
    )
    common = {"set": args.set, **labelled, "pool": len(data["pool"][0]), "seed": args.seed, "draw": args.draw}
    scored("random init", knn_accuracy(start, *bank, *test), len(test[1]), **common)
    transform = augment.build([], seed=args.seed, preset="satellite" if args.set == "eurosat" else "medical")
    with tempfile.TemporaryDirectory(prefix="bench-unlabelled-") as scratch:
        began = time.perf_counter()
        model, record = pretrain(
            settings,
            images,
            data["train"],
            data["val"],
            transform,
            mean,
            std,
            Resume(Path(scratch) / "resume", "bench"),
        )
        seconds = time.perf_counter() - began
    if args.save is not None:
        model.save_backbone(args.save)
    scored(
        f"{args.method} {record.epochs} epochs",
        knn_accuracy(model, *bank, *test),
        len(test[1]),
        **common,
        images_per_epoch=record.images,
        final_loss=round(record.final_loss or float("nan"), 4),
        val_knn_accuracy=record.knn_accuracy,
        seconds=round(seconds, 1),
        threads=torch.get_num_threads(),
    )
