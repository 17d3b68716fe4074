"""Bad CLI arguments and suite files (issue 15 items 10, 11): one stderr line naming the key and the fix,
exit 2, no traceback, nothing written."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from cycdata.config import load_config
from cycdata.train.cli import main
from cycdata.train.range_test import RangeResult

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=test_resnet", "data.train_limit=200", "epochs=2", "runtime.progress=false"]


def refused(capsys: pytest.CaptureFixture[str], args: list[str], *words: str) -> str:
    """Run the CLI's entry point; assert exit 2 and one stderr line holding ``words``; return that line."""
    status = main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1, err
    assert "Traceback" not in err and out == "", (out, err)
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


SUITE_FAULTS = [
    ("seeds: abc\nvariants: {a: {}}\n", ["seeds: got 'abc', expected an integer"]),
    ("seeds: 0\nvariants: {a: {}}\n", ["seeds: got 0, must be >= 1"]),
    ("variants: {a: 3}\n", ["variants.a: got 3; give a mapping"]),
    ("variants: {3: {}}\n", ["variants: 3 becomes a folder name"]),
    ("base: [model, test_resnet]\nvariants: {a: {}}\n", ["base: got ['model', 'test_resnet']; give a mapping"]),
    ("datasets: mnist5k\nvariants: {a: {}}\n", ["datasets: got 'mnist5k'; give a list", "[mnist5k, digits]"]),
    ("compare: [a]\nvariants: {a: {}}\n", ["compare: got ['a']; give a mapping"]),
    ("baseline: [a]\nvariants: {a: {}}\n", ["baseline: ['a'] is not one of the variants"]),
]


@pytest.mark.parametrize(("text", "words"), SUITE_FAULTS, ids=[f[0].split(":")[0] + str(i)
                                                               for i, f in enumerate(SUITE_FAULTS)])
def test_bad_suite_fields_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                       words: list[str]) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(text)
    refused(capsys, ["experiment", str(suite), "--out", str(tmp_path / "out")], *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]


def test_experiment_epochs_is_validated_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    refused(capsys, ["experiment", "smoke", "--epochs", "1", "--out", str(tmp_path / "out")], "epochs: got 1")
    assert list(tmp_path.iterdir()) == []


RANGE_FAULTS = [
    (["optim.lr", "--low", "-1"], ["--low: got -1", "log scale", "> 0"]),
    (["optim.weight_decay", "--low", "0"], ["--low: got 0", "log scale"]),
    (["optim.momentum", "--high", "1.5"], ["--high: optim.momentum: got 1.5, must be >= 0 and < 1"]),
    (["grad_clip", "--high", "inf"], ["--high: got inf; give a finite number"]),
    (["augment.strength", "--low", "nan"], ["--low: got nan; give a finite number"]),
    (["augment.strength", "--high", "2"], ["--high: augment.strength: got 2"]),
    (["optim.lr", "--repeats", "0"], ["--repeats must be at least 1, got 0"]),
    (["optim.lr", "--steps", "5"], ["--steps must be at least 10"]),
]


@pytest.mark.parametrize(("args", "words"), RANGE_FAULTS, ids=[" ".join(f[0]) for f in RANGE_FAULTS])
def test_bad_range_test_arguments_are_refused_before_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               args: list[str], words: list[str]) -> None:
    refused(capsys, ["range-test", *args, *TINY, "--out", str(tmp_path / "range")], *words)
    assert list(tmp_path.iterdir()) == []


def test_range_test_suggestions_paste_as_valid_config_values() -> None:
    """The printed ends are valid for the knob: momentum swept up to 0.9996 must not print as hard: 1."""
    values = [0.5 + (0.9996 - 0.5) * i / 19 for i in range(20)]
    result = RangeResult("optim.momentum", values, [1.0] * 20, [1.0] * 20, [(19, 0.5)], values[3], values[-1],
                         "", False)
    snippet = result.snippet()
    assert "hard: 0.9996" in snippet, snippet
    hard = load_config(None, [f"optim.momentum={snippet.split(':', 2)[2].strip()}"]).optim.momentum
    assert math.isclose(hard.hard, 0.9996) and hard.hard < 1


def test_a_flag_and_a_key_with_different_values_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    refused(capsys, ["plan", "epochs=3", "--epochs", "5"], "--epochs 5 conflicts with epochs=3")
    assert main(["plan", "epochs=5", "--epochs", "5", "--json"]) == 0  # the same value twice is no conflict
    assert '"epochs": 5' in capsys.readouterr().out
    refused(capsys, ["train", "init=a.pt", "--init", "b.pt"], "--init b.pt conflicts with init=a.pt")


def test_convert_workers_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for workers in ("-1", "0"):
        refused(capsys, ["convert", "digits", str(tmp_path / "d.beton"), "--workers", workers],
                f"--workers: got {workers}; give an integer >= 1")
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_an_out_holding_a_half_written_run(tmp_path: Path) -> None:
    """A run stopped before its first checkpoint (config.yaml, metrics.csv, no last.pt) is not written over."""
    half = tmp_path / "run"
    half.mkdir()
    (half / "config.yaml").write_text("epochs: 9\n")
    (half / "metrics.csv").write_text("epoch,test_accuracy\n0,0.5\n")
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "train", *TINY, "--out", str(half)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--out" in lines[0] and "--resume" in lines[0] and "no last.pt" in lines[0], lines[0]
    assert (half / "config.yaml").read_text() == "epochs: 9\n" and sorted(p.name for p in half.iterdir()) == [
        "config.yaml", "metrics.csv"]
