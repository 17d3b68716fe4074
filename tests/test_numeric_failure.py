"""Numeric failure (issue 15, item 3): the first non-finite loss or weight stops the run with one line,
exit 2, the checkpoints of the epochs before intact; evaluation never crashes on NaN logits; a sample
whose loss is NaN never takes a kept slot from one with a real loss."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from cycdata.config import parse_config
from cycdata.ledger import LossLedger
from cycdata.loaders.torch_loader import CyclicalLoader
from cycdata.selection import select
from cycdata.train.checkpoint import load_checkpoint
from cycdata.train.metrics import EvalAccumulator
from cycdata.train.trainer import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_divergence_after_a_good_epoch_stops_with_one_line_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    """Epoch 1 trains at LR 0.01, epoch 2 at 1e6: exit 2 naming epoch 2 and the LR; last.pt still holds epoch 1.

    On the old code this ended in exit 1 with ``IndexError: index out of range in self`` from the ECE binning.
    """
    out = tmp_path / "run"
    args = ["train", "model=test_resnet", "data.train_limit=64", "data.batch_size=32", "epochs=3",
            "runtime.progress=false", "optim.lr={easy: 0.01, hard: 1.0e6}", "optim.warmup_epochs=0", "--out", str(out)]
    line = assert_one_line(run_cli(*args))
    assert "training diverged" in line and "epoch 2/3" in line and "optim.lr=1e+06" in line, line
    assert "lower optim.lr" in line and "--resume" in line
    saved = load_checkpoint(out / "last.pt")
    assert saved["epoch"] == 0 or saved.get("history", [{}])[-1].get("epoch") == 0
    before = (out / "last.pt").read_bytes()
    # --resume continues with the same config and so stops at the same point, saying so (not silently).
    again = assert_one_line(run_cli("train", "--resume", str(out)))
    assert "training diverged" in again and "epoch 2/3" in again
    assert (out / "last.pt").read_bytes() == before  # nothing from the diverged epoch was written


def test_a_nan_loss_raises_training_diverged_before_anything_is_saved(tmp_path: Path) -> None:
    """LR 1e30 without clipping: the weights overflow at the first step, the loss is NaN at the second."""
    config = parse_config({"model": "test_resnet", "epochs": 2, "runtime": {"progress": False}, "grad_clip": None,
                           "optim": {"lr": 1e30}, "data": {"train_limit": 64, "batch_size": 32}})
    with pytest.raises(TrainingDiverged, match=r"the loss became NaN or infinite in epoch 1/2, step 2/2 "
                       r"\(data.batch_size=32, optim.lr=.*\); try a lower optim.lr"):
        train(config, tmp_path)
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_ece_binning_takes_nan_logits() -> None:
    """NaN confidence used to become a negative bin index (IndexError): now bin 0, NaN ECE, counted."""
    scores = EvalAccumulator(num_bins=15)
    scores.add(torch.tensor([[math.nan, 1.0], [math.inf, 0.0], [2.0, 0.0]]), torch.tensor([0, 1, 0]))
    result = scores.compute()
    assert result["samples"] == 3 and result["nonfinite"] == 2
    assert math.isnan(result["ece"]) and math.isnan(result["nll"])


def test_nan_loss_samples_never_take_kept_slots() -> None:
    """30% of the samples always have a NaN loss, keep 0.5: the kept half is chosen from the others.

    On the old code the NaN samples stayed "unseen" and were admitted first: 30 of 50 slots every epoch.
    """
    size = 100
    data = TensorDataset(torch.arange(size, dtype=torch.float32), torch.zeros(size, dtype=torch.long))
    poisoned = torch.zeros(size, dtype=torch.bool)
    poisoned[torch.randperm(size, generator=torch.Generator().manual_seed(0))[:30]] = True
    loader = CyclicalLoader(data, epochs=4, batch_size=10, keep=0.5, refresh_fraction=0.05, shuffle=True, seed=0)
    measured = torch.zeros(size, dtype=torch.bool)
    for epoch in range(4):
        trained = []
        for values, _ in loader:
            indices = loader.batch_indices
            losses = torch.where(poisoned[indices], math.nan, values / size)
            loader.record_loss(losses)
            trained.append(indices)
        trained_on = torch.cat(trained)
        assert len(trained_on) == 50
        # A sample never tried is admitted first (it may be fine); one whose loss came back NaN never again.
        assert int((poisoned & measured)[trained_on].sum()) == 0, f"epoch {epoch}"
        if epoch >= 2:  # by then every sample was tried once: no NaN sample in any kept slot
            assert int(poisoned[trained_on].sum()) == 0, f"epoch {epoch}"
        measured[trained_on] = True
    assert bool(loader.ledger.nonfinite[poisoned].all()) and not bool(loader.ledger.nonfinite[~poisoned].any())


def test_nonfinite_samples_rank_last_but_fill_a_target_that_needs_them() -> None:
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4])
    seen = torch.ones(4, dtype=torch.bool)
    marked = torch.tensor([True, True, False, False])
    assert select(losses, seen, keep=0.5, nonfinite=marked).indices.tolist() == [2, 3]
    assert select(losses, seen, keep=0.75, nonfinite=marked, refresh_fraction=0.0).indices.numel() == 3
    assert select(losses, seen, keep=1.0, nonfinite=marked).indices.tolist() == [0, 1, 2, 3]
    assert select(losses, seen, threshold=1.0, nonfinite=marked, refresh_fraction=1.0).indices.tolist() == [2, 3]
    per_class = select(losses, seen, keep=0.5, labels=torch.tensor([0, 1, 0, 1]), nonfinite=marked)
    assert per_class.indices.tolist() == [2, 3]


def test_a_finite_record_clears_the_mark_and_the_mark_survives_state() -> None:
    ledger = LossLedger(3)
    ledger.record(torch.tensor([0, 1, 1]), torch.tensor([math.nan, math.nan, 0.5]))  # index 1: the last is finite
    ledger.synchronize()
    assert ledger.nonfinite.tolist() == [True, False, False]
    restored = LossLedger(3)
    restored.load_state_dict(ledger.state_dict())
    assert restored.nonfinite.tolist() == [True, False, False]
    restored.record(torch.tensor([0]), torch.tensor([0.25]))
    restored.synchronize()
    assert restored.nonfinite.tolist() == [False, False, False] and restored.losses[0] == 0.25
