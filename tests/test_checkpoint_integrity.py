"""Checkpoints a resume can trust (issue 15 items 5, 6, 7 and 10's checkpoint without ``epoch``): damaged bytes
are refused, best.pt is never left behind for good, stale temporaries are removed, and a resume runs under the
config stored in last.pt, whatever happened to the editable config.yaml."""

from __future__ import annotations

import csv
import io
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cycdata.config import ConfigError, load_config
from cycdata.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cycdata.train.trainer import resume, train

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["epochs=4", "model=test_resnet", "runtime.progress=false", "data.num_workers=0",
             "data.dataset=synthetic:256", "data.batch_size=32"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One run of 4 epochs stopped after 1 epoch (``after1``) and after 2 (``after2``)."""
    root = tmp_path_factory.mktemp("runs")
    train(load_config(None, OVERRIDES), root / "after1", stop_after=1)
    shutil.copytree(root / "after1", root / "after2")
    resume(root / "after2", stop_after=2)
    return {"after1": root / "after1", "after2": root / "after2"}


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_garbled_last_pt_is_refused_wherever_the_damage_lands(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["after2"], tmp_path / "run")
    intact = (run / "last.pt").read_bytes()
    rng = np.random.default_rng(0)
    for offset in np.linspace(0, len(intact) - 2048, 12).astype(int):
        garbled = bytearray(intact)
        garbled[offset : offset + 2048] = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
        (run / "last.pt").write_bytes(bytes(garbled))
        with pytest.raises(CheckpointError) as caught:
            resume(run)
        assert "\n" not in str(caught.value) and "last.pt" in str(caught.value)
    assert len(list(csv.DictReader((run / "metrics.csv").open()))) == 2  # nothing trained on damage
    with zipfile.ZipFile(io.BytesIO(intact)) as archive:  # a torch file is a zip: find the largest tensor's bytes
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    assert largest.file_size > 8192
    offset = largest.header_offset + largest.file_size // 2  # inside them: a file torch reads without complaint
    garbled = bytearray(intact)
    garbled[offset : offset + 2048] = rng.integers(0, 256, 2048, dtype=np.uint8).tobytes()
    (run / "last.pt").write_bytes(bytes(garbled))
    torch.load(run / "last.pt", weights_only=True)
    assert_one_line_exit_2(run_cli("train", "--resume", str(run)), "damaged", "checksum")


def test_checkpoint_without_epoch_is_one_line(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["after1"], tmp_path / "run")
    state = load_checkpoint(run / "last.pt")
    del state["epoch"], state["version"], state["checksum"]
    save_checkpoint(state, run / "last.pt")  # a valid checksum: the content itself lacks the epoch
    with pytest.raises(CheckpointError, match="'epoch' is missing"):
        resume(run)
    assert_one_line_exit_2(run_cli("train", "--resume", str(run)), "'epoch'")


def test_edited_config_yaml_is_refused_with_the_changed_keys(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["after1"], tmp_path / "run")
    checkpoint = (run / "last.pt").read_bytes()
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["epochs"], raw["seed"], raw["data"]["dataset"], raw["data"]["train_limit"] = 6, 1, "synthetic:128", 100
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        resume(run)
    for key in ("epochs (4 -> 6)", "seed (0 -> 1)", "data.dataset", "data.train_limit"):
        assert key in str(caught.value)
    assert_one_line_exit_2(run_cli("train", "--resume", str(run)), "epochs (4 -> 6)", "data.dataset")
    assert (run / "last.pt").read_bytes() == checkpoint


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", b"epochs: [unclosed"])
def test_unreadable_config_yaml_is_one_line(runs: dict[str, Path], tmp_path: Path, content: bytes) -> None:
    run = copy_run(runs["after1"], tmp_path / "run")
    (run / "config.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=r"delete config\.yaml"):
        resume(run)
    if content.startswith(b"\x89PNG"):
        assert_one_line_exit_2(run_cli("train", "--resume", str(run)), "config.yaml")


def test_missing_config_yaml_resumes_from_last_pt(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["after2"], tmp_path / "run")
    (run / "config.yaml").unlink()
    row = resume(run)
    assert row["epoch"] == 3
    assert load_config(run / "config.yaml") == load_config(None, OVERRIDES)


def test_display_only_edit_is_applied_on_resume(runs: dict[str, Path], tmp_path: Path) -> None:
    run = copy_run(runs["after1"], tmp_path / "run")
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["runtime"]["log_every"] = 5
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    resume(run, stop_after=2)
    assert load_checkpoint(run / "last.pt")["config"]["runtime"]["log_every"] == 5
    assert load_config(run / "config.yaml").runtime.log_every == 5


def test_stale_best_pt_is_replaced_and_orphans_removed(runs: dict[str, Path], tmp_path: Path) -> None:
    """What a kill during the old best.pt write left: best.pt at epoch 0 while last.pt records a better best."""
    run = copy_run(runs["after2"], tmp_path / "run")
    shutil.copy(runs["after1"] / "best.pt", run / "best.pt")  # best.pt holds epoch 0
    state = load_checkpoint(run / "last.pt")
    state["best_accuracy"] = 2.0  # a record no epoch can beat, as the old code kept it for good
    save_checkpoint({k: v for k, v in state.items() if k not in ("version", "checksum")}, run / "last.pt")
    ours = [run / ".best.pt.a1b2c3d4.tmp", run / ".last.pt.zz_yy_xx.tmp"]
    theirs = [run / ".best.pt.mine.tmp", run / "notes.tmp", run / "sub" / ".last.pt.abcdefgh.tmp"]
    for path in ours + theirs:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    resume(run)
    assert not any(path.exists() for path in ours)
    assert all(path.exists() for path in theirs)
    accuracy = [float(row["test_accuracy"]) for row in csv.DictReader((run / "metrics.csv").open())]
    assert max(accuracy[2:]) > accuracy[0], "setup: a later epoch must beat epoch 0 for this test to mean anything"
    # best.pt held epoch 0 (epoch 1's weights were lost): each later epoch that beats what best.pt holds replaces it.
    holder = 0
    for epoch in (2, 3):
        if accuracy[epoch] > accuracy[holder]:
            holder = epoch
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] - 1 == holder
    assert math.isclose(best["history"][-1]["test_accuracy"], accuracy[holder])
