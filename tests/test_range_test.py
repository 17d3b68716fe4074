"""The range test: sweeps, the suggestion rules, the CLI's plot and snippet, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cycdata.config import ConfigError, load_config
from cycdata.train.range_test import KNOB_SPECS, range_test, smooth, suggest_ends, sweep_values

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=test_resnet", "data.train_limit=1000", "runtime.progress=false"]


def test_sweeps_and_smoothing() -> None:
    assert sweep_values(1e-3, 1.0, 4, "log") == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    assert sweep_values(0.0, 1.0, 3, "linear") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="positive ends"):
        sweep_values(0.0, 1.0, 3, "log")
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # bias-corrected: no warm-up dip


def test_step_rule_picks_the_fall_and_the_minimum() -> None:
    values = [10.0**e for e in range(-5, 1)]
    easy, hard, rule = suggest_ends("optim.lr", values, [2.3, 2.3, 2.0, 1.0, 0.4, 5.0], [])
    assert (easy, hard) == (1e-3, 1e-1) and "minimum" in rule


def test_regularizer_rule_uses_held_out_accuracy() -> None:
    values = [1e-5, 1e-4, 1e-3, 1e-2]
    probes = [(0, 0.90), (1, 0.95), (2, 0.94), (3, 0.80)]
    easy, hard, _ = suggest_ends("optim.weight_decay", values, [1.0, 0.8, 0.7, 0.9], probes)
    assert (easy, hard) == (1e-5, 1e-3)


def test_lr_range_test_on_mnist_suggests_increasing_ends() -> None:
    result = range_test(load_config(None, SMALL), "optim.lr", steps=40)
    assert result.knob == "optim.lr" and len(result.values) <= 40
    assert KNOB_SPECS["optim.lr"].low <= result.easy < result.hard <= KNOB_SPECS["optim.lr"].high
    assert result.probes and all(0.0 <= accuracy <= 1.0 for _, accuracy in result.probes)
    assert result.snippet().startswith("optim:\n  lr: {easy: ")


def test_batch_size_runs_one_short_run_per_value() -> None:
    result = range_test(load_config(None, SMALL), "data.batch_size", low=16, high=128, steps=40)
    assert result.values == [16.0, 32.0, 64.0, 128.0][: len(result.values)] and len(result.probes) == len(result.values)
    assert result.easy >= result.hard  # large batches are the easy end


def test_bad_range_test_input_is_refused() -> None:
    config = load_config(None, SMALL)
    with pytest.raises(ConfigError, match=r"cannot sweep 'optim\.nesterov'"):
        range_test(config, "optim.nesterov")
    with pytest.raises(ConfigError, match="must be below"):
        range_test(config, "optim.lr", low=1.0, high=0.1)
    with pytest.raises(ConfigError, match="needs a ladder"):
        range_test(load_config(None, [*SMALL, "augment.ladder=none"]), "augment.strength")


def test_cli_range_test_writes_plot_json_and_snippet(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "range-test", "temperature", *SMALL,
                             "--steps", "20", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "temperature: {easy: " in result.stdout and "rule:" in result.stdout
    payload = json.loads((tmp_path / "range_test.json").read_text())
    assert payload["knob"] == "temperature" and all(math.isfinite(v) for v in payload["values"])
    assert (tmp_path / "range_test.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "range-test", "optim.lr", "--low", "2",
                          "--high", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "must be below" in bad.stderr
