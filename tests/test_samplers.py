"""Rank-aware, seeded batch samplers."""

from __future__ import annotations

from cycdata.samplers import ShuffledBatchSampler


def test_sampler_ranks_partition_the_epoch() -> None:
    ranks = [ShuffledBatchSampler(10, 3, seed=1, rank=r, world_size=3) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(5)
    shares = [sampler.indices().tolist() for sampler in ranks]
    assert all(len(share) == 4 for share in shares)  # padded to equal length
    assert set().union(*map(set, shares)) == set(range(10))
    exact = [ShuffledBatchSampler(10, 3, shuffle=False, pad=False, rank=r, world_size=3) for r in range(3)]
    assert sorted(i for sampler in exact for i in sampler.indices().tolist()) == list(range(10))
    assert [s.samples_per_rank for s in exact] == [4, 3, 3] and [len(s) for s in exact] == [2, 1, 1]
    again = ShuffledBatchSampler(10, 3, seed=1, rank=0, world_size=3)
    again.set_epoch(5)
    assert again.indices().tolist() == shares[0]  # recomputed, not remembered
