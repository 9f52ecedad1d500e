"""data.image_size: auto resolved by the size stage (pipeline/data/size.py, pipeline/stages/size.py); the weights'
side of it (224 for ImageNet weights served on 127.0.0.1, an earlier run's size) is in tests/training."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config, demo
from pipeline.__main__ import main as cli
from pipeline.data import size
from pipeline.data.card import summary
from pipeline.data.ingest import ingest
from pipeline.data.prepared import DataError
from pipeline.data.sizing import resolve_size
from pipeline.evaluation.reporting import warnings
from tests.conftest import run_info, write_class_folders

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("own", "expected"), [(40, 40), (100, 64)])
def test_random_init_takes_the_images_own_size_capped_at_64(tmp_path, own, expected):
    raw = write_class_folders(tmp_path / "raw", per_class=3, size=own)
    resolved = resolve_size(config.Data(), raw, native=None)
    assert (resolved.image_size, resolved.basis) == (expected, "images")
    assert f"own size ({own} px)" in resolved.reason
    assert resolve_size(config.Data(image_size=48), raw, native=224) == size.set_by_params(
        48
    )  # a number wins
    assert resolve_size(config.Data(), raw, native=224).image_size == 224


def test_the_demo_costs_what_it_cost_before_auto(tmp_path):
    """The CPU demo (ImageNet weights requested, none obtainable offline: random init) stays at 64 px."""
    params = config.Params()
    raw = tmp_path / "demo"
    demo.generate(raw, 4, params.demo.image_size, params.seed)
    assert params.data.image_size == "auto"
    assert resolve_size(params.data, raw, native=None).image_size == 64  # data.image_size's value until auto


def test_the_record_is_rewritten_only_when_it_changes(tmp_path):
    path = tmp_path / "size" / "image_size.yaml"
    with pytest.raises(DataError, match=r"paths.image_size.*dvc repro size"):
        size.ImageSize.read(path)
    size.from_weights(224).write(path)
    os.utime(path, (1, 1))
    size.from_weights(224).write(path)
    assert path.stat().st_mtime == 1 and size.ImageSize.read(path) == size.from_weights(224)
    size.from_images(64).write(path)
    assert size.ImageSize.read(path).basis == "images"


def test_ingest_records_the_size_and_why_in_the_report_and_card(image_folder, tmp_path):
    resolved = size.from_images(32)
    report = ingest(
        image_folder, tmp_path / "out", seed=0, val_fraction=0.25, test_fraction=0.25, resolved=resolved
    )
    written = json.loads((tmp_path / "out" / "report.json").read_text())
    assert written["image_size"] == 32 and written["image_size_reason"] == resolved.reason
    assert resolved.reason in summary(report)


def test_the_size_stage_writes_what_ingest_reads(image_folder, tmp_path, monkeypatch):
    params = config.parse(
        {
            "paths": {
                "raw": str(image_folder.parent),
                "image_size": str(tmp_path / "s.yaml"),
                "prepared": str(tmp_path / "prepared"),
            },
            "data": {"dataset": image_folder.name, "val_fraction": 0.25, "test_fraction": 0.25},
            "model": {"weights": "none"},
        }
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(config.as_dict(params)))
    assert cli(["size", "--params", str(tmp_path / "params.yaml")]) == 0
    assert size.ImageSize.read(tmp_path / "s.yaml") == size.from_images(32)
    assert cli(["ingest", "--params", str(tmp_path / "params.yaml")]) == 0
    assert json.loads((tmp_path / "prepared" / "report.json").read_text())["image_size"] == 32


def test_the_report_warns_when_imagenet_weights_get_small_images(tmp_path):
    import dataclasses

    from pipeline.runinfo import WeightsInfo

    data_report = {"counts": {"test": {"a": 20, "b": 20}}}
    run = run_info()
    imagenet = WeightsInfo(requested="imagenet", source="http://127.0.0.1:9/resnet18.pth", pretrained=True)
    small = dataclasses.replace(run, weights=imagenet)
    lines = warnings({}, data_report, small, config.Evaluate())
    [warned] = [w for w in lines if "Small images for pretrained weights" in w]
    assert "Corley et al. 2023" in warned and "83.1 -> 91.1" in warned and "32 px" in warned
    large = dataclasses.replace(small, preprocessing=dataclasses.replace(run.preprocessing, image_size=224))
    assert not any("Small images" in w for w in warnings({}, data_report, large, config.Evaluate()))
    assert not any(
        "Small images" in w for w in warnings({}, data_report, run, config.Evaluate())
    )  # random init


# --- the real thing: dvc reruns ingest exactly when the resolved size changes ------------------------------


def sh(cmd: str, cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_changing_the_weights_reruns_ingest_only_when_the_size_changes(tmp_path):
    """A real `dvc repro` of demo -> size -> ingest: ingest depends on the resolved value, not on model.weights."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demo"].update(n_per_class=6, image_size=32)
    params["data"].update(val_fraction=0.25, test_fraction=0.25)

    def repro_with(weights: str) -> str:
        params["model"]["weights"] = weights
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return sh("dvc repro ingest", root, env)

    (root / "a.pth").write_bytes(b"a")  # state dict files: 224 px assumed; these stages never load them
    (root / "b.pth").write_bytes(b"b")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "OMP_NUM_THREADS": "1"}
    sh("git init -q && dvc init -q", root, env)
    out = repro_with("none")
    assert "Running stage 'ingest'" in out
    assert json.loads((root / "data/prepared/report.json").read_text())["image_size"] == 32  # the demo's own
    out = repro_with("a.pth")  # 32 -> 224: ingest reruns
    assert "Running stage 'size'" in out and "Running stage 'ingest'" in out
    assert json.loads((root / "data/prepared/report.json").read_text())["image_size"] == 224
    out = repro_with("b.pth")  # other weights of the same size: the size stage reruns, ingest does not
    assert "Running stage 'size'" in out and "Running stage 'ingest'" not in out
    assert "up to date" in sh("dvc status ingest", root, env)
