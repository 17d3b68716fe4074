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

import math
from collections.abc import Iterator

import torch

__all__ = ["ShuffledBatchSampler", "epoch_generator"]


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, stream): the same everywhere, independent of the global RNG.

    Example:
        >>> a = torch.randperm(5, generator=epoch_generator(0, 3))
        >>> b = torch.randperm(5, generator=epoch_generator(0, 3))
        >>> bool((a == b).all())
        True
    """
    generator = torch.Generator()
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
