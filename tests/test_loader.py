"""CyclicalLoader: the drop-in DataLoader with cyclical batch size, self-paced selection and SSL batches."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset, TensorDataset

from cycdata.clock import Clock
from cycdata.loaders.torch_loader import CyclicalLoader
from cycdata.samplers import SemiSupervisedBatchSampler, data_plan
from cycdata.schedules import Cyclical

N = 240


class Indexed(Dataset):
    """Items are (feature, index): a map-style dataset that is *not* in memory as tensors."""

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((2,), float(index)), index


def controlled_losses(x: torch.Tensor) -> torch.Tensor:
    """A loss we control: sample i has loss (i * 37 mod N) / N, so the easiest are known."""
    index = x[:, 0].long()
    return ((index * 37) % N).float() / N


def lowest(count: int) -> set[int]:
    ranked = sorted(range(N), key=lambda i: (i * 37) % N)
    return set(ranked[:count])


def test_a_plain_loop_switched_to_cyclical_loader_trains() -> None:
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = (x.sum(1) > 0).long()
    dataset = TensorDataset(x, y)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    # loader = DataLoader(dataset, batch_size=64, shuffle=True)              <- before
    loader = CyclicalLoader(dataset, epochs=6, batch_size={"easy": 128, "hard": 32}, keep={"easy": 0.5, "hard": 1.0})
    for _epoch in range(6):
        for inputs, targets in loader:
            losses = torch.nn.functional.cross_entropy(model(inputs), targets, reduction="none")
            loader.record_loss(losses.detach())  # <- the one added line
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
    accuracy = (model(x).argmax(1) == y).float().mean()
    assert accuracy > 0.9


def test_batches_follow_batch_size_and_keep_schedules_and_pick_lowest_losses() -> None:
    epochs = 5
    batch_size, keep = Cyclical(64, 16), Cyclical(0.5, 1.0)
    loader = CyclicalLoader(Indexed(), epochs=epochs, batch_size=batch_size, keep=keep, refresh_fraction=0.0)
    clock = Clock(epochs)
    for epoch in range(epochs):
        expected_size = round(batch_size(clock.progress(epoch)))
        expected_kept = math.ceil(keep(clock.progress(epoch)) * N)
        assert loader.num_batches(epoch) == math.ceil(expected_kept / expected_size)  # known up front
        seen: list[int] = []
        sizes = []
        for features, indices in loader:
            assert len(loader) == math.ceil(expected_kept / expected_size)  # len() describes the running epoch
            assert torch.equal(indices, loader.batch_indices)
            loader.record_loss(controlled_losses(features))
            seen += indices.tolist()
            sizes.append(len(indices))
        assert len(seen) == len(set(seen)) == expected_kept
        assert all(size == expected_size for size in sizes[:-1]) and sizes[-1] <= expected_size
        if epoch >= 2:  # by now all samples were scored (epoch 1 took every unseen one first)
            assert set(seen) == lowest(expected_kept)


def test_first_epoch_takes_a_random_share_and_unseen_samples_come_before_exclusion() -> None:
    loader = CyclicalLoader(Indexed(), epochs=4, batch_size=40, keep={"easy": 0.5, "hard": 1.0}, refresh_fraction=0.0,
                            shuffle=True)
    first = [int(i) for _, idx in _record_epoch(loader) for i in idx]
    assert len(first) == N // 2 and first != sorted(first)
    second = [int(i) for _, idx in _record_epoch(loader) for i in idx]
    never_seen = set(range(N)) - set(first)
    assert never_seen <= set(second)  # every unseen sample admitted before any seen one is excluded


def _record_epoch(loader: CyclicalLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for features, indices in loader:
        loader.record_loss(controlled_losses(features))
        batches.append((features, indices))
    return batches


def test_refresh_readmits_stale_samples_without_changing_the_count() -> None:
    loader = CyclicalLoader(Indexed(), epochs=10, batch_size=40, keep=0.5, refresh_fraction=0.25)
    for _ in range(3):
        _record_epoch(loader)
    epoch = [int(i) for _, idx in _record_epoch(loader) for i in idx]
    assert len(epoch) == N // 2
    stale = set(epoch) - lowest(N // 2)
    assert len(stale) == (N // 2) // 4  # a quarter of the excluded half re-admitted, budget-neutral
    assert loader.knobs["self_paced.refreshed"] == len(stale)


def test_yields_what_a_dataloader_yields() -> None:
    dataset = TensorDataset(torch.arange(20).float().view(10, 2), torch.arange(10))
    plain = next(iter(DataLoader(dataset, batch_size=10)))
    ours = next(iter(CyclicalLoader(dataset, epochs=2, batch_size=10)))
    assert type(ours) is type(plain) and len(ours) == len(plain)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])  # shuffle=False: index order


def test_knobs_reach_persistent_workers() -> None:
    loader = CyclicalLoader(
        Indexed(),
        epochs=3,
        batch_size={"easy": 60, "hard": 20},
        keep={"easy": 0.5, "hard": 1.0},
        num_workers=2,
        persistent_workers=True,
        refresh_fraction=0.0,
    )
    totals, sizes = [], []
    for _ in range(3):
        batches = _record_epoch(loader)
        for features, indices in batches:
            assert torch.equal(features[:, 0].long(), indices)  # the worker fetched exactly these indices
        totals.append(sum(len(idx) for _, idx in batches))
        sizes.append(max(len(idx) for _, idx in batches))
    assert totals == [N // 2, N, N // 2] and sizes == [60, 20, 60]


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_state_dict_resumes_the_same_batches(workers: int) -> None:
    def make() -> CyclicalLoader:
        options = {"num_workers": workers, "persistent_workers": True} if workers else {}
        return CyclicalLoader(
            Indexed(), epochs=4, batch_size={"easy": 48, "hard": 16}, keep={"easy": 0.5, "hard": 1.0}, seed=3, **options
        )

    reference = make()
    expected = []
    for epoch in range(3):
        for features, indices in reference:
            reference.record_loss(controlled_losses(features))
            if epoch >= 1:
                expected.append(indices.tolist())

    interrupted = make()
    _record_epoch(interrupted)
    got = []
    for step, (features, indices) in enumerate(interrupted):
        interrupted.record_loss(controlled_losses(features))
        got.append(indices.tolist())
        if step == 2:
            state = interrupted.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    for _epoch in range(2):
        for features, indices in resumed:
            resumed.record_loss(controlled_losses(features))
            got.append(indices.tolist())
    assert got == expected


def test_semi_supervised_covers_unlabeled_once_before_twice() -> None:
    labeled, unlabeled = torch.arange(20), torch.arange(20, 200)
    plan = data_plan(4, batch_size=10, unlabeled_ratio=Cyclical(1.0, 3.0))
    sampler = SemiSupervisedBatchSampler(labeled, unlabeled, plan=plan, seed=0)
    drawn: list[int] = []
    for epoch in range(4):
        for planned in sampler.batches(epoch):
            batch, count = planned.indices.tolist(), planned.labeled
            assert all(i < 20 for i in batch[:count]) and all(i >= 20 for i in batch[count:])
            drawn += batch[count:]
    first_pass = drawn[:180]
    assert sorted(first_pass) == list(range(20, 200))  # once each before any twice
    assert sampler.unlabeled.passes >= 1


def test_semi_supervised_loader_splits_batches_and_logs_coverage() -> None:
    loader = CyclicalLoader(
        Indexed(), epochs=3, batch_size=8, labeled=torch.arange(16), unlabeled_ratio={"easy": 0.0, "hard": 2.0}
    )
    ratios = []
    for _ in range(3):
        unlabeled = 0
        for features, indices in loader:
            count = loader.labeled_count
            assert count == 8 and all(i < 16 for i in indices[:count].tolist())
            loader.record_loss(controlled_losses(features[:count]))
            unlabeled += len(indices) - count
        ratios.append(unlabeled)
    assert ratios[0] == 0 and ratios[1] > 0 and ratios[2] == 0
    assert 0.0 <= loader.knobs["semi_supervised.coverage"] <= 1.0


def _ddp_worker(rank: int, world: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    loader = CyclicalLoader(
        Indexed(),
        epochs=3,
        batch_size={"easy": 40, "hard": 16},
        keep={"easy": 0.5, "hard": 1.0},
        seed=5,
        refresh_fraction=0.0,
    )
    record = []
    for _ in range(3):
        epoch = []
        for features, indices in loader:
            loader.record_loss(controlled_losses(features))
            epoch.append(indices.tolist())
        record.append(epoch)
    torch.save({"batches": record, "ledger": loader.ledger.state_dict()}, f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks_disjoint_same_counts_same_selection(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for epoch_a, epoch_b in zip(a["batches"], b["batches"]):
        assert [len(x) for x in epoch_a] == [len(x) for x in epoch_b]  # same batch count and sizes
        flat_a = {i for batch in epoch_a for i in batch}
        flat_b = {i for batch in epoch_b for i in batch}
        assert len(flat_a & flat_b) <= 1  # disjoint (one index may repeat to pad an odd count)
    # Same selection on both ranks: identical ledgers after the all-gather, and the last epoch's
    # union is the lowest-loss half.
    assert torch.equal(a["ledger"]["losses"].nan_to_num(-1), b["ledger"]["losses"].nan_to_num(-1))
    last = {i for batch in a["batches"][2] + b["batches"][2] for i in batch}
    assert len(last) == N // 2
