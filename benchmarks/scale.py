"""``python -m pipeline bench scale``: the pipeline on a real-sized set, as a user runs it, at several sizes.

Not part of ``make bench`` or ``make test`` (minutes; needs the EuroSAT RGB tar of ../shared/data). For
each size (a class-proportional subset of the 27,000 tiles, hard-linked from the extracted set), in a
fresh ``git clone`` of this repository's committed HEAD (so no dvc.lock or report of the checkout is
touched), it times the commands a user runs, each in a process of its own, and prints one JSON line per
step with its wall seconds, peak resident memory (the largest process of the command, stages included:
``wait4``) and the 1-minute load average when it started:

- ``intake`` (copy, one decoding pass, tar shards from 2,000 images on unless ``--layout`` says otherwise,
  ``dvc add``), then ``dvc repro ingest`` (takes intake's decodes) and
  ``dvc repro augment``; a no-op ``dvc repro augment`` and ``dvc status``;
- DVC with many small files: ``dvc add`` of the set as intake stored it (its files, or its shards) in a fresh
  repository (empty cache), ``dvc push`` of it to a local remote and ``dvc pull`` into a fresh clone;
- ``near duplicates`` (first, in this process): ingest's duplicate step on the 27,000 tiles' hashes, on 10,000
  copies of one tile and on 3,000 near-identical frames (``--duplicates-only``: these rows alone);
- ``dataloader`` (largest size): training batches per second from the memory-mapped cache with
  ``train.num_workers`` 2 and the satellite preset, against a ResNet-18 training step's images per second
  (batch 32, 64 px, same threads): ``ratio`` >= 3 means the loader stays ahead of the model;
- with ``--full`` (largest size): the rest of the pipeline (tune off, a one-epoch linear probe, evaluate
  without TTA, bootstrap or panels: the point is the stages' memory and DVC's bookkeeping, not accuracy),
  then a no-op ``dvc repro`` of the whole pipeline. The linear probe's features cost one ResNet-18 forward
  pass per image: more than 15 minutes at 27,000 images on two loaded cores;
- with ``--whole-noop`` instead: the same settings, train and evaluate run for real at the *smallest* size
  only; at the largest, tune runs and the train and evaluate stages' outputs are the smallest size's, recorded
  by ``dvc commit`` (what DVC stores had the stages run), then the no-op ``dvc repro`` of the whole pipeline
  (twice) and ``dvc repro -v``'s own account of it. A no-op checks each stage's dependencies (the shards, the
  prepared cache, the code, the params) and outputs (the same files, of about the same size, whatever the
  model learned), so its time is the one the trained outputs would give; the models are not the 27,000 images'.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from benchmarks import REPO, SHARED_DATA
from pipeline.config import Params
from pipeline.errors import PipelineError

TAR = SHARED_DATA / "eurosat_rgb.tar"


def emit(**values) -> None:
    print(json.dumps({"bench": "scale", **values}), flush=True)


def run(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) of the largest process of ``cmd`` (GNU time's %M, as a user measures it)
    and the load average at its start."""
    load = os.getloadavg()[0]
    rss = log.with_suffix(".rss")
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        done = subprocess.run(
            ["/usr/bin/time", "-o", str(rss), "-f", "%M", *cmd], cwd=cwd, env=env, stdout=out, stderr=out
        )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    return round(seconds, 2), round(int(rss.read_text().split()[-1]) / 1024, 1), round(load, 2)


def subset(source: Path, n: int, dest: Path) -> Path:
    """``n`` images in the set's class proportions (the first of each class, sorted), hard-linked to ``dest``."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    files = {c: sorted(c.iterdir()) for c in classes}
    total = sum(len(f) for f in files.values())
    if dest.exists():
        shutil.rmtree(dest)
    for c in classes:
        (dest / c.name).mkdir(parents=True)
        for f in files[c][: round(n * len(files[c]) / total)]:
            os.link(f, dest / c.name / f.name)
    return dest


def step(name: str, n: int, cmd: list[str], cwd: Path, env: dict, log: Path) -> dict:
    seconds, rss, load = run(cmd, cwd, env, log)
    emit(images=n, step=name, seconds=seconds, peak_rss_mb=rss, load=load)
    return {"seconds": seconds, "peak_rss_mb": rss}


def clone(src: Path, dest: Path, remote: Path, env: dict, log: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run(["git", "clone", "-q", str(src), str(dest)], check=True)
    subprocess.run(["dvc", "remote", "add", "-d", "-f", "bench", str(remote)], cwd=dest, env=env, check=True)


# The --full / --whole-noop settings of the stages after augment: tune off, a one-epoch linear probe over
# random-init features, evaluate without TTA, bootstrap or panels, no model registry.
CHEAP = {
    "tune.enabled": False,
    "model.weights": "none",
    "train.mode": "linear_probe",
    "train.max_epochs": 1,
    "train.freeze_epochs": 0,
    "train.num_workers": 2,
    "evaluate.tta": [],
    "evaluate.bootstrap": 0,
    "evaluate.gradcam_per_class": 0,
    "evaluate.label_audit_panel": 0,
    "mlflow.registered_model": None,
}
# What train and evaluate write (params.yaml's paths): copied from the smallest size's run for --whole-noop.
TRAINED = (
    "model_dir",
    "plots",
    "report",
    "metrics_detail",
    "decision",
    "label_audit",
    "metrics",
    "confusion",
)


def measure(
    n: int,
    source: Path,
    work: Path,
    full: bool,
    loader: bool,
    layout: str = "auto",
    whole_noop: str = "",
    image_size: int | None = None,
) -> None:
    """``whole_noop``: "run" (train and evaluate here, for a larger size to reuse), "record" (commit the smallest
    size's outputs here, then time the no-op) or "". ``image_size``: ``data.image_size`` in the clone's
    params.yaml (None: the committed value, which resolves to the tiles' own 64 px without weights)."""
    from pipeline.paramsfile import set_values

    py = sys.executable
    src = subset(source, n, work / f"src-{n}")
    repo, remote, log = work / f"repo-{n}", work / f"remote-{n}", work / f"log-{n}.txt"
    log.unlink(missing_ok=True)
    shutil.rmtree(remote, ignore_errors=True)
    env = os.environ | {"PYTHONPATH": str(repo), "PATH": f"{Path(py).parent}:{os.environ['PATH']}"}
    clone(REPO, repo, remote, env, log)
    env["PYTHONPATH"] = str(repo)
    if image_size is not None:
        set_values(repo / "params.yaml", {"data.image_size": image_size})
    step("intake", n, [py, "-m", "pipeline", "intake", str(src), "--name", "scale", "--domain", "satellite",
                       "--layout", layout], repo, env, log)  # fmt: skip
    raw = repo / "data" / "raw" / "scale"
    sharded = (raw / "shards.csv").is_file()
    emit(
        images=n,
        step="layout",
        layout="shards" if sharded else "folder",
        dvc_files=_count(raw, sharded),
        image_size=image_size or "params.yaml",
    )
    tracked = "data/raw/scale/shards.dvc" if sharded else "data/raw/scale.dvc"
    step("dvc repro ingest", n, ["dvc", "repro", "ingest"], repo, env, log)
    step("dvc repro augment", n, ["dvc", "repro", "augment"], repo, env, log)
    step("no-op dvc repro augment", n, ["dvc", "repro", "augment"], repo, env, log)
    step("dvc status", n, ["dvc", "status"], repo, env, log)

    fresh = work / f"add-{n}"
    shutil.rmtree(fresh, ignore_errors=True)
    (fresh / "data").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=fresh, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=fresh, env=env, check=True)
    shutil.copytree(raw / "shards" if sharded else src, fresh / "data" / "set", copy_function=os.link)
    step("dvc add (empty cache)", n, ["dvc", "add", "data/set"], fresh, env, log)

    step("dvc push", n, ["dvc", "push", "-r", "bench", tracked], repo, env, log)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
        cwd=repo,
        check=True,
    )
    pulled = work / f"pulled-{n}"
    clone(repo, pulled, remote, env, log)
    step("dvc pull (fresh clone)", n, ["dvc", "pull", "-r", "bench", tracked], pulled, env, log)
    shutil.rmtree(pulled)

    if loader:
        code = f"from benchmarks.scale import dataloader_ratio; dataloader_ratio({str(repo)!r})"
        done = subprocess.run([py, "-c", code], cwd=repo, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr)
        print(done.stdout.strip(), flush=True)
    if full or whole_noop:
        set_values(repo / "params.yaml", CHEAP)
        step("dvc repro tune", n, ["dvc", "repro", "tune"], repo, env, log)
        if full or whole_noop == "run":
            for stage in ("train", "evaluate"):
                step(f"dvc repro {stage}", n, ["dvc", "repro", stage], repo, env, log)
        else:
            record_trained(work / f"repo-{whole_noop}", repo, env, log)
        if full or whole_noop != "run":
            step("dvc repro (what is left: the demo stage)", n, ["dvc", "repro"], repo, env, log)
            step("no-op dvc repro (whole pipeline)", n, ["dvc", "repro"], repo, env, log)
            step("no-op dvc repro (again)", n, ["dvc", "repro"], repo, env, log)
            noop_account(n, repo, env, log)


def record_trained(smaller: Path, repo: Path, env: dict, log: Path) -> None:
    """The train and evaluate stages' outputs copied from ``smaller``'s run into ``repo`` and committed there
    (``dvc commit``: dvc.lock records this repository's dependencies and those outputs, as a run would)."""
    from pipeline.config import load

    paths = load(repo / "params.yaml").paths
    for name in TRAINED:
        out = Path(getattr(paths, name))
        if (smaller / out).is_dir():
            shutil.rmtree(repo / out, ignore_errors=True)
            shutil.copytree(smaller / out, repo / out)
        else:
            (repo / out).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(smaller / out, repo / out)
    with open(log, "ab") as out_log:
        subprocess.run(
            ["dvc", "commit", "-f", "train", "evaluate"],
            cwd=repo,
            env=env,
            stdout=out_log,
            stderr=out_log,
            check=True,
        )


def noop_account(n: int, repo: Path, env: dict, log: Path) -> None:
    """Where a no-op ``dvc repro`` spends its time: DVC's start-up (``dvc --version``: import and CLI) against the
    whole command, and ``dvc repro -v``'s first and last log lines' times."""
    step("dvc --version (start-up floor)", n, ["dvc", "--version"], repo, env, log)
    start = time.perf_counter()
    done = subprocess.run(["dvc", "repro", "-v"], cwd=repo, env=env, capture_output=True, text=True)
    with open(log, "a") as out:
        out.write(done.stdout + done.stderr)
    emit(
        images=n, step="no-op dvc repro -v", seconds=round(time.perf_counter() - start, 2), rc=done.returncode
    )


def _count(raw: Path, sharded: bool) -> int:
    """Files DVC tracks for the set: its shards, or every file of the folder."""
    return sum(1 for p in (raw / "shards" if sharded else raw).rglob("*") if p.is_file())


def dataloader_ratio(repo: str, batches: int = 150, steps: int = 8) -> None:
    """Loader images/s (workers 2) over a ResNet-18 training step's, on the prepared set in ``repo``."""
    import torch
    import torchvision

    from pipeline import augment
    from pipeline.data.datamodule import ImageDataModule
    from pipeline.data.prepared import load_prepared

    prepared = load_prepared(Path(repo) / "data" / "prepared")
    pipeline = augment.build([], seed=0, preset="satellite")
    data = ImageDataModule(prepared, pipeline, batch_size=32, num_workers=2)
    train = data.train_dataloader()
    batches = min(batches, len(train) - 1)  # a 1,000-image set has ~22 batches of 32 in its train split
    loader = iter(train)
    next(loader)  # workers started
    start = time.perf_counter()
    seen = sum(len(next(loader)[0]) for _ in range(batches))
    loader_img_s = seen / (time.perf_counter() - start)
    model = torchvision.models.resnet18(num_classes=len(prepared.classes))
    optimizer = torch.optim.AdamW(model.parameters())
    side = prepared.images.shape[1]  # the cache's size: 64 px, or data.image_size when --image-size set it
    x, y = torch.rand(32, 3, side, side), torch.randint(0, len(prepared.classes), (32,))
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps
            start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    train_img_s = steps * 32 / (time.perf_counter() - start)
    emit(
        images=len(prepared.table),
        step="dataloader",
        image_size=side,
        workers=2,
        loader_img_s=round(loader_img_s, 1),
        train_img_s=round(train_img_s, 1),
        ratio=round(loader_img_s / train_img_s, 1),
        threads=torch.get_num_threads(),
        load=round(os.getloadavg()[0], 2),
    )


def near_duplicates(source: Path) -> None:
    """Ingest's duplicate step (exact sets, near sets, the split units) on the 27,000 real tiles' hashes, on 10,000
    copies of one tile and on 3,000 near-identical frames of it (a video, consecutive slices, blank tiles: each
    a few pixel values off): seconds and peak traced memory. Collecting pairs made the last two quadratic:
    8,000 copies of one file took 21 GB, 3,000 frames 493 s and 4.1 GB."""
    import tracemalloc

    import numpy as np
    import pandas as pd
    from PIL import Image

    from pipeline.config import Data
    from pipeline.data import ingest, validation

    files = sorted(p for p in source.rglob("*.jpg"))
    tiles = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    rng = np.random.default_rng(0)
    frames = [
        np.clip(tiles[0].astype(int) + rng.integers(-2, 3, tiles[0].shape), 0, 255) for _ in range(3000)
    ]
    cases = {
        "distinct tiles": (tiles, [f.name for f in files]),
        "identical copies": ([tiles[0]] * 10_000, ["same"] * 10_000),
        "near-identical frames": (frames, [str(i) for i in range(3000)]),
    }
    bits = Data().near_duplicate_bits
    for name, (images, sha) in cases.items():
        table = pd.DataFrame({"path": [f"{i}.jpg" for i in range(len(images))], "label": "a", "sha256": sha})
        hashes = [validation.dhash(np.asarray(x, dtype=np.uint8)) for x in images]
        tracemalloc.start()
        start = time.perf_counter()
        exact, near = ingest._duplicates(table, hashes, bits, [])
        ingest._units(table, exact, near)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        emit(
            images=len(images),
            step=f"near duplicates: {name}",
            seconds=round(seconds, 2),
            peak_traced_mb=round(peak / 2**20, 1),
            exact_sets=len(exact),
            near_sets=len(near),
            largest_set=max(map(len, exact + near), default=1),
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tar", type=Path, default=TAR, help="the EuroSAT RGB tar")
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"), help="scratch folder")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 9000, 27000])
    parser.add_argument("--full", action="store_true", help="largest size: train, evaluate, no-op dvc repro")
    parser.add_argument(
        "--whole-noop",
        action="store_true",
        help="no-op dvc repro of the whole pipeline at the largest size, train and evaluate run at the smallest "
        "only (their outputs committed at the largest: see above)",
    )
    parser.add_argument(
        "--duplicates-only", action="store_true", help="only the near-duplicate rows (seconds, no clones)"
    )
    parser.add_argument(
        "--image-size",
        type=int,
        help="data.image_size for every size's clone (default: params.yaml's, 64 px on these tiles)",
    )
    parser.add_argument(
        "--layout",
        choices=["auto", "folder", "shards"],
        default="auto",
        help="intake --layout (default: auto)",
    )


def main(params: Params, args: argparse.Namespace) -> None:
    """Every size in turn; ``params`` play no part (each size runs in a fresh clone with its own)."""
    source = args.work / "eurosat"
    if not source.is_dir():
        args.work.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.tar) as tar:
            tar.extractall(source, filter="data")
    if len(list(source.iterdir())) == 1:  # the tar's own top folder
        source = next(source.iterdir())
    near_duplicates(source)
    if args.duplicates_only:
        return
    smallest = min(args.sizes)
    if args.whole_noop and len(set(args.sizes)) < 2:
        raise PipelineError(
            "bench scale --whole-noop needs two --sizes: train and evaluate run at the smaller"
        )
    for n in sorted(args.sizes):
        largest = n == max(args.sizes)
        noop = "" if not args.whole_noop else "run" if n == smallest else str(smallest) if largest else ""
        measure(n, source, args.work, args.full and largest, largest, args.layout, noop, args.image_size)
