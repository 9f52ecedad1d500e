"""python -m pipeline: every command's --help is its own."""

import pytest

from pipeline.__main__ import COMMANDS, WITH_ARGS
from pipeline.__main__ import main as cli


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - WITH_ARGS))
def test_each_command_without_arguments_has_its_own_help(command, capsys):
    assert cli(["--help"]) == 0
    generic = capsys.readouterr().out
    assert cli([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out != generic and out.startswith(f"usage: python -m pipeline {command} [--params PARAMS]\n")
    assert "Takes no arguments" in out and len(out.splitlines()) >= 4
