"""Experiment suites: validation up front, the smoke suite end to end, resume, and the statistics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cycdata.config import ConfigError
from cycdata.train.experiment import SUITES, Suite, interval, load_suite, run_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", SUITES)
def test_built_in_suites_are_valid(name: str) -> None:
    suite = load_suite(name)
    runs = suite.runs()
    assert len(runs) == suite.seeds * len(suite.variants) * max(1, len(suite.datasets))
    assert suite.seeds >= (1 if name == "smoke" else 5)


def test_a_bad_variant_fails_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="variant broken: temperature: got -1"):
        Suite.from_mapping({"variants": {"fine": {}, "broken": {"temperature": -1}}})
    with pytest.raises(ConfigError, match="'nope' is not one of the variants"):
        Suite.from_mapping({"baseline": "nope", "variants": {"a": {}}})
    with pytest.raises(ConfigError, match="unknown keys"):
        Suite.from_mapping({"variant": {"a": {}}})


def test_interval_is_a_t_interval() -> None:
    result = interval([0.90, 0.92, 0.94, 0.96, 0.98])
    assert result["mean"] == pytest.approx(0.94) and result["std"] == pytest.approx(0.0316228, rel=1e-5)
    assert result["ci95"] == pytest.approx(2.776445 * 0.0316228 / 5**0.5, rel=1e-5)


def test_smoke_suite_runs_resumes_and_summarises(tmp_path: Path) -> None:
    lines: list[str] = []
    summary = run_suite(load_suite("smoke"), tmp_path, log=lines.append)
    assert len(lines) == 2 and set(summary["groups"]) == {"constant", "cyclical"}
    entry = summary["groups"]["cyclical"]
    assert entry["test_accuracy"]["n"] == 1 and entry["compared_with"] == "constant"
    for name in ("results.md", "results.json", "accuracy.png", "knobs.png"):
        assert (tmp_path / name).is_file(), name
    assert "| cyclical | 1 |" in (tmp_path / "results.md").read_text()
    again: list[str] = []
    run_suite(load_suite("smoke"), tmp_path, log=again.append)
    assert again == []  # finished runs are not repeated
    (tmp_path / "cyclical" / "seed-0" / "metrics.csv").unlink()  # as if killed mid-run: resumed from last.pt
    resumed: list[str] = []
    run_suite(load_suite("smoke"), tmp_path, log=resumed.append)
    assert len(resumed) == 1


def test_cli_experiment_smoke(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "experiment", "smoke", "--out",
                             str(tmp_path / "suite")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "| constant | 1 |" in result.stdout
    summary = json.loads((tmp_path / "suite" / "results.json").read_text())
    assert summary["groups"]["constant"]["test_accuracy"]["n"] == 1
    machine = summary["machine"]  # what reproducing it bit for bit also needs
    assert machine["torch"] and machine["cpu_capability"] and machine["cores"] >= 1 and machine["threads_per_run"] >= 1
    bad = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "experiment", "nosuchsuite"], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and "built-in suite" in bad.stderr
