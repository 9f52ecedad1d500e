"""benchmarks/gpu.py: its skip without CUDA, and the parts that run on a CPU (the GPU rows themselves need one)."""

import json

import numpy as np
import pytest

from benchmarks import gpu
from pipeline.__main__ import main as cli
from pipeline.data.ingest import ingest
from pipeline.data.prepared import load_prepared
from pipeline.training.fit import datamodule
from tests.conftest import write_class_folders
from tests.test_serve import train_tiny


def test_without_cuda_the_bench_prints_one_skipped_line(capfd, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    gpu.main(None, None)  # params and arguments play no part before the check
    assert capfd.readouterr().out.splitlines() == ['{"skipped": "no CUDA"}']


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has CUDA: the bench would run"
)
def test_the_cli_lists_and_runs_the_gpu_bench(capfd):
    assert cli(["bench", "gpu", "--skip-compile"]) == 0
    out = capfd.readouterr().out.strip().splitlines()
    assert [json.loads(line) for line in out] == [{"skipped": "no CUDA"}]


def test_fit_and_the_bare_loop_compare_on_the_same_batches(prepared):
    params = gpu.step_params("resnet18", "cpu", "32", False, epochs=2, batch=8)
    figures = gpu.fit_vs_loop(params, datamodule(params, prepared, None), "cpu")
    assert figures["lightning_img_s"] > 0 and figures["torch_img_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["lightning_img_s"] / figures["torch_img_s"], rel=0.01)
    assert figures["arch"] == "resnet18" and figures["image_size"] == 32 and figures["epochs_timed"] == 1


def test_bf16_autocast_runs_in_the_bare_loop_on_cpu(prepared):
    params = gpu.step_params("resnet18", "cpu", "bf16-mixed", True, epochs=2, batch=8)
    assert gpu.bare_loop(params, datamodule(params, prepared, None), "cpu", 2) > 0


def test_agreement_needs_the_same_argmax_and_a_small_difference():
    a = np.array([[0.7, 0.3], [0.2, 0.8]])
    assert gpu.agreement(a, a + 1e-4)["agree"]
    assert not gpu.agreement(a, a + 0.01)["agree"]
    flipped = gpu.agreement(a, a[:, ::-1])
    assert not flipped["agree"] and not flipped["argmax_equal"]


def test_serving_checks_predict_and_both_exports(tmp_path):
    raw = write_class_folders(tmp_path / "raw", per_class=6, size=40)
    ingest(raw, tmp_path / "prepared", seed=0, image_size=32, val_fraction=0.25, test_fraction=0.25)
    train_tiny(tmp_path, load_prepared(tmp_path / "prepared"), "rgb")
    images = sorted(raw.rglob("*.png"))[:5]
    out = gpu.serving(tmp_path / "models", images, "cpu")
    assert out["images"] == 5
    for path in ("predict", "torchscript", "onnx"):
        assert out[path]["agree"], (path, out[path])
    assert out["onnx"]["provider"] == "CPUExecutionProvider" and "registered" not in out


def test_the_demo_project_copy_is_a_fresh_repository_with_the_gpu_params(tmp_path):
    import subprocess

    import yaml

    project = gpu.project_copy(tmp_path / "demo", gpu.DEMO_GPU)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["accelerator"] == "gpu" and params["data"]["dataset"] == "demo"
    assert (project / "data" / "unlabelled" / ".gitignore").is_file()  # the pool stage's dependency
    assert not (project / "dvc.lock").exists() and (project / ".dvc" / "config").is_file()
    listed = subprocess.run(
        ["dvc", "stage", "list"], cwd=project, env=gpu._env(), capture_output=True, text=True
    )
    assert "size" in listed.stdout and "evaluate" in listed.stdout, listed.stderr
