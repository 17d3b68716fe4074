"""The loss ledger under torch.distributed keeps dataset indices as integers: two gloo ranks recording bf16
losses for a dataset of more than 2**24 samples end with exactly the ledger one process gets from the same
records in rank order.

Packing a batch's indices into the loss tensor's dtype to gather them in one collective (as InfoBatch does
under multi-GPU) corrupts them: in bf16, index 70001 becomes 70144; in fp16, indices above 65504 overflow; in
fp32, indices above 2**24 = 16,777,216 collapse onto their even neighbours (2**24 + 1 reads as 2**24). The
ledger gathers int64 indices beside float32 losses, so every index used here, each one that one of those
dtypes cannot hold, lands where it was recorded, bit for bit.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cycdata.ledger import LossLedger, _distributed_world

BIG = 2**24
SIZE = BIG + 4096
SHARED = BIG + 3  # recorded on both ranks (and twice on rank 1): rank order decides its value
TWICE = BIG  # recorded twice on rank 0, in two batches
NAN = math.nan

# RECORDS[round][rank]: the batches one rank records before that round's synchronize, as (indices, losses)
# with the losses given as Python floats and recorded as bf16. One batch has int32 indices.
RECORDS: list[list[list[tuple[list[int], list[float], torch.dtype]]]] = [
    [
        [
            ([0, 70001, BIG + 1, SHARED, 65505], [0.5, 1.25, 0.3, 2.0, 3.5], torch.int64),
            ([TWICE, 1, BIG - 1], [0.7, 0.9, 4.0], torch.int64),
            ([TWICE, SIZE - 1], [1.1, 0.2], torch.int64),
        ],
        [
            ([SHARED, 65504, 7], [5.0, 6.0, 0.125], torch.int64),
            ([70000, SHARED, BIG + 5], [0.01, 7.5, 9.0], torch.int32),
        ],
    ],
    [
        [([70001, 65505, 65505], [2.5, 0.75, 1.5], torch.int64)],  # a duplicate inside one batch
        [([SHARED, BIG + 5], [NAN, math.inf], torch.int64)],  # non-finite latest records
    ],
]
PROBES = [0, 1, 7, 65504, 65505, 70000, 70001, 70144, BIG - 1, BIG, BIG + 1, BIG + 2, BIG + 3, BIG + 4, BIG + 5,
          SIZE - 1]
TIMEOUT_S = 120


def bf16(value: float) -> float:
    """``value`` as recorded: rounded to bf16, read back exactly."""
    return float(torch.tensor(value, dtype=torch.bfloat16).float())


def _record(ledger: LossLedger, batches: list[tuple[list[int], list[float], torch.dtype]]) -> None:
    for indices, losses, dtype in batches:
        ledger.record(torch.tensor(indices, dtype=dtype), torch.tensor(losses, dtype=torch.bfloat16))


def _differences(name: str, got: torch.Tensor, want: torch.Tensor) -> list[str]:
    """Where two ledger tensors differ bit for bit (NaN compares equal to the same NaN), a few positions shown."""
    if got.dtype == torch.float32:
        got, want = got.view(torch.int32), want.view(torch.int32)
    if got.dtype != want.dtype or got.shape != want.shape:
        return [f"{name}: {got.dtype}{tuple(got.shape)} against {want.dtype}{tuple(want.shape)}"]
    if torch.equal(got, want):
        return []
    where = (got != want).nonzero().squeeze(1)
    shown = where[:8].tolist()
    return [f"{name}: {where.numel()} positions differ, first {shown}: got {got[shown].tolist()}, "
            f"single-process {want[shown].tolist()}"]


def _worker(rank: int, folder: str, ema: float | None) -> None:
    torch.set_num_threads(1)
    # The single-process reference, built and synchronised before the process group exists (so it gathers
    # nothing): every rank's records, rank 0's first, each round.
    assert _distributed_world() == 1
    reference = LossLedger(SIZE, ema=ema)
    for batches_of_ranks in RECORDS:
        for batches in batches_of_ranks:
            _record(reference, batches)
        reference.synchronize()
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        ledger = LossLedger(SIZE, ema=ema)
        for batches_of_ranks in RECORDS:
            _record(ledger, batches_of_ranks[rank])
            ledger.synchronize()
        world = _distributed_world()
    finally:
        torch.distributed.destroy_process_group()
    differences = []
    for name in ("losses", "seen", "record_count", "nonfinite"):
        differences += _differences(name, getattr(ledger, name), getattr(reference, name))
    if ledger.nonfinite_count != reference.nonfinite_count:
        differences.append(f"nonfinite_count: {ledger.nonfinite_count} against {reference.nonfinite_count}")
    probes = torch.tensor(PROBES)
    torch.save({
        "world": world,
        "differences": differences,
        "losses": ledger.losses.index_select(0, probes).tolist(),
        "seen": ledger.seen.index_select(0, probes).tolist(),
        "nonfinite": ledger.nonfinite.index_select(0, probes).tolist(),
        "record_count": ledger.record_count.index_select(0, probes).tolist(),
        "nonfinite_count": ledger.nonfinite_count,
    }, f"{folder}/rank{rank}.pt")


def _run_two_ranks(folder: Path, ema: float | None) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = mp.spawn(_worker, args=(str(folder), ema), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two gloo ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(folder / f"rank{rank}.pt") for rank in (0, 1)]


def _sequential(ema: float | None) -> dict[int, tuple[float, bool, bool, int]]:
    """Each probe's (loss, seen, nonfinite, finite record count) from applying the records one at a time, in
    rank order, in Python floats."""
    state: dict[int, list] = {index: [NAN, False, False, 0] for index in PROBES}
    for batches_of_ranks in RECORDS:
        for batches in batches_of_ranks:
            for indices, losses, _ in batches:
                for index, loss in zip(indices, map(bf16, losses)):
                    slot = state.setdefault(index, [NAN, False, False, 0])
                    if not math.isfinite(loss):
                        slot[2] = True
                        continue
                    old = slot[0]
                    slot[:] = [loss if ema is None or math.isnan(old) else ema * old + (1 - ema) * loss, True, False,
                               slot[3] + 1]
    return {index: tuple(state[index]) for index in PROBES}


def _none_for_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def test_the_chosen_indices_do_not_survive_packing_into_a_float_dtype() -> None:
    """The indices this file records are ones a packing gather would corrupt, so an exact result means something."""
    assert bf16(70001) == 70144
    assert math.isinf(float(torch.tensor(70001.0).half()))
    as_float32 = torch.tensor([BIG - 1, BIG, BIG + 1, BIG + 3], dtype=torch.int64).float().long().tolist()
    assert as_float32 == [BIG - 1, BIG, BIG, BIG + 4]


@pytest.mark.parametrize("ema", [None, 0.5])
def test_two_gloo_ranks_with_bf16_losses_match_the_single_process_ledger(tmp_path: Path, ema: float | None) -> None:
    ranks = _run_two_ranks(tmp_path, ema)
    expected = _sequential(ema)
    for rank, result in enumerate(ranks):
        assert result["world"] == 2, rank  # the ledger really ran distributed
        assert result["differences"] == [], (rank, result["differences"])
        assert result["nonfinite_count"] == 2
        for position, index in enumerate(PROBES):
            loss, *rest = expected[index]
            got = (result["losses"][position], result["seen"][position], result["nonfinite"][position],
                   result["record_count"][position])
            assert [_none_for_nan(got[0]), *got[1:]] == [_none_for_nan(loss), *rest], (rank, index, got)
    losses, seen = dict(zip(PROBES, ranks[0]["losses"])), dict(zip(PROBES, ranks[0]["seen"]))
    assert losses[BIG + 1] == bf16(0.3)  # recorded once, beside neighbours a float32 index cannot tell apart
    assert not seen[BIG + 2] and math.isnan(losses[BIG + 2])  # never recorded
    assert not seen[BIG + 4] and not seen[70144]  # where packed float32 / bf16 indices would have written
    assert losses[TWICE] == (bf16(1.1) if ema is None else 0.5 * bf16(0.7) + 0.5 * bf16(1.1))
    # SHARED: rank 0's 2.0, then rank 1's 5.0 and 7.5, then rank 1's NaN (not written, marks it).
    assert losses[SHARED] == (7.5 if ema is None else 0.5 * (0.5 * 2.0 + 0.5 * 5.0) + 0.5 * 7.5)
