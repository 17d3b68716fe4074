"""The range test: sweeps, the suggestion rules, the CLI's plot and snippet, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cycdata.config import ConfigError, load_config
from cycdata.train.range_test import (
    KNOB_SPECS,
    RangeResult,
    range_test,
    smooth,
    steepest_descent,
    suggest_ends,
    sweep_values,
)

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model=test_resnet", "data.train_limit=1000", "runtime.progress=false"]


def test_sweeps_and_smoothing() -> None:
    assert sweep_values(1e-3, 1.0, 4, "log") == pytest.approx([1e-3, 1e-2, 1e-1, 1.0])
    assert sweep_values(0.0, 1.0, 3, "linear") == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="positive ends"):
        sweep_values(0.0, 1.0, 3, "log")
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # bias-corrected: no warm-up dip


def test_step_rules_read_the_easy_end_at_the_steepest_fall_or_where_it_starts() -> None:
    values = [10.0**e for e in range(-6, 1)]
    curve = [2.3, 2.05, 1.9, 1.2, 0.8, 0.4, 5.0]  # starts to fall at 1e-5, falls fastest from 1e-4, minimum at 0.1
    easy, hard, rule = suggest_ends("optim.lr", values, curve, [])
    assert (easy, hard) == (1e-5, 1e-1) and "a tenth of its total drop" in rule and "minimum" in rule
    easy, hard, rule = suggest_ends("optim.lr", values, curve, [], rule="steepest")
    assert (easy, hard) == (1e-4, 1e-1) and "falls fastest" in rule
    with pytest.raises(ConfigError, match="'fastest' is unknown"):
        suggest_ends("optim.lr", values, curve, [], rule="fastest")
    with pytest.raises(ConfigError, match="has one rule of its own"):
        suggest_ends("temperature", values, curve, [(0, 0.5)], rule="steepest")


def test_steepest_descent_is_not_fooled_by_one_noisy_step() -> None:
    values = sweep_values(1e-4, 1.0, 60, "log")
    raw = [2.3] * 20 + [2.3 - 0.02 * k for k in range(1, 11)]  # a slow start of the fall ...
    raw += [raw[-1] - 0.12 * k for k in range(1, 11)]  # ... its steep stretch, steps 30-39 ...
    raw += [raw[-1] - 0.01 * k for k in range(1, 11)] + [1.0 + 0.3 * k for k in range(10)]  # ... a plateau, a rise
    raw[5] = 1.7  # one lucky batch early on: after smoothing, a steeper single step than any of the real fall
    curve = smooth(raw)
    lowest = min(range(len(curve)), key=curve.__getitem__)
    # The moving average lags the raw loss by about 9 steps: the reading lands after the steep stretch's start.
    assert 30 <= steepest_descent(values, curve, lowest) <= 30 + 10 + 9


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
    assert "a tenth of its total drop" in result.rule and not result.warnings()
    steepest = range_test(load_config(None, SMALL), "optim.lr", steps=40, rule="steepest")
    assert "falls fastest" in steepest.rule and steepest.values == result.values  # the same sweep, read otherwise
    assert steepest.easy == suggest_ends("optim.lr", result.values, result.smoothed, result.probes, "steepest")[0]


def test_a_sweep_that_misses_an_end_says_so() -> None:
    values = [1e-3, 1e-2, 1e-1]
    flat = RangeResult("optim.lr", values, [2.3] * 3, [2.3] * 3, [], 1e-3, 1e-3, "rule", stopped_early=False)
    assert flat.warnings() == ["the loss never fell over the sweep: raise --high or --steps"]
    falling = RangeResult("optim.lr", values, [2, 1, 0.5], [2, 1, 0.5], [], 1e-3, 1e-1, "rule", stopped_early=False)
    assert "raise --high" in falling.warnings()[0]


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
    with pytest.raises(ConfigError, match="--rule 'fastest' is unknown"):
        range_test(config, "optim.lr", rule="fastest")
    with pytest.raises(ConfigError, match=r"optim\.weight_decay has one rule of its own"):
        range_test(config, "optim.weight_decay", rule="steepest")
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
    wrong_rule = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "range-test", "temperature", "--rule",
                                 "steepest"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert wrong_rule.returncode == 2 and "temperature has one rule of its own" in wrong_rule.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("name", "repeats"), [("range", 5), ("range-recipe", 1)])
def test_shipped_suites_use_the_ranges_the_range_test_suggests(name: str, repeats: int) -> None:
    """The suites' cyclical LRs are what ``cycdata range-test optim.lr`` prints on their baseline's config.

    The easy ends within two sweep steps (a factor 1.1 each: another CPU rounds differently); the hard end on
    the floor of the curve it was read from: a smoothed loss within 3% of the minimum. The floor is flat (on
    the ``range`` config the five-sweep mean stays within 1% of its minimum from LR 0.19 to 0.33, and which
    point is lowest changed with the CPU's instruction set), so a test of its argmin would test rounding.
    """
    from cycdata.train.experiment import load_suite

    suite = load_suite(name)
    config = next(run.config for run in suite.runs() if run.variant == suite.baseline)
    result = range_test(config, "optim.lr", repeats=repeats)
    floor = min(result.smoothed)
    for rule in ("steepest", "classic"):
        easy, _, _ = suggest_ends("optim.lr", result.values, result.smoothed, result.probes, rule)
        shipped = suite.variants[f"range-{rule}"]["optim.lr"]
        assert easy == pytest.approx(shipped["easy"], rel=0.21), (rule, easy)
        nearest = min(range(len(result.values)), key=lambda i: abs(math.log(result.values[i] / shipped["hard"])))
        assert abs(math.log(result.values[nearest] / shipped["hard"])) < math.log(1.1), (rule, "hard off the sweep")
        assert result.smoothed[nearest] <= 1.03 * floor, (rule, result.smoothed[nearest] / floor)


def test_repeats_read_the_ends_on_the_mean_of_seeded_sweeps() -> None:
    config = load_config(None, SMALL)
    first = range_test(config, "optim.lr", steps=20, probes=2)
    second = range_test(load_config(None, [*SMALL, f"seed={config.seed + 1}"]), "optim.lr", steps=20, probes=2)
    mean = range_test(config, "optim.lr", steps=20, probes=2, repeats=2)
    reached = min(len(first.values), len(second.values))
    assert mean.values == first.values[:reached]
    assert mean.losses == pytest.approx([(a + b) / 2 for a, b in zip(first.losses, second.losses)][:reached])
    assert mean.smoothed == pytest.approx(smooth(mean.losses))
    assert [i for i, _ in mean.probes] == [i for i, _ in first.probes if i < reached]
    assert (mean.easy, mean.hard) == suggest_ends("optim.lr", mean.values, mean.smoothed, mean.probes)[:2]
    with pytest.raises(ConfigError, match="--repeats must be at least 1"):
        range_test(config, "optim.lr", repeats=0)
