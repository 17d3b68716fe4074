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


def test_log_steps_adds_a_line_every_n_steps(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "train", "model=test_resnet", "epochs=3",
                           "data.train_limit=200", "data.batch_size=50", "runtime.log_steps=2",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [line.split()[1:4] for line in done.stdout.splitlines() if "  step " in line]
    assert steps == [[f"{epoch}/3", "step", f"{step}/4"] for epoch in (1, 2, 3) for step in (2, 4)]
    assert all(" loss " in line and " lr " in line for line in done.stdout.splitlines() if "  step " in line)


def test_help_and_the_cli_import_do_not_import_torch() -> None:
    """`cycdata --help` answers at once: torch (seconds to import) is imported by the commands that need it."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from cycdata.train.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'timm', 'numpy', 'matplotlib', 'albumentations') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
