"""python -m pipeline: one parser; every command's --help is its own, and the listing names their arguments."""

import json
import subprocess
import sys

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


def test_bench_dispatches_to_a_real_data_bench_which_checks_its_file(tmp_path, capsys):
    (tmp_path / "params.yaml").write_text("{}\n")
    missing = tmp_path / "missing.npz"
    assert cli(["--params", str(tmp_path / "params.yaml"), "bench", "quality", "--data", str(missing)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {missing}: not found (the shared data sets live in ../shared/data)"
    )


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
