"""Every benchmark runs end to end on tiny inputs and reports its figure (the timings are not judged here).

The benchmarks call library internals; this keeps them from drifting out of step with the API.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The figure each benchmark reports, as a path into its JSON.
FIGURES = {
    "hooks_overhead.py": ["overhead_ratio"],
    "loader_throughput.py": ["workers", "ratio"],
    "loaders.py": ["ratios", "min on / off"],
    "augment_throughput.py": ["batched", "none"],
    "selection.py": ["seconds", "select keep=0.5 hard"],
    "folder_loader.py": ["ratio"],
}

SMALL_RUNS = {
    "hooks_overhead.py": ["--model", "test_resnet", "--samples", "256", "--repeats", "1"],
    "loader_throughput.py": ["--samples", "1024", "--workers", "0", "--epochs", "2"],
    "loaders.py": ["--samples", "1000", "--datasets", "raw", "--min-samples", "1000", "--workers", "0"],
    "augment_throughput.py": ["--samples", "256", "--workers", "0"],
    "selection.py": ["--size", "10000", "--repeats", "1"],
    "folder_loader.py": ["--images", "32", "--workers", "1", "--batch-size", "8", "--size", "64", "--epochs", "1"],
}


@pytest.mark.parametrize("script", sorted(SMALL_RUNS))
def test_benchmark_runs_and_prints_json(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *SMALL_RUNS[script], "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figure = json.loads(result.stdout.strip().splitlines()[-1])
    for key in FIGURES[script]:
        figure = figure[key]
    assert isinstance(figure, float) and figure > 0


def test_every_benchmark_script_is_covered() -> None:
    scripts = {path.name for path in (ROOT / "benchmarks").glob("*.py")}
    assert scripts == set(SMALL_RUNS)
