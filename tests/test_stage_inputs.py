"""Stages run out of order say which stage to run first, instead of a traceback."""

import pytest

from pipeline.__main__ import main


@pytest.mark.parametrize(
    ("stage", "missing", "first"), [("train", "best_params.yaml", "tune"), ("evaluate", "run.json", "train")]
)
def test_a_stage_without_its_input_names_the_stage_to_run(
    tmp_path, monkeypatch, capsys, stage, missing, first
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}\n")  # all defaults: data/tune/best_params.yaml, models/, ...
    assert main([stage]) == 2
    err = capsys.readouterr().err
    assert missing in err and f"dvc repro {first}" in err
