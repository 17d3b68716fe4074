"""Self-paced selection and the cyclical unlabeled ratio in one run: selection ranks the labeled pool only,
while the unlabeled share of each batch follows its own knob."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from cycdata.loaders import CyclicalLoader
from cycdata.samplers import SemiSupervisedBatchSampler, data_plan
from cycdata.schedules import Cyclical

ROOT = Path(__file__).resolve().parents[1]
SIZE, LABELED = 200, 40


def dataset() -> TensorDataset:
    return TensorDataset(torch.arange(SIZE, dtype=torch.float32).unsqueeze(1), torch.arange(SIZE) % 4)


def loss_of(indices: torch.Tensor) -> torch.Tensor:
    """A fixed loss per sample: larger index, harder sample."""
    return indices.float() / SIZE


def loader(**options: object) -> CyclicalLoader:
    settings: dict[str, object] = {"epochs": 3, "batch_size": 8, "labeled": torch.arange(LABELED),
                                   "unlabeled_ratio": {"easy": 0, "hard": 2}, "keep": {"easy": 0.5, "hard": 1.0},
                                   "refresh_fraction": 0.0, "seed": 3}
    settings.update(options)
    return CyclicalLoader(dataset(), **settings)  # type: ignore[arg-type]


def train_epoch(cyclical: CyclicalLoader) -> list[tuple[list[int], list[int]]]:
    """One epoch, recording each labeled sample's fixed loss; the (labeled, unlabeled) indices of each batch."""
    batches = []
    for _images, _labels in cyclical:
        indices, labeled = cyclical.batch_indices, cyclical.labeled_count
        cyclical.record_loss(loss_of(indices[:labeled]))
        batches.append((indices[:labeled].tolist(), indices[labeled:].tolist()))
    return batches


def test_selection_keeps_the_easiest_labeled_samples_and_the_ratio_still_cycles() -> None:
    cyclical = loader()
    first = train_epoch(cyclical)
    # Epoch 1: nothing scored yet, so half of the labeled pool, drawn at random; no unlabeled data at the easy end.
    first_kept = {i for labeled, _ in first for i in labeled}
    assert len(first_kept) == LABELED // 2 and first_kept <= set(range(LABELED))
    assert all(unlabeled == [] for _, unlabeled in first)
    middle = train_epoch(cyclical)  # the hard end: keep 1.0, two unlabeled per labeled
    assert all(len(unlabeled) == 2 * len(labeled) for labeled, unlabeled in middle)
    assert {i for _, unlabeled in middle for i in unlabeled} <= set(range(LABELED, SIZE))
    last = train_epoch(cyclical)  # easy again: the half of the labeled pool with the lowest losses
    assert {i for labeled, _ in last for i in labeled} == set(range(LABELED // 2))
    assert cyclical.knobs["self_paced.kept"] == LABELED // 2
    # The step count is that of a supervised epoch over all the data, whatever is kept.
    assert len(first) == len(middle) == len(last) == SIZE // 8


def test_the_unlabeled_pool_is_never_selected_even_with_recorded_losses() -> None:
    cyclical = loader(epochs=2, unlabeled_ratio=1.0)
    for _ in cyclical:
        indices = cyclical.batch_indices
        # A loop that records every sample's loss (a consistency loss per unlabeled one): ranks only the labeled.
        cyclical.ledger.record(indices, torch.zeros(len(indices)))
    batches = train_epoch(cyclical)
    assert {i for labeled, _ in batches for i in labeled} <= set(range(LABELED))
    assert {i for _, unlabeled in batches for i in unlabeled} <= set(range(LABELED, SIZE))


def test_soft_weights_cover_the_labeled_part_of_each_batch() -> None:
    cyclical = loader(weighting="linear")
    train_epoch(cyclical)
    train_epoch(cyclical)
    for _ in cyclical:  # the third epoch: easy end, kept half weighted by loss
        weights = cyclical.batch_weights
        assert weights is not None and weights.shape == (cyclical.labeled_count,)
        assert bool((weights > 0).all())
        cyclical.record_loss(loss_of(cyclical.batch_indices[: cyclical.labeled_count]))


def test_mid_epoch_resume_continues_with_the_same_selection_and_streams() -> None:
    reference = loader()
    train_epoch(reference)
    train_epoch(reference)
    expected = train_epoch(reference)

    interrupted = loader()
    train_epoch(interrupted)
    train_epoch(interrupted)
    iterator = iter(interrupted)
    for _ in range(7):
        next(iterator)
        interrupted.record_loss(loss_of(interrupted.batch_indices[: interrupted.labeled_count]))
    state = interrupted.state_dict()

    resumed = loader()
    resumed.load_state_dict(state)
    rest = train_epoch(resumed)
    assert rest == expected[7:]


def test_sampler_selection_under_two_ranks_is_shared_and_disjoint() -> None:
    plan = data_plan(3, batch_size=4, keep=Cyclical(0.5, 1.0), unlabeled_ratio=Cyclical(0.0, 1.0))
    labeled, unlabeled = torch.arange(20), torch.arange(20, 100)
    samplers = [SemiSupervisedBatchSampler(labeled, unlabeled, plan=plan, rank=rank, world_size=2, refresh_fraction=0)
                for rank in (0, 1)]
    for sampler in samplers:  # the same (all-gathered) ledger on both ranks
        assert sampler.ledger is not None
        sampler.ledger.record(labeled, loss_of(labeled))
        sampler.ledger.synchronize()
    kept = [sampler.epoch_plan(2).order for sampler in samplers]
    assert kept[0].tolist() == kept[1].tolist() == list(range(10))
    # Each pass over the kept share is split between the ranks: the first 5 labeled draws of each are disjoint.
    first_pass = [torch.cat([batch.indices[: batch.labeled] for batch in sampler.batches(2)])[:5].tolist()
                  for sampler in samplers]
    assert set(first_pass[0]) | set(first_pass[1]) == set(range(10))


@pytest.mark.parametrize("level", ["epoch", pytest.param("batch", marks=pytest.mark.slow)])  # batch: 21 s more
def test_the_full_example_trains_two_epochs(tmp_path: Path, level: str) -> None:
    """examples/full.yaml, every knob cyclical, trains end to end (shortened: 3 epochs, 600 training images)."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "cycdata.train.cli", "train", str(ROOT / "examples" / "full.yaml"), "epochs=3",
         "data.train_limit=600", "data.num_workers=0", "model=test_resnet", "semi_supervised.labeled=200",
         f"self_paced.level={level}", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    assert [float(row["semi_supervised.ratio"]) for row in rows] == [0.0, 7.0, 0.0]
    assert float(rows[0]["unlabeled_samples"]) == 0 and float(rows[1]["unlabeled_samples"]) > 0
    if level == "epoch":  # keep 0.5, 1.0, 0.5 of the 200 labeled samples
        assert [int(row["self_paced.kept"]) for row in rows] == [100, 200, 100]
    assert "too short" not in result.stderr


def test_two_epochs_warn_that_the_cycle_never_leaves_the_easy_end(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "plan", "epochs=2"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    assert "the run is too short for its cycle: over 2 epochs" in result.stderr
    assert "epochs=3 reaches the hard end" in result.stderr


@pytest.mark.slow
def test_two_gloo_ranks_share_the_labeled_selection(tmp_path: Path) -> None:
    import os

    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "cycdata.train.cli", "train", "epochs=3",
         "model=test_resnet", "runtime.progress=false", "data.num_workers=0", "data.dataset=synthetic:200",
         "data.batch_size=10", "semi_supervised.labeled=40", "semi_supervised.ratio={easy: 0, hard: 1}",
         "self_paced.keep={easy: 0.5, hard: 1.0}", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["self_paced.kept"]) for row in rows] == [20, 40, 20]  # one selection for both ranks
    assert [float(row["semi_supervised.ratio"]) for row in rows] == [0.0, 1.0, 0.0]
