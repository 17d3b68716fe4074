"""Batch samplers: rank-aware, seeded per (seed, epoch), no global RNG.

Every rank derives the same permutation from the same seed and epoch, then takes its own
strided share, like ``torch.utils.data.DistributedSampler``; so a resumed run (or another rank)
recomputes the order instead of restoring it.

Example:
    >>> sampler = ShuffledBatchSampler(10, batch_size=4, seed=0)
    >>> sampler.set_epoch(0)
    >>> [len(batch) for batch in sampler], len(sampler)
    ([4, 4, 2], 3)
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cycdata.clock import Clock
from cycdata.ledger import LossLedger
from cycdata.schedules import Schedule, as_schedule
from cycdata.selection import select

__all__ = ["CyclicalBatchSampler", "EpochPlan", "IndexStream", "SemiSupervisedBatchSampler", "ShuffledBatchSampler",
           "epoch_generator"]


def epoch_generator(seed: int, epoch: int, stream: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, stream): the same everywhere, independent of the global RNG.

    Example:
        >>> a = torch.randperm(5, generator=epoch_generator(0, 3))
        >>> b = torch.randperm(5, generator=epoch_generator(0, 3))
        >>> bool((a == b).all())
        True
    """
    generator = torch.Generator(device=device)
    # Mix the three numbers so neighbouring seeds and epochs do not give related streams.
    generator.manual_seed((seed * 1_000_003 + epoch * 10_007 + stream * 101 + 12345) % (2**63 - 1))
    return generator


class ShuffledBatchSampler:
    """Yields lists of dataset indices; a new seeded shuffle each epoch, this rank's share only.

    Args:
        size: dataset length.
        batch_size: samples per batch on this rank.
        seed: run seed.
        rank: this process's rank; world_size: number of processes. Every rank gets the same
            number of samples (the permutation wraps around to pad, as DistributedSampler does).
        shuffle: shuffle each epoch (False: dataset order, for evaluation).
        drop_last: drop the last incomplete batch.
        pad: give every rank the same number of samples by wrapping around (training, where
            ranks step together); ``False`` splits exactly, each sample once (evaluation).
    """

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False, pad: bool = True) -> None:
        if size <= 0 or batch_size <= 0:
            raise ValueError(f"need size > 0 and batch_size > 0, got size={size}, batch_size={batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.pad = pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def samples_per_rank(self) -> int:
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def indices(self) -> torch.Tensor:
        """This rank's indices for the current epoch, in order."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=epoch_generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.size)
        total = self.samples_per_rank * self.world_size
        if self.pad and total > self.size:
            order = torch.cat([order, order[: total - self.size]])
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        indices = self.indices().tolist()
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            if self.drop_last and len(batch) < self.batch_size:
                return
            yield batch

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return math.ceil(self.samples_per_rank / self.batch_size)


# --------------------------------------------------------------------------------------------
# Cyclical batch sampler: batch size and self-paced selection follow the plan
# --------------------------------------------------------------------------------------------


def default_rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Rank and world size from the arguments, else from the initialised process group, else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size() if world_size is None else world_size
        return (dist.get_rank() if rank is None else rank), world
    return (rank or 0), (world_size or 1)


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch trains on, the same on every rank except ``order`` (this rank's share).

    Attributes:
        epoch: the epoch.
        batch_size: samples per batch on this rank.
        order: this rank's dataset indices in training order (int64).
        weights: dense per-dataset-index sample weights (float32 [N]; 0 = excluded), or None when
            every sample weighs 1.
        kept: samples selected for the epoch (over all ranks, before padding).
        threshold: the self-paced loss threshold in effect (nan without self-paced selection).
        unseen: never-scored samples admitted; refreshed: stale samples re-admitted.
    """

    epoch: int
    batch_size: int
    order: torch.Tensor
    weights: torch.Tensor | None = None
    kept: int = 0
    threshold: float = math.nan
    unseen: int = 0
    refreshed: int = 0

    def num_batches(self, drop_last: bool = False) -> int:
        count = len(self.order)
        return count // self.batch_size if drop_last else math.ceil(count / self.batch_size)


class CyclicalBatchSampler:
    """A batch sampler whose batch size and sample selection follow cyclical schedules.

    Each epoch (in the main process, before any index reaches a worker): the batch size is
    ``round(batch_size(t))``; with self-paced selection (``keep`` or ``threshold``) the samples are
    chosen from the loss ledger by :func:`cycdata.selection.select` (unseen samples first, a refresh
    share of stale ones); the kept set is shuffled with a generator seeded from (seed, epoch) and
    split across ranks. Every rank derives the same selection, batch size and batch count.

    Args:
        size: dataset length.
        clock: the run's clock (maps the epoch to progress t).
        batch_size: schedule of the per-rank batch size.
        keep: schedule of the kept fraction in (0, 1], or None.
        threshold: schedule of an absolute loss threshold, or None (exclusive with ``keep``).
        weighting: ``hard``, ``linear``, ``log`` or ``mixture`` (SPEC.md §10).
        labels: per-sample labels for per-class selection (``per_class``), or None.
        ledger: the loss ledger; created on demand when selection is on.
        refresh_fraction: share of excluded samples re-admitted each epoch to refresh their loss.
        seed, rank, world_size, drop_last: as for ``torch.utils.data.DistributedSampler``.

    Example:
        >>> from cycdata.clock import Clock
        >>> from cycdata.schedules import Cyclical
        >>> sampler = CyclicalBatchSampler(1000, clock=Clock(5), batch_size=Cyclical(256, 64))
        >>> [sampler.plan(e).batch_size for e in range(5)]
        [256, 160, 64, 160, 256]
        >>> sampler.set_epoch(2); len(sampler)
        16
    """

    def __init__(self, size: int, *, clock: Clock, batch_size: Schedule | int, keep: Schedule | None = None,
                 threshold: Schedule | None = None, weighting: str = "hard", labels: torch.Tensor | None = None,
                 ledger: LossLedger | None = None, refresh_fraction: float = 0.05, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False) -> None:
        if size <= 0:
            raise ValueError(f"need a non-empty dataset, got size={size}")
        if keep is not None and threshold is not None:
            raise ValueError("give at most one of keep (a kept fraction) and threshold (a loss value)")
        self.size = size
        self.clock = clock
        self.batch_size = as_schedule(batch_size)
        self.keep = keep
        self.threshold = threshold
        self.weighting = weighting
        self.labels = labels
        self.refresh_fraction = refresh_fraction
        self.seed = seed
        self.rank, self.world_size = default_rank_and_world(rank, world_size)
        self.drop_last = drop_last
        self.selecting = keep is not None or threshold is not None
        self.ledger = ledger if ledger is not None or not self.selecting else LossLedger(size)
        self.epoch = 0
        self._plans: dict[int, EpochPlan] = {}
        self._skip = 0
        self.yielded: collections.deque[list[int]] = collections.deque()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_size_at(self, epoch: int) -> int:
        value = round(self.batch_size(self.clock.progress(epoch)))
        if value < 1:
            raise ValueError(f"the batch-size schedule gives {value} at epoch {epoch}; it must stay >= 1")
        return value

    def _select(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        if not self.selecting:
            return torch.arange(self.size), None, {"kept": self.size}
        assert self.ledger is not None
        t = self.clock.progress(epoch)
        keep = None if self.keep is None else min(1.0, max(1e-9, float(self.keep(t))))
        threshold = None if self.threshold is None else float(self.threshold(t))
        selection = select(
            self.ledger.losses.cpu(), self.ledger.seen.cpu(), keep=keep, threshold=threshold,
            weighting=self.weighting, labels=self.labels, refresh_fraction=self.refresh_fraction,
            generator=epoch_generator(self.seed, epoch, stream=1))
        weights = None
        if self.weighting != "hard":
            weights = torch.zeros(self.size, dtype=torch.float32)
            weights[selection.indices] = selection.weights
        stats = {"kept": len(selection.indices), "threshold": selection.threshold, "unseen": selection.unseen,
                 "refreshed": selection.refreshed}
        return selection.indices, weights, stats

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan, computed once (from the ledger as it stands) and then fixed."""
        if epoch not in self._plans:
            selected, weights, stats = self._select(epoch)
            shuffled = selected[torch.randperm(len(selected), generator=epoch_generator(self.seed, epoch))]
            per_rank = math.ceil(len(shuffled) / self.world_size)
            padded = torch.cat([shuffled, shuffled[: per_rank * self.world_size - len(shuffled)]])
            self._plans = {epoch: EpochPlan(epoch=epoch, batch_size=self.batch_size_at(epoch),
                                            order=padded[self.rank :: self.world_size], weights=weights, **stats)}
        return self._plans[epoch]

    def restore_plan(self, plan: EpochPlan, skip_batches: int) -> None:
        """Resume inside an epoch: use ``plan`` and start the next iteration after ``skip_batches``."""
        self._plans = {plan.epoch: plan}
        self.epoch = plan.epoch
        self._skip = skip_batches

    @property
    def samples_per_epoch(self) -> int:
        """This rank's samples in the current epoch (what the per-step clock divides by)."""
        return len(self.plan(self.epoch).order)

    def __len__(self) -> int:
        return self.plan(self.epoch).num_batches(self.drop_last)

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches(as_tensors=False)  # type: ignore[return-value]

    def batches(self, as_tensors: bool = True) -> Iterator[list[int] | torch.Tensor]:
        """The epoch's batches; as int64 tensors (for loaders that index tensors) or lists (DataLoader)."""
        plan = self.plan(self.epoch)
        order = plan.order if as_tensors else plan.order.tolist()
        skip, self._skip = self._skip, 0
        self.yielded.clear()
        for number in range(skip, plan.num_batches(self.drop_last)):
            batch = order[number * plan.batch_size : (number + 1) * plan.batch_size]
            self.yielded.append(batch)  # the loader pops these as the DataLoader hands batches over
            yield batch


# --------------------------------------------------------------------------------------------
# Semi-supervised: a labeled and an unlabeled stream, the unlabeled share cyclical
# --------------------------------------------------------------------------------------------


class IndexStream:
    """An endless stream over ``pool`` for one rank: pass k is a seeded permutation, so every
    sample is seen once before any is seen twice. Its state is two integers.

    Example:
        >>> stream = IndexStream(torch.arange(5), seed=0, stream=7)
        >>> sorted(stream.take(5).tolist()), stream.passes, stream.coverage
        ([0, 1, 2, 3, 4], 1, 1.0)
    """

    def __init__(self, pool: torch.Tensor, *, seed: int, stream: int, rank: int = 0, world_size: int = 1) -> None:
        if len(pool) == 0:
            raise ValueError("an index stream needs a non-empty pool")
        self.pool = pool
        self.seed, self.stream, self.rank, self.world_size = seed, stream, rank, world_size
        self.passes = 0
        self.position = 0
        self._share = self._pass_share(0)

    def _pass_share(self, number: int) -> torch.Tensor:
        order = self.pool[torch.randperm(len(self.pool), generator=epoch_generator(self.seed, number, self.stream))]
        per_rank = math.ceil(len(order) / self.world_size)
        order = torch.cat([order, order[: per_rank * self.world_size - len(order)]])
        return order[self.rank :: self.world_size]

    def take(self, count: int) -> torch.Tensor:
        parts = []
        while count > 0:
            available = len(self._share) - self.position
            step = min(count, available)
            parts.append(self._share[self.position : self.position + step])
            self.position += step
            count -= step
            if self.position == len(self._share):
                self.passes += 1
                self.position = 0
                self._share = self._pass_share(self.passes)
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)

    @property
    def coverage(self) -> float:
        """Share of this rank's pool seen in the current pass (1.0 once a pass completes)."""
        return 1.0 if self.passes > 0 and self.position == 0 else self.position / len(self._share)

    def state_dict(self) -> dict[str, int]:
        return {"passes": self.passes, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.passes, self.position = int(state["passes"]), int(state["position"])
        self._share = self._pass_share(self.passes)


class SemiSupervisedBatchSampler:
    """Each step: a labeled batch of ``batch_size(t)`` followed by ``round(ratio(t)·batch)`` unlabeled
    indices. An epoch has as many steps as a supervised epoch over all the training data would.

    The loader reads ``labeled_counts`` to split each yielded batch into its two parts.

    Example:
        >>> from cycdata.clock import Clock
        >>> from cycdata.schedules import Cyclical
        >>> sampler = SemiSupervisedBatchSampler(torch.arange(10), torch.arange(10, 100), clock=Clock(3),
        ...                                      batch_size=10, ratio=Cyclical(0.0, 2.0))
        >>> sampler.set_epoch(1)
        >>> [len(batch) for batch in sampler]
        [30, 30, 30, 30, 30, 30, 30, 30, 30, 30]
    """

    def __init__(self, labeled: torch.Tensor, unlabeled: torch.Tensor, *, clock: Clock, batch_size: Schedule | int,
                 ratio: Schedule | float, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.clock = clock
        self.batch_size = as_schedule(batch_size)
        self.ratio = as_schedule(ratio)
        self.seed = seed
        self.rank, self.world_size = default_rank_and_world(rank, world_size)
        self.labeled = IndexStream(labeled, seed=seed, stream=2, rank=self.rank, world_size=self.world_size)
        self.unlabeled = IndexStream(unlabeled, seed=seed, stream=3, rank=self.rank, world_size=self.world_size)
        self.total = len(labeled) + len(unlabeled)
        self.epoch = 0
        self._skip = 0
        self.yielded: collections.deque[list[int]] = collections.deque()
        self.labeled_counts: collections.deque[int] = collections.deque()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batch_size_at(self, epoch: int) -> int:
        return max(1, round(self.batch_size(self.clock.progress(epoch))))

    def ratio_at(self, epoch: int, fraction: float = 0.0) -> float:
        return max(0.0, float(self.ratio(self.clock.progress(epoch, fraction))))

    def __len__(self) -> int:
        return math.ceil(self.total / (self.batch_size_at(self.epoch) * self.world_size))

    @property
    def samples_per_epoch(self) -> int:
        return len(self) * self.batch_size_at(self.epoch)

    def __iter__(self) -> Iterator[list[int]]:
        return self.batches(as_tensors=False)  # type: ignore[return-value]

    def batches(self, as_tensors: bool = True) -> Iterator[list[int] | torch.Tensor]:
        """The epoch's batches (labeled part first); as int64 tensors or lists (DataLoader)."""
        batch_size, steps = self.batch_size_at(self.epoch), len(self)
        skip, self._skip = self._skip, 0
        self.epoch_start_state = self.state_dict()  # what a mid-epoch resume replays from
        self.yielded.clear()
        self.labeled_counts.clear()
        for step in range(steps):
            labeled = self.labeled.take(batch_size)
            unlabeled = self.unlabeled.take(round(self.ratio_at(self.epoch, step / steps) * batch_size))
            if step < skip:  # replaying the batches consumed before the resume, to restore the streams
                continue
            batch = torch.cat([labeled, unlabeled])
            batch = batch if as_tensors else batch.tolist()
            self.yielded.append(batch)
            self.labeled_counts.append(len(labeled))
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict()}

    def load_state_dict(self, state: dict[str, Any], skip_batches: int = 0) -> None:
        self.epoch = int(state["epoch"])
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])
        self._skip = skip_batches
