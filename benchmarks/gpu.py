"""``python -m pipeline bench gpu``: the pipeline's GPU paths executed and timed, one JSON line per figure.

Without CUDA it prints one line, ``{"skipped": "no CUDA"}``, and exits 0. With a GPU it takes about 8 minutes
(``--skip-demo`` and ``--skip-compile`` shorten it), all in temporary folders:

- ``gpu_device``: the card, torch and CUDA versions (the table in docs/benchmarks.md names the card);
- ``gpu_demo_repro``: the demo's whole ``dvc repro`` in a copy of this checkout with ``train.accelerator: gpu``
  (wall seconds, and whether it succeeded);
- ``gpu_train_step``: ResNet-50 at 224 px, bf16 mixed precision and channels_last, Lightning ``fit`` (the
  pipeline's own) against a bare PyTorch loop over the same batches, model, optimizer and precision: images/s
  each after the first epoch, and their ratio (target >= 0.95); peak GPU memory of each;
- ``gpu_serving``: on the demo run's model, predict, the TorchScript and ONNX exports and the registered MLflow
  model on the GPU against the CPU: the largest probability difference and whether every argmax agrees
  (within ``TOLERANCE``; TF32 convolutions make the GPU's answers differ in the fourth decimal);
- ``gpu_compile`` (unless ``--skip-compile``): the bare loop with ``torch.compile`` against eager, to decide
  whether a ``train.compile`` key would pay.

A figure that fails prints its row with ``error`` instead of stopping the others: the point of the bench is to
execute code that no CPU machine runs. The functions take a ``device``, so the tests run them on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from benchmarks.speed import PLAIN_RECIPE, EpochClock, emit
from pipeline import config, demo
from pipeline.config import Params
from pipeline.data.ingest import ingest
from pipeline.data.prepared import load_prepared
from pipeline.serve import export, predict, shipped
from pipeline.training.fit import datamodule, fit
from pipeline.training.model import Classifier

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 5e-3  # largest probability difference GPU vs CPU (TF32 convolutions, another reduction order)
ARCH, SIZE, BATCH, N_IMAGES, EPOCHS = "resnet50", 224, 128, 2048, 3
DEMO_GPU = {"train": {"accelerator": "gpu"}}


def row(name: str, work: Callable[[], dict]) -> dict:
    """``emit`` the figure ``work`` returns, or its error: one failing path does not hide the others."""
    try:
        values = work()
    except Exception as err:  # reported on the row: the bench goes on
        values = {
            "error": f"{type(err).__name__}: {err}"[:500],
            "where": traceback.format_exc(limit=-3)[-800:],
        }
    emit(name, **values)
    return values


# --- Lightning fit against a bare loop ------------------------------------------------------------------------


def step_params(
    arch: str, device: str, precision: str, channels_last: bool, epochs: int, batch: int
) -> Params:
    """The pipeline's params for the timed fit: random init, no mixing or EMA (the bare loop has neither)."""
    return config.parse(
        {
            "model": {"arch": arch, "weights": "none"},
            "augment": PLAIN_RECIPE["augment"],
            "train": {
                "accelerator": "gpu" if device == "cuda" else device,
                "precision": precision,
                "channels_last": channels_last,
                "max_epochs": epochs,
                "patience": epochs,
                "batch_size": batch,
                "num_workers": min(8, os.cpu_count() or 1) if device == "cuda" else 0,
                "cpu_threads": None,
                **PLAIN_RECIPE["train"],
            },
        }
    )


def bare_loop(params: Params, data, device: str, epochs: int, compile_model: bool = False) -> float:
    """The baseline: the same network, optimizer, precision, memory format and batches in a plain PyTorch loop;
    images/s over the epochs after the first (as ``EpochClock`` times ``fit``)."""
    torch.manual_seed(params.seed)
    t = params.train
    model = Classifier(config.Model(arch=params.model.arch), t, num_classes=data.num_classes).to(device)
    model.on_fit_start()  # the memory format, as Lightning sets it
    net: torch.nn.Module = torch.compile(model) if compile_model else model  # type: ignore[assignment]
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    bf16 = t.precision == "bf16-mixed"
    autocast = lambda: torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    train, val = data.train_dataloader(), data.val_dataloader()
    seen, start = 0, 0.0
    for epoch in range(epochs):
        if epoch == 1:
            _sync(device)
            seen, start = 0, time.perf_counter()
        model.train()
        for x, y in train:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            seen += len(y)
        model.eval()
        with torch.no_grad(), autocast():
            for x, _ in val:
                net(x.to(device, non_blocking=True))
    _sync(device)
    return seen / (time.perf_counter() - start)


def lightning_fit(params: Params, data, device: str) -> float:
    """The pipeline's ``fit`` on the same data: images/s over the epochs after the first."""
    clock = EpochClock()
    fit(params, data, callbacks=[clock])
    n_train = len(data.dataset("train")) // params.train.batch_size * params.train.batch_size
    return n_train * (params.train.max_epochs - 1) / (clock.end - clock.start)


def fit_vs_loop(params: Params, data, device: str) -> dict:
    """Lightning ``fit`` and the bare loop, interleaved twice (the faster of each counts); peak GPU memory."""
    ours, theirs, memory = [], [], dict[str, float]()
    for _ in range(2):
        with _peak_memory(device, memory, "torch_peak_gpu_mb"):
            theirs.append(bare_loop(params, data, device, params.train.max_epochs))
        with _peak_memory(device, memory, "lightning_peak_gpu_mb"):
            ours.append(lightning_fit(params, data, device))
    best_ours, best_theirs = max(ours), max(theirs)
    t = params.train
    return {
        "arch": params.model.arch,
        "image_size": int(data.prepared.images.shape[1]),
        "batch_size": t.batch_size,
        "precision": t.precision,
        "channels_last": t.channels_last,
        "epochs_timed": t.max_epochs - 1,
        "lightning_img_s": round(best_ours, 1),
        "torch_img_s": round(best_theirs, 1),
        "ratio": round(best_ours / best_theirs, 3),
        **memory,
    }


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _peak_memory(device: str, into: dict, key: str) -> Iterator[None]:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield
    if device == "cuda":
        into[key] = round(max(into.get(key, 0.0), torch.cuda.max_memory_allocated() / 2**20), 1)


def synthetic_set(work: Path, n_images: int, size: int, seed: int = 0):
    """The demo's generator at 64 px (4 classes), ingested at ``size``: a cache to time training on."""
    raw = work / "raw"
    if not raw.is_dir():
        demo.generate(raw, max(3, n_images // 4), 64, seed)
    out = work / f"prepared-{size}"
    if not (out / "splits.csv").is_file():
        ingest(
            raw,
            out,
            seed=seed,
            image_size=size,
            val_fraction=0.1,
            test_fraction=0.1,
            near_duplicate_bits=None,
        )
    return load_prepared(out)


# --- the demo's dvc repro and what it ships, on the GPU -------------------------------------------------------


def project_copy(target: Path, overrides: dict[str, dict]) -> Path:
    """This checkout's pipeline, dvc.yaml and params.yaml (``overrides`` merged in) as a fresh git + DVC repo."""
    import yaml

    target.mkdir(parents=True)
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    # as a fresh clone has them (data/unlabelled/.gitignore included: the pool stage depends on that folder)
    names = listed.stdout.split() if listed.returncode == 0 else []
    names = [n for n in names if not n.startswith(("tests/", "notebooks/", "reports/", "dvc.lock"))]
    for name in names or []:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    if not names:  # no git where the bench runs: what dvc repro needs
        shutil.copytree(REPO / "pipeline", target / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(REPO / "dvc.yaml", target / "dvc.yaml")
        for folder in ("data/raw", "data/unlabelled"):
            (target / folder).mkdir(parents=True, exist_ok=True)
            (target / folder / ".gitignore").write_text("")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in overrides.items():
        params[section].update(values)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env()
    for command in ("git init -q", "git add -A", "git commit -qm copy", "dvc init -q -f"):
        subprocess.run(command, shell=True, cwd=target, env=env, check=True, capture_output=True)
    return target


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    names = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "bench"}
    return (
        env | names | {"GIT_COMMITTER_EMAIL": "b@b", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    )


def demo_repro(project: Path, timeout_s: int = 400) -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        ["dvc", "repro"], cwd=project, env=_env(), capture_output=True, text=True, timeout=timeout_s
    )
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro failed after {seconds} s: {(done.stdout + done.stderr)[-400:]}")
    report = json.loads((project / "reports" / "metrics.json").read_text())
    return {"seconds": seconds, "test_accuracy": report.get("test/accuracy")}


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """The largest probability difference and whether it and every argmax are within ``TOLERANCE``."""
    diff = float(np.abs(np.asarray(reference, np.float64) - np.asarray(other, np.float64)).max())
    same = bool((np.asarray(reference).argmax(1) == np.asarray(other).argmax(1)).all())
    return {"max_abs_diff": round(diff, 6), "argmax_equal": same, "agree": same and diff <= TOLERANCE}


def serving(model_dir: Path, images: list[Path], device: str, store: str | None = None) -> dict:
    """The shipped model on ``device`` against the CPU: predict, both exports and (``store``: the MLflow tracking
    URI holding it) the registered model. One entry per path, each ``agreement`` or an error."""
    trained = shipped.load_trained(model_dir)
    cpu = predict.predict(trained, images, device="cpu")
    on = predict.predict(shipped.load_trained(model_dir), images, device=device)
    probs = [c for c in cpu.columns if c.startswith("prob_")]
    out: dict[str, Any] = {
        "images": len(images),
        "predict": agreement(cpu[probs].to_numpy(), on[probs].to_numpy()),
    }
    pixels = np.stack(
        [predict.read_image(p, trained) for p in images]
    )  # (N, H, W, C), as the exports take them
    reference = cpu[probs].to_numpy()
    with tempfile.TemporaryDirectory(prefix="gpu-serving-") as tmp:
        for fmt in ("torchscript", "onnx"):
            try:
                path = export.export(
                    trained, fmt, Path(tmp) / f"model.{'pt' if fmt == 'torchscript' else 'onnx'}"
                )
                out[fmt] = _run_export(fmt, path, pixels, device) | {}
                out[fmt] |= agreement(reference, out[fmt].pop("probs"))
            except Exception as err:  # one format failing is a figure too
                out[fmt] = {"error": f"{type(err).__name__}: {err}"[:300]}
    if store is not None:
        try:
            out["registered"] = agreement(reference, _registered(store, trained, pixels, device))
        except Exception as err:  # a figure too
            out["registered"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


def _run_export(fmt: str, path: Path, pixels: np.ndarray, device: str) -> dict:
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location=device)
        # TorchScript takes (N, C, H, W) like predict (shipped.Packaged)
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).to(device)
        with torch.no_grad():
            return {"probs": module(x).float().cpu().numpy(), "device": device}
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    provider = wanted if wanted in available else "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(str(path), providers=[provider])
    probs = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    return {"probs": probs, "provider": provider}


def _registered(store: str, trained: shipped.Trained, pixels: np.ndarray, device: str) -> np.ndarray:
    """The registered model's last version (the one train logged), loaded from ``store`` onto ``device``."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(store)
    name = next(iter(mlflow.MlflowClient().search_registered_models())).name
    versions = mlflow.MlflowClient().search_model_versions(f"name='{name}'")
    latest = max(int(v.version) for v in versions)
    module = mlflow.pytorch.load_model(f"models:/{name}/{latest}", map_location=device)
    with torch.no_grad():
        return module(torch.from_numpy(pixels).to(device)).float().cpu().numpy()


# --- the bench ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--skip-demo", action="store_true", help="leave out the demo's dvc repro and serving")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--images", type=int, default=N_IMAGES, help="train_step set size (%(default)s)")
    parser.add_argument("--size", type=int, default=SIZE, help="train_step image size (%(default)s)")
    parser.add_argument("--arch", default=ARCH, help="train_step architecture (%(default)s)")


def main(params: Params, args: argparse.Namespace) -> None:
    """Every figure in turn on CUDA; ``params`` play no part (the bench states its own settings)."""
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA"}), flush=True)
        return
    torch.backends.cudnn.benchmark = True
    emit(
        "gpu_device",
        card=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
    )
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-bench-")))
        if not args.skip_demo:
            project = project_copy(work / "demo", DEMO_GPU)
            repro = row("gpu_demo_repro", lambda: demo_repro(project))
            if "error" not in repro:
                images = sorted((project / "data" / "raw" / "demo").rglob("*.png"))[::8]
                store = f"sqlite:///{project / 'mlflow.db'}"
                row("gpu_serving", lambda: serving(project / "models", images, "cuda", store))
        step = step_params(args.arch, "cuda", "bf16-mixed", True, EPOCHS, BATCH)
        prepared = synthetic_set(work / "set", args.images, args.size)
        data = datamodule(step, prepared, None)
        row("gpu_train_step", lambda: fit_vs_loop(step, data, "cuda"))
        if not args.skip_compile:

            def compiled() -> dict:
                eager = bare_loop(step, data, "cuda", EPOCHS)
                fast = bare_loop(step, data, "cuda", EPOCHS, compile_model=True)
                return {
                    "eager_img_s": round(eager, 1),
                    "compiled_img_s": round(fast, 1),
                    "speedup": round(fast / eager, 3),
                }

            row("gpu_compile", compiled)
