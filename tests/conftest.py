"""Shared fixtures: tiny real image sets written to tmp_path (no downloads, no shared data)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config
from pipeline.data.ingest import ingest
from pipeline.data.prepared import Prepared, load_prepared
from pipeline.runinfo import Preprocessing, RunInfo, WeightsInfo

CLASSES = ("alpha", "beta", "gamma")


def run_info(**changes) -> RunInfo:
    """The run.json a train stage would write for a one-checkpoint resnet18 on 32 px RGB uint8 images."""
    base = RunInfo(
        model_sha256="a1" * 32,
        arch="resnet18",
        classes=CLASSES,
        checkpoints=("best.ckpt",),
        monitor="val/loss",
        best_score=0.5,
        epochs_run=1,
        weights=WeightsInfo(requested="none", source="random-init", pretrained=False),
        preprocessing=Preprocessing(image_size=32, channels="rgb", dicom_window=None, dtype="uint8"),
    )
    return dataclasses.replace(base, **changes)


def write_class_folders(root: Path, per_class: int = 8, size: int = 32, seed: int = 0) -> Path:
    """A folder per class of RGB PNGs; each class has its own dominant colour channel, plus noise."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (size, size, 3))
            img[..., k] += 120
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{name}_{i:02d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_class_folders(tmp_path / "raw" / "tiny")


@pytest.fixture
def tiny_params() -> config.Params:
    """Params for a real but tiny CPU fit."""
    return config.parse(
        {
            "data": {"dataset": "tiny", "image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
            "model": {"weights": "none"},
            "train": {
                "max_epochs": 2,
                "batch_size": 4,
                "accelerator": "cpu",
                "patience": 2,
                "cpu_threads": 1,
            },
            "tune": {"enabled": True, "n_trials": 2, "max_epochs": 1},
        }
    )


@pytest.fixture
def prepared(image_folder: Path, tmp_path: Path) -> Prepared:
    ingest(
        image_folder,
        tmp_path / "prepared",
        image_size=32,
        val_fraction=0.25,
        test_fraction=0.25,
        seed=0,
        on_bad_file="skip",
    )
    return load_prepared(tmp_path / "prepared")


# --- a tiny run of every stage, in process, in a project folder under tmp_path -------------------------------

REPO = Path(__file__).resolve().parents[1]
TINY_PIPELINE = {  # params for a real but tiny run: 32 px demo tiles, 1-2 epochs, no weights download
    "demo": {"n_per_class": 8, "image_size": 32},
    "data": {"image_size": 32, "val_fraction": 0.25, "test_fraction": 0.25},
    "model": {"weights": "none"},
    "train": {"max_epochs": 2, "batch_size": 8, "accelerator": "cpu", "cpu_threads": 1},  # -n 2 on 2 cores
    "tune": {"enabled": True, "n_trials": 2, "max_epochs": 1},
}


def write_tiny_params(path: Path, **sections: dict) -> Path:
    """The repository's params.yaml with TINY_PIPELINE, then ``sections``, merged in, written to ``path``."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for changes in (TINY_PIPELINE, sections):
        for section, values in changes.items():
            params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@contextmanager
def in_project(root: Path, tracking_uri: str | None = None, exp_name: str | None = None) -> Iterator[None]:
    """Work in ``root`` as `dvc repro` would: its cwd, ``MLFLOW_TRACKING_URI`` and ``DVC_EXP_NAME`` as given
    (else unset), weights cache inside it; MLflow's tracking URI is restored afterwards."""
    import mlflow

    previous_uri = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, value in (("MLFLOW_TRACKING_URI", tracking_uri), ("DVC_EXP_NAME", exp_name)):
            mp.setenv(
                name, value or ""
            )  # recorded, so undo also removes what mlflow.set_tracking_uri exports
            if not value:
                mp.delenv(name)
        mp.setenv("TORCH_HOME", str(root / "torch"))
        try:
            yield
        finally:
            mlflow.set_tracking_uri(previous_uri)


def run_stages(*stages: str, params: str = "params.yaml") -> None:
    """``python -m pipeline <stage> --params <params>`` in process, for each stage; each must succeed."""
    from pipeline.__main__ import main as pipeline

    for stage in stages:
        assert pipeline([stage, "--params", params]) == 0, stage


def kill_when_ready(
    cmd: list[str], cwd: Path, env: dict, ready: Path, settle_s: float = 0.5, timeout_s: float = 300
) -> None:
    """Run ``cmd`` and SIGKILL it, as a crash or an out-of-memory kill would, ``settle_s`` after ``ready``
    appears (e.g. an epoch's ``last.ckpt``: the pause lets its one write finish); fails if the command ends
    first or ``timeout_s`` passes."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while not ready.is_file():
            assert proc.poll() is None, f"{' '.join(cmd)} ended before {ready} was written"
            assert time.monotonic() < deadline, f"no {ready} after {timeout_s} s"
            time.sleep(0.1)
        time.sleep(settle_s)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def run_script(code: str, folder: Path, *args: str) -> None:
    """``code`` saved in ``folder`` and run there as a script of its own (Lightning's DDP launcher re-runs the
    command for each rank: it needs a file, not pytest), one thread a process, this checkout first on the
    path; it must succeed."""
    script = folder / "script.py"
    script.write_text(code)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=folder, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
