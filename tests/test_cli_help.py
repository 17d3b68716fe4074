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


def test_a_run_logged_to_a_file_has_one_line_per_epoch(tmp_path) -> None:
    """Off a terminal (nohup, CI, a cluster job) no progress-bar frames: the epochs' summary lines only."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "train.log"
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "train", "model=test_resnet", "epochs=2",
                               "data.train_limit=200", "--out", str(tmp_path / "run")], stdout=handle,
                              stderr=subprocess.STDOUT, cwd=root, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "\r" not in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert text.count("run folder:") == 1


def test_a_key_and_its_value_given_apart_get_the_override_named(capsys) -> None:
    assert main(["plan", "epochs", "10"]) == 2
    assert "did you mean epochs=10?" in capsys.readouterr().err
