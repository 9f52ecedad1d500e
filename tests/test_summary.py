import argparse
import json
import os
import subprocess
import sys

from pipeline import config
from pipeline.stages import summary


def test_summary_shows_the_metrics_there_are(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(summary, "stale_stages", lambda: ([], None))
    params = config.parse({})
    (tmp_path / "reports").mkdir()
    # AUROC is undefined (and absent) when the test split lacks a class.
    (tmp_path / params.paths.metrics).write_text(
        json.dumps(
            {
                "test/accuracy": 0.5,
                "test/balanced_accuracy": 0.5,
                "test/macro_f1": 0.4,
                "weights/pretrained": False,
            }
        )
    )
    summary.main(params, argparse.Namespace())
    out = capsys.readouterr().out
    assert "accuracy=0.500" in out and "auroc" not in out and "random init" in out
    assert "every stage up to date" in out


def test_summary_names_the_stale_stages_and_imports_no_torch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, check=True)
    (tmp_path / "a.txt").write_text("1")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  copy:\n    cmd: cp a.txt b.txt\n    deps: [a.txt]\n    outs: [b.txt]\n"
    )
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], check=True)
    summary.main(config.parse({}), argparse.Namespace())
    assert "Pipeline finished: every stage up to date." in capsys.readouterr().out
    (tmp_path / "a.txt").write_text("2")
    summary.main(config.parse({}), argparse.Namespace())
    out = capsys.readouterr().out
    assert "NOT up to date: stale copy" in out and "Pipeline finished" not in out
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline.stages.summary; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip() == "False"  # torch alone took most of the 10 s it used to take


def test_a_lock_held_by_a_live_dvc_command_is_not_to_be_removed(tmp_path, monkeypatch, capsys):
    """DVC's own last line advises removing .dvc/tmp/rwlock; while the command holding it runs, that is wrong."""
    monkeypatch.chdir(tmp_path)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo 1 > out.txt\n    outs: [out.txt]\n")
    holder = {"write": {str(tmp_path / "out.txt"): {"pid": os.getpid(), "cmd": "dvc exp run"}}}
    (tmp_path / summary.RWLOCK).write_text(json.dumps(holder))
    summary.main(config.parse({}), argparse.Namespace())
    out = capsys.readouterr().out
    assert f"'dvc exp run' (pid {os.getpid()}) is running and holds DVC's lock" in out
    assert "wait for it to finish" in out and "manually remove" not in out
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid no longer runs
    holder["write"][str(tmp_path / "out.txt")]["pid"] = gone.pid
    (tmp_path / summary.RWLOCK).write_text(json.dumps(holder))
    assert summary.lock_holders(tmp_path / summary.RWLOCK) == []
