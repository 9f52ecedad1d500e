"""python -m pipeline: one parser; every command's --help is its own, and the listing names their arguments."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.__main__ import COMMANDS, build_parser
from pipeline.__main__ import main as cli


def usage_words(text: str) -> set[str]:
    return {word.strip("[]") for word in text.split()} - {""}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli(["--help"])
    generic = capsys.readouterr().out
    assert done.value.code == 0 and f"  {command} {COMMANDS[command].synopsis}".rstrip() in generic
    with pytest.raises(SystemExit) as done:
        cli([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and out != generic
    assert (
        out.startswith(f"usage: python -m pipeline {command} [-h] [--params PARAMS]")
        and len(out.splitlines()) >= 4
    )
    if not COMMANDS[command].synopsis:
        assert "Takes no arguments" in out


def test_the_listing_names_each_commands_real_arguments():
    """The synopsis `python -m pipeline --help` shows for a command is what its parser takes, no more, no less."""
    parser = build_parser(set(COMMANDS))
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in COMMANDS.items():
        usage = (
            subparsers[name]
            .format_usage()
            .removeprefix(f"usage: python -m pipeline {name} [-h] [--params PARAMS]")
        )
        assert usage_words(usage) == usage_words(command.synopsis), name


def test_params_before_or_after_the_command_and_errors_as_one_line(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("train: {lr: -1}\n")
    for argv in (["--params", str(params), "train"], ["train", "--params", str(params)]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {params}") and "train.lr" in err[0], err
    with pytest.raises(SystemExit):
        cli([])
    assert "a command is required" in capsys.readouterr().err


def test_listing_the_commands_imports_none_of_them():
    code = (
        "import sys, contextlib, io\nfrom pipeline.__main__ import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n    main(['--help'])\n"
        "print(' '.join(sys.modules))"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "pipeline.__main__" in loaded
    assert not {m for m in loaded if m.split(".")[0] in ("torch", "mlflow", "lightning", "optuna")}
    assert not loaded & {c.module for c in COMMANDS.values()}


def test_bench_dispatches_to_a_real_data_bench_which_checks_its_file(tmp_path, capfd):
    (tmp_path / "params.yaml").write_text("{}\n")
    missing = tmp_path / "missing.npz"
    assert cli(["--params", str(tmp_path / "params.yaml"), "bench", "quality", "--data", str(missing)]) == 2
    assert (
        capfd.readouterr().err.strip()
        == f"error: {missing}: not found (the shared data sets live in ../shared/data)"
    )


def test_a_name_too_long_for_the_file_system_is_one_error_line(tmp_path, capsys):
    params = Path(__file__).parents[1] / "params.yaml"
    out = tmp_path / ("a" * 300 + ".md")
    assert cli(["--params", str(params), "docs", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "name is too long" in err[0], err


@pytest.mark.parametrize(
    "raised,words",
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "reports/metrics.json"),
            "reports/metrics.json: the disk is full",
        ),
        (OSError(errno.EROFS, "Read-only file system", "models"), "models: the file system is read-only"),
        (
            PermissionError(errno.EACCES, "Permission denied", "data/prepared"),
            "data/prepared: permission denied",
        ),
        ("readonly", "a database file cannot be used (attempt to write a readonly database)"),
        ("locked", "(database is locked): MLflow's store"),
        (KeyboardInterrupt(), "docs interrupted (Ctrl-C); outputs are written only when complete"),
    ],
)
def test_the_machine_failing_is_one_error_line_and_a_bug_keeps_its_traceback(
    monkeypatch, capsys, raised, words
):
    import sqlite3

    import sqlalchemy

    from pipeline import docs

    if raised == "readonly":
        raised = sqlalchemy.exc.OperationalError(
            "INSERT", {}, sqlite3.OperationalError("attempt to write a readonly database")
        )
    elif raised == "locked":
        raised = sqlite3.OperationalError("database is locked")

    def fails(params, args):
        raise raised

    monkeypatch.setattr(docs, "main", fails)
    params = str(Path(__file__).parents[1] / "params.yaml")
    assert cli(["--params", params, "docs"]) == (130 if isinstance(raised, KeyboardInterrupt) else 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    monkeypatch.setattr(docs, "main", lambda params, args: {}["a bug"])
    with pytest.raises(KeyError):
        cli(["--params", params, "docs"])
    monkeypatch.setattr(docs, "main", lambda params, args: Path("/nonexistent/file").read_text())  # a bug too
    with pytest.raises(FileNotFoundError):
        cli(["--params", params, "docs"])


def test_a_commands_help_imports_no_torch_and_speaks_to_users():
    """`python -m pipeline train --help` took 20-38 s importing torch on a busy machine, and showed developer
    docstrings (`main(params, args)`, reST markup)."""
    code = (
        "import sys, contextlib, io, json\nfrom pipeline.__main__ import COMMANDS, main\nhelps = {}\n"
        "for name in COMMANDS:\n    if name == 'bench':\n        continue\n    out = io.StringIO()\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n        main([name, '--help'])\n"
        "    helps[name] = out.getvalue()\n"
        "out = io.StringIO()\nwith contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
        "    main(['--help'])\nhelps[''] = out.getvalue()\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'helps': helps}))"
    )
    done = json.loads(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    assert not done["torch"]
    for name, text in done["helps"].items():
        for developer in ("main(params", "add_arguments", "``", ":func:", "Light on purpose", "The work is"):
            assert developer not in text, (name, developer)
    assert "best checkpoint" not in done["helps"]["train"] and "train.checkpoint" in done["helps"]["train"]
