"""``python -m pipeline bench unlabelled``: does self-supervised pretraining on unlabelled tiles learn features?

EuroSAT RGB (``../shared/data``), bench quality's draw: ``--per-class`` labelled tiles per class (a fifth of
them val), 200 per class for test, and ``--pool`` of the remaining tiles as the unlabelled pool (their labels
are never read). Each row is the kNN accuracy (k=20, cosine, the pretrain stage's monitor) of the frozen
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

from benchmarks.quality import EUROSAT, eurosat_draw
from pipeline import augment, config
from pipeline.config import Params
from pipeline.training.pretraining import pretrain
from pipeline.training.resume import Resume
from pipeline.training.selfsup import SelfSupervised, knn_accuracy


def emit(**values) -> None:
    print(json.dumps({"bench": "unlabelled", **values}), flush=True)


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
    """``params`` play no part: the rows use their own (random init, 64 px, the satellite preset)."""
    data = load(args.per_class, args.pool, args.draw)
    images = np.concatenate([data["train"][0], data["pool"][0]])
    unit = images.reshape(-1, 3).astype(np.float64) / 255
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
    start = SelfSupervised("resnet18", args.method, mean=mean, std=std)
    common = {"per_class": args.per_class, "pool": args.pool, "seed": args.seed, "draw": args.draw}
    scored("random init", knn_accuracy(start, *bank, *test), len(test[1]), **common)
    transform = augment.build([], seed=args.seed, preset="satellite")
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
