"""Every command's --help and --version work (a newcomer's first two commands)."""

from __future__ import annotations

import contextlib
import io

import pytest

from cycdata.train.cli import main

COMMANDS = [[], ["plan"], ["train"], ["convert"], ["experiment"], ["range-test"], ["ladder"], ["ladder", "measure"],
            ["ladder", "show"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "cycdata")
def test_help_and_version_of_every_command_exit_0(command: list[str]) -> None:
    for flag, expected in (("--help", "usage: cycdata"), ("--version", "cycdata ")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            main([*command, flag])
        assert exited.value.code == 0, (command, flag)
        assert out.getvalue().startswith(expected), (command, flag, out.getvalue()[:200])
