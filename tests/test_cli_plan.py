"""`cycdata plan`: table, JSON (SPEC.md §1.6d values), PNG, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cycdata.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "full.yaml"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a fresh interpreter (what a user types)."""
    return subprocess.run(
        [sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=120
    )


def test_plan_json_reproduces_spec_1_6d(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "plan",
                "--json",
                "--epochs",
                "10",
                "optim.weight_decay={easy: 1.0e-5, hard: 8.0e-5}",
                "temperature={easy: 0.5, hard: 2.0}",
                "grad_clip={easy: 0.5, hard: 2.0}",
                "data.batch_size={easy: 256, hard: 64}",
            ]
        )
        == 0
    )
    payload = json.loads(capsys.readouterr().out)
    assert payload["epochs"] == 10
    knobs = payload["knobs"]
    assert knobs["optim.weight_decay"] == pytest.approx(
        [
            1.0e-5,
            2.555556e-5,
            4.111111e-5,
            5.666667e-5,
            7.222222e-5,
            7.222222e-5,
            5.666667e-5,
            4.111111e-5,
            2.555556e-5,
            1.0e-5,
        ],
        abs=1e-11,
    )
    expected_t = [0.5, 0.833333, 1.166667, 1.5, 1.833333, 1.833333, 1.5, 1.166667, 0.833333, 0.5]
    assert knobs["temperature"] == pytest.approx(expected_t, abs=1e-6)
    assert knobs["grad_clip"] == pytest.approx(expected_t, abs=1e-6)  # SPEC: identical numbers
    assert all(isinstance(v, int) for v in knobs["data.batch_size"])
    assert knobs["data.batch_size"][0] == 256 and min(knobs["data.batch_size"]) == 85  # 64 + 192/9 at e=4,5
    assert len(knobs["optim.lr"]) == 10


def test_plan_factor_4_matches_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["plan", "--json", "epochs=10", "cyclical_factor=4", "optim.weight_decay={easy: 1.0e-5, hard: 8.0e-5}"])
        == 0
    )
    knobs = json.loads(capsys.readouterr().out)["knobs"]
    assert knobs["optim.weight_decay"] == pytest.approx(
        [
            1.0e-5,
            4.111111e-5,
            7.222222e-5,
            7.222222e-5,
            6.185185e-5,
            5.148148e-5,
            4.111111e-5,
            3.074074e-5,
            2.037037e-5,
            1.0e-5,
        ],
        abs=1e-11,
    )


def test_plan_example_prints_table_json_and_png(tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    table = run_cli("plan", str(EXAMPLE), "--plot", str(png))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "epoch",
        "t",
        "data.batch_size",
        "optim.lr",
        "optim.weight_decay",
        "temperature",
        "grad_clip",
        "augment.strength",
        "self_paced.keep",
        "semi_supervised.ratio",
    ]
    assert len([line for line in lines if line.strip() and line.split()[0].isdigit()]) == 30
    assert png.stat().st_size > 20_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    as_json = run_cli("plan", str(EXAMPLE), "--json")
    assert as_json.returncode == 0
    payload = json.loads(as_json.stdout)
    assert payload["epochs"] == 30 and len(payload["knobs"]["self_paced.keep"]) == 30


BAD_INVOCATIONS = [
    (["epochs=1"], "epochs: got 1, must be >= 2"),
    (["optim.wieght_decay=0.1"], "did you mean 'optim.weight_decay'"),
    (["temperature=-1"], "temperature: got -1, must be > 0"),
    (["grad_clip.mode=l3"], "grad_clip.mode"),
    (["data.dataset=imagenet"], "unknown dataset scheme"),
    (["self_paced.keep=0"], "self_paced.keep: got 0, must be > 0 and <= 1"),
    (["cyclical_factor=0.5"], "cyclical_factor: got 0.5, must be >= 1"),
    (["optim.weight_decay={easy: 1.0e-5}"], "missing hard"),
    (["optim.lr=fast"], "optim.lr: got 'fast', expected a number"),
    (["missing.yaml"], "file not found"),
]


@pytest.mark.parametrize(("args", "words"), BAD_INVOCATIONS, ids=[a[0][0] for a in BAD_INVOCATIONS])
def test_bad_input_exits_2_with_one_line(args: list[str], words: str) -> None:
    result = run_cli("plan", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert words in lines[0]
    assert "Traceback" not in result.stderr


def test_malformed_yaml_file_exits_2_with_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("epochs: 10\ndata: {dataset: mnist5k\n")
    result = run_cli("plan", str(path))
    assert result.returncode == 2
    assert "malformed YAML" in result.stderr and "line" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_subcommand_is_a_usage_error() -> None:
    result = run_cli("plna")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1


def test_overrides_may_follow_options() -> None:
    result = run_cli("plan", "--epochs", "3", "temperature=1.0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["knobs"]["temperature"] == [1.0, 1.0, 1.0]
    bad = run_cli("plan", "--epochs", "3", "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr


def test_plan_counts_the_sample_passes_a_pruned_run_will_make() -> None:
    """40% fewer passes is a count from the plan: 19 epochs of ceil(0.58·4000) = 2,320 and one of 4,000."""
    keep = "self_paced.keep={points: [[0, 0.58], [0.97, 0.58], [0.97, 1]]}"
    result = run_cli("plan", "self_paced.policy=prune", keep)
    assert result.returncode == 0, result.stderr
    assert "sample passes planned: 48,080 of 80,000 with all data every epoch (39.9% fewer)" in result.stdout
