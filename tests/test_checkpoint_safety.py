"""Checkpoints are data, never code: a pickle that would run something is refused wherever one is loaded.

The guarantee comes from the torch floor (pyproject: torch>=2.6, where torch.load defaults to
weights_only=True); Lightning's loaders pass weights_only=None through to that default.
"""

import pathlib
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement

from pipeline.serve import shipped
from pipeline.training.model import Classifier
from tests.conftest import run_info


class RunsCode:
    """Unpickling this writes a file: what a malicious checkpoint would do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.write_text, (self.marker, "the checkpoint ran code")


def malicious_checkpoint(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "pwned"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"num_classes": 2}, "payload": RunsCode(marker)},
        folder / "best.ckpt",
    )
    return folder / "best.ckpt", marker


def test_predict_refuses_a_checkpoint_that_would_run_code(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    checkpoint, marker = malicious_checkpoint(tmp_path / "models")
    run_info(classes=("a", "b")).write(tmp_path / "models")
    with pytest.raises(Exception, match="Weights only load failed"):
        shipped.load_trained(tmp_path / "models")
    with pytest.raises(Exception, match="Weights only load failed"):
        Classifier.load_from_checkpoint(checkpoint, map_location="cpu")  # the evaluate and train stages' load
    assert not marker.exists()


def test_the_torch_floor_makes_safe_loading_the_default():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    torch_req = next(Requirement(r) for r in project["dependencies"] if Requirement(r).name == "torch")
    assert not any(torch_req.specifier.contains(v) for v in ("2.4.1", "2.5.1")), torch_req
