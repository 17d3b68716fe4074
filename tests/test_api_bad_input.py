"""The Python API's bad input (issue 15, items 10/11) and batches BatchNorm can train on (item 4).

Each bad call raises one ValueError/TypeError naming the argument and the fix (the CLI's exit 2 is the
CLI's job); a last batch of one sample is merged into the batch before it, in every count that describes
the epoch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset

from cycdata.loaders.torch_loader import CyclicalLoader
from cycdata.samplers import CyclicalBatchSampler, SemiSupervisedBatchSampler, batch_count, data_plan
from cycdata.schedules import Cyclical


def tensor_data(size: int = 20) -> TensorDataset:
    return TensorDataset(torch.randn(size, 3), torch.arange(size) % 2)


# --- item 4: no training batch of one sample ----------------------------------------------------


def test_a_remainder_of_one_is_merged_into_the_batch_before() -> None:
    """4000 = 43·93 + 1: 43 batches, the last of 94; every count agrees with the batches yielded."""
    assert batch_count(4000, 93) == 43 and batch_count(4000, 93, drop_last=True) == 43
    assert batch_count(4001, 93) == 44 and batch_count(1, 93) == 1
    sampler = CyclicalBatchSampler(4000, plan=data_plan(2, batch_size=93), shuffle=False)
    sizes = [len(batch.indices) for batch in sampler.batches(0)]
    assert sizes == [93] * 42 + [94] and sampler.num_batches(0) == 43
    assert torch.equal(torch.cat([batch.indices for batch in sampler.batches(0)]), torch.arange(4000))


def test_the_scheduled_batch_size_of_issue_15_never_gives_a_batch_of_one() -> None:
    """epochs=12, batch size 128 -> 64 -> 128 over 4000 samples (hits 93 at some epoch): len, total_steps and
    the batches yielded agree, and no batch has fewer than 2 samples."""
    data = tensor_data(4000)
    loader = CyclicalLoader(data, epochs=12, batch_size={"easy": 128, "hard": 64}, shuffle=True, seed=0)
    assert 93 in [loader.batch_sampler.knobs(epoch).batch_size for epoch in range(12)]
    steps = 0
    for _ in range(12):
        sizes = [len(y) for _, y in loader]
        assert len(sizes) == len(loader) and sum(sizes) == 4000 and min(sizes) >= 2
        steps += len(sizes)
    assert steps == loader.total_steps


def test_batchnorm_trains_through_an_epoch_whose_remainder_was_one() -> None:
    """The real failure: BatchNorm refuses a training batch of one ("Expected more than 1 value per channel")."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    loader = CyclicalLoader(tensor_data(21), epochs=2, batch_size=10, shuffle=False)
    model.train()
    outputs = [model(x) for x, _ in loader]
    assert [len(out) for out in outputs] == [10, 11]


def test_drop_last_still_drops_the_remainder_like_a_dataloader() -> None:
    loader = CyclicalLoader(tensor_data(21), epochs=2, batch_size=10, shuffle=False, drop_last=True)
    assert [len(y) for _, y in loader] == [10, 10] and len(loader) == 2


# --- items 10/11: the API refuses bad input with the argument and the fix ------------------------


class Stream(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from ((torch.zeros(3), 0) for _ in range(4))


def test_an_iterable_dataset_is_refused() -> None:
    with pytest.raises(TypeError, match=r"map-style dataset .* IterableDataset"):
        CyclicalLoader(Stream(), epochs=2)


def test_string_labels_with_per_class_are_refused() -> None:
    labels = ["cat", "dog"] * 10
    with pytest.raises(TypeError, match=r"per_class=True needs integer class labels.*str.*classes.index"):
        CyclicalLoader(tensor_data(20), epochs=2, keep=0.5, per_class=True, labels=labels)
    with pytest.raises(ValueError, match="per_class=True got 3 labels for a dataset of 20"):
        CyclicalLoader(tensor_data(20), epochs=2, keep=0.5, per_class=True, labels=torch.tensor([0, 1, 0]))


@pytest.mark.parametrize(("labeled", "message"), [
    (torch.tensor([0, 25]), r"labeled= holds index 25, outside the dataset's \[0, 20\)"),
    (torch.tensor([-1, 2]), r"labeled= holds index -1"),
    (torch.tensor([1, 1]), "labeled= repeats an index"),
    (torch.arange(20), "leave at least one unlabeled"),
    (torch.tensor([0.5, 1.5]), "integer dataset indices"),
])
def test_labeled_out_of_range_is_refused(labeled: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CyclicalLoader(tensor_data(20), epochs=2, batch_size=4, labeled=labeled, unlabeled_ratio=1.0)


def test_semi_supervised_sampler_refuses_empty_or_float_pools() -> None:
    plan = data_plan(2, batch_size=4, unlabeled_ratio=1.0)
    with pytest.raises(ValueError, match="labeled must be a non-empty 1-D integer tensor"):
        SemiSupervisedBatchSampler(torch.tensor([], dtype=torch.long), torch.arange(5), plan=plan)
    with pytest.raises(ValueError, match="unlabeled must be a non-empty 1-D integer tensor"):
        SemiSupervisedBatchSampler(torch.arange(5), torch.tensor([1.0, 2.0]), plan=plan)


def test_an_incomplete_loader_state_is_refused() -> None:
    loader = CyclicalLoader(tensor_data(20), epochs=2, batch_size=4)
    with pytest.raises(ValueError, match="lacks ledger, epoch, consumed; pass the whole dict"):
        loader.load_state_dict({"version": 1})
    with pytest.raises(ValueError, match="not a CyclicalLoader state"):
        loader.load_state_dict([1, 2])  # type: ignore[arg-type]
    ssl = CyclicalLoader(tensor_data(20), epochs=2, batch_size=4, labeled=torch.arange(5), unlabeled_ratio=1.0)
    state = ssl.state_dict()
    del state["sampler"]
    with pytest.raises(ValueError, match="lacks sampler"):
        ssl.load_state_dict(state)


@pytest.mark.parametrize("keep", [0, -0.5, math.nan, 1.5, {"easy": 0.5, "hard": 1.5}])
def test_keep_outside_its_range_is_refused_not_clamped(keep: object) -> None:
    with pytest.raises(ValueError, match=r"keep=.*: give a kept fraction in \(0, 1\]"):
        CyclicalLoader(tensor_data(), epochs=2, batch_size=4, keep=keep)


@pytest.mark.parametrize("batch_size", [2.7, 0, -4, math.inf, {"easy": 64, "hard": 16.5}])
def test_a_batch_size_that_is_not_a_whole_number_is_refused_not_rounded(batch_size: object) -> None:
    with pytest.raises(ValueError, match=r"batch_size=.*: give a whole number of samples >= 1"):
        CyclicalLoader(tensor_data(), epochs=2, batch_size=batch_size)


@pytest.mark.parametrize(("argument", "value"), [("unlabeled_ratio", -1), ("unlabeled_ratio", math.inf),
                                                 ("threshold", 0), ("threshold", math.nan)])
def test_other_knob_arguments_outside_their_range_are_refused(argument: str, value: float) -> None:
    extra = {"labeled": torch.arange(5)} if argument == "unlabeled_ratio" else {}
    with pytest.raises(ValueError, match=f"{argument}=.*: give"):
        CyclicalLoader(tensor_data(), epochs=2, batch_size=4, **{argument: value}, **extra)


def test_a_schedule_object_is_checked_by_its_ends() -> None:
    with pytest.raises(ValueError, match=r"keep=.*got 2.0"):
        data_plan(2, batch_size=8, keep=Cyclical(0.5, 2.0))


@pytest.mark.parametrize(("rank", "world_size", "message"), [
    (3, 2, "rank=3 with world_size=2: a rank runs from 0 to world_size - 1"),
    (-1, 2, "rank=-1: give a whole number >= 0"),
    (0, 0, "world_size=0: give a whole number >= 1"),
    (0.5, 2, "rank=0.5"),
])
def test_a_rank_outside_the_world_is_refused(rank: object, world_size: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CyclicalLoader(tensor_data(), epochs=2, batch_size=4, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match=message):
        CyclicalLoader(tensor_data(), epochs=2, batch_size=4, rank=rank, world_size=world_size,
                       labeled=torch.arange(5), unlabeled_ratio=1.0)


def test_recording_the_same_batch_twice_is_an_error() -> None:
    """Decided: an error (a second record would count the batch twice, two EMA steps), not a silent last-wins."""
    loader = CyclicalLoader(tensor_data(8), epochs=2, batch_size=4, keep=0.5, ledger_ema=0.5, shuffle=False)
    for x, _ in loader:
        loader.record_loss(x.sum(1))
        with pytest.raises(ValueError, match=r"record_loss was already called for this batch .*record each batch"):
            loader.record_loss(x.sum(1))
        with pytest.raises(ValueError, match="already called"):
            loader.record_loss(x.sum(1)[:2])  # the slow path refuses it too
    loader.ledger.synchronize()
    assert loader.ledger.record_count.tolist().count(1) == 4  # one record for each sample trained on
