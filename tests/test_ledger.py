"""The loss ledger: record/synchronize semantics, EMA, non-finite losses, duplicates, state, DDP (2 gloo ranks)."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings

from cycdata.ledger import LossLedger

NAN = math.nan


def values(ledger: LossLedger) -> list[float]:
    """The ledger's losses with NaN as None, so lists compare with ==."""
    return [None if math.isnan(v) else v for v in ledger.losses.tolist()]


def test_records_apply_only_at_synchronize_and_latest_wins() -> None:
    ledger = LossLedger(5)
    ledger.record(torch.tensor([0, 3]), torch.tensor([0.5, 2.0]))
    assert ledger.pending_records == 2 and ledger.num_seen() == 0  # queued, not applied
    ledger.synchronize()
    assert values(ledger) == [0.5, None, None, 2.0, None]
    assert ledger.seen.tolist() == [True, False, False, True, False]
    ledger.record(torch.tensor([3]), torch.tensor([1.0]))
    ledger.synchronize()
    assert values(ledger) == [0.5, None, None, 1.0, None]
    assert ledger.record_count.tolist() == [1, 0, 0, 2, 0] and ledger.record_count.dtype == torch.int32
    assert ledger.num_seen() == 2 and len(ledger) == 5 and ledger.pending_records == 0
    assert ledger.losses.dtype == torch.float32 and ledger.seen.dtype == torch.bool


def test_synchronize_without_records_changes_nothing() -> None:
    ledger = LossLedger(3)
    ledger.synchronize()
    assert ledger.num_seen() == 0 and ledger.nonfinite_count == 0


def test_ema_first_record_as_is_then_blends() -> None:
    ledger = LossLedger(2, ema=0.75)
    ledger.record(torch.tensor([0]), torch.tensor([4.0]))
    ledger.synchronize()
    assert values(ledger) == [4.0, None]  # a first record is not blended with "nothing"
    ledger.record(torch.tensor([0, 1]), torch.tensor([8.0, 2.0]))
    ledger.synchronize()
    assert values(ledger) == [0.75 * 4.0 + 0.25 * 8.0, 2.0]


def test_nonfinite_losses_are_ignored_and_counted() -> None:
    ledger = LossLedger(4)
    ledger.record(torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    ledger.synchronize()
    ledger.record(torch.tensor([0, 1, 2, 3]), torch.tensor([NAN, math.inf, -math.inf, 3.0]))
    ledger.synchronize()
    assert values(ledger) == [1.0, 1.0, None, 3.0]  # old values kept, nothing written for 2
    assert ledger.nonfinite_count == 3
    assert ledger.record_count.tolist() == [1, 1, 0, 1]  # only finite records count
    ledger.record(torch.tensor([2]), torch.tensor([NAN]))
    ledger.synchronize()
    assert ledger.nonfinite_count == 4


def test_duplicates_in_one_synchronize_last_record_wins() -> None:
    ledger = LossLedger(3)
    ledger.record(torch.tensor([1, 1, 2]), torch.tensor([5.0, 6.0, 1.0]))
    ledger.record(torch.tensor([1, 2]), torch.tensor([7.0, NAN]))  # the NaN does not displace 1.0
    ledger.synchronize()
    assert values(ledger) == [None, 7.0, 1.0]
    assert ledger.record_count.tolist() == [0, 3, 1]


def test_ema_duplicates_are_sequential_steps() -> None:
    ledger = LossLedger(2, ema=0.5)
    ledger.record(torch.tensor([0, 0, 1, 0]), torch.tensor([4.0, 2.0, 9.0, 6.0]))
    ledger.synchronize()
    assert values(ledger) == [0.5 * (0.5 * 4.0 + 0.5 * 2.0) + 0.5 * 6.0, 9.0]


records = st.lists(st.tuples(st.integers(0, 7), st.floats(0.0, 10.0, width=32) | st.just(NAN)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(records=records, ema=st.none() | st.sampled_from([0.0, 0.3, 0.9]), batch=st.integers(1, 7))
def test_one_synchronize_equals_one_record_at_a_time(records: list[tuple[int, float]], ema: float | None,
                                                     batch: int) -> None:
    """Sequential semantics: the result does not depend on how records are batched or synchronised."""
    stepwise, batched = LossLedger(8, ema=ema), LossLedger(8, ema=ema)
    expected = [NAN] * 8
    for index, loss in records:
        stepwise.record(torch.tensor([index]), torch.tensor([loss]))
        stepwise.synchronize()
        if math.isfinite(loss):
            old = expected[index]
            expected[index] = loss if ema is None or math.isnan(old) else ema * old + (1 - ema) * loss
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        batched.record(torch.tensor([i for i, _ in chunk]), torch.tensor([v for _, v in chunk]))
    batched.synchronize()
    want = torch.tensor(expected, dtype=torch.float32)
    assert torch.allclose(stepwise.losses, want, rtol=1e-5, equal_nan=True)
    assert torch.allclose(batched.losses, want, rtol=1e-5, equal_nan=True)
    if ema is None:
        assert torch.equal(batched.losses.nan_to_num(-1), stepwise.losses.nan_to_num(-1))
    assert torch.equal(batched.record_count, stepwise.record_count)
    assert torch.equal(batched.seen, ~want.isnan())
    assert batched.nonfinite_count == stepwise.nonfinite_count == sum(math.isnan(v) for _, v in records)


def test_long_duplicate_runs_match_the_sequential_ema() -> None:
    generator = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 5, (3000,), generator=generator)
    losses = torch.rand(3000, generator=generator, dtype=torch.float64)
    ledger = LossLedger(5, ema=0.99)
    ledger.record(indices, losses)
    ledger.synchronize()
    expected = [NAN] * 5
    for index, loss in zip(indices.tolist(), losses.tolist()):
        old = expected[index]
        expected[index] = loss if math.isnan(old) else 0.99 * old + 0.01 * loss
    assert torch.allclose(ledger.losses, torch.tensor(expected, dtype=torch.float32), rtol=1e-4)


def test_record_detaches_casts_and_copies() -> None:
    ledger = LossLedger(4)
    losses = torch.tensor([0.25, 0.5], dtype=torch.bfloat16, requires_grad=True) * 2
    indices = torch.tensor([1, 2], dtype=torch.int32)
    ledger.record(indices, losses)
    scratch = torch.tensor([1.0, 2.0])
    ledger.record(torch.tensor([3, 0]), scratch)
    scratch.fill_(99.0)  # edited after recording: the ledger keeps what it was given
    ledger.synchronize()
    assert values(ledger) == [2.0, 0.5, 1.0, 1.0]
    assert not ledger.losses.requires_grad


def test_common_case_record_also_detaches_and_copies() -> None:
    """int64 indices and float32 losses on the ledger's device take the short path: the same guarantees."""
    ledger = LossLedger(4)
    losses = torch.tensor([0.25, 0.5], requires_grad=True) * 2
    ledger.record(torch.tensor([1, 2]), losses)
    scratch, indices = torch.tensor([1.0, 2.0]), torch.tensor([3, 0])
    ledger.record(indices, scratch)
    scratch.fill_(99.0)
    indices.fill_(1)  # copied too (copy_indices defaults to True)
    ledger.synchronize()
    assert values(ledger) == [2.0, 0.5, 1.0, 1.0]
    assert not ledger.losses.requires_grad


def test_many_passes_of_duplicates_keep_the_last_record() -> None:
    """Records of several passes over one epoch (every index several times): the last pass wins, counts add up."""
    generator = torch.Generator().manual_seed(4)
    ledger = LossLedger(1000)
    expected = torch.full((1000,), NAN)
    for _ in range(3):
        order = torch.randperm(1000, generator=generator)[:700]
        losses = torch.rand(700, generator=generator)
        for start in range(0, 700, 64):
            ledger.record(order[start : start + 64], losses[start : start + 64], copy_indices=False)
        expected[order] = losses
    ledger.synchronize()
    assert torch.equal(ledger.losses.nan_to_num(-1.0), expected.nan_to_num(-1.0))
    assert int(ledger.record_count.sum()) == 2100 and torch.equal(ledger.seen, ~expected.isnan())


def test_record_does_no_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Structural check: record() must not read a tensor's values (item/tolist/bool/int/float/nonzero)."""
    ledger = LossLedger(10)
    indices, losses = torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2, 0.3])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("record() read a tensor value on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "any", "all"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    ledger.record(indices, losses)
    monkeypatch.undo()
    ledger.synchronize()
    assert ledger.num_seen() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ledger_device", ["cpu", "cuda"])
def test_record_with_cuda_losses_does_not_synchronise(ledger_device: str) -> None:
    ledger = LossLedger(100, ema=0.5, device=ledger_device)
    losses = torch.rand(32, device="cuda")
    indices = torch.arange(32)  # from the DataLoader: CPU
    cuda_indices = indices.cuda()  # a blocking copy: made before the check starts
    previous = torch.cuda.get_sync_debug_mode()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "a prototype feature" notice
            torch.cuda.set_sync_debug_mode("error")
        for _ in range(3):
            ledger.record(indices, losses)
            ledger.record(cuda_indices, losses * 2)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    ledger.synchronize()
    assert ledger.num_seen() == 32 and ledger.losses.device.type == ledger_device


def test_record_refuses_bad_shapes_and_dtypes() -> None:
    ledger = LossLedger(4)
    with pytest.raises(ValueError, match="reduction='none'"):
        ledger.record(torch.tensor([0, 1]), torch.tensor([[0.1], [0.2]]))
    with pytest.raises(ValueError, match="same length"):
        ledger.record(torch.tensor([0, 1]), torch.tensor([0.1]))
    with pytest.raises(TypeError, match="integer"):
        ledger.record(torch.tensor([0.0, 1.0]), torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="floating"):
        ledger.record(torch.tensor([0, 1]), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="tensors"):
        ledger.record([0, 1], torch.tensor([0.1, 0.2]))  # type: ignore[arg-type]
    assert ledger.pending_records == 0


@pytest.mark.parametrize("index", [-1, 4])
def test_out_of_range_index_fails_at_synchronize_and_leaves_the_ledger(index: int) -> None:
    ledger = LossLedger(4)
    ledger.record(torch.tensor([0]), torch.tensor([1.0]))
    ledger.synchronize()
    ledger.record(torch.tensor([1, index]), torch.tensor([1.0, 2.0]))
    with pytest.raises(IndexError, match="size 4"):
        ledger.synchronize()
    assert values(ledger) == [1.0, None, None, None] and ledger.pending_records == 0


@pytest.mark.parametrize(("size", "ema"), [(0, None), (-3, None), (2.5, None), (True, None), (4, 1.0), (4, -0.1),
                                           (4, NAN)])
def test_constructor_refuses_bad_arguments(size: object, ema: float | None) -> None:
    with pytest.raises(ValueError, match=r"size|ema"):
        LossLedger(size, ema=ema)  # type: ignore[arg-type]


def test_state_dict_round_trip_including_pending() -> None:
    ledger = LossLedger(6, ema=0.5)
    ledger.record(torch.tensor([0, 1, 2]), torch.tensor([1.0, NAN, 3.0]))
    ledger.synchronize()
    ledger.record(torch.tensor([2, 4]), torch.tensor([5.0, 6.0]))  # still pending
    state = ledger.state_dict()
    assert state["version"] == 1 and state["size"] == 6 and state["ema"] == 0.5
    assert state["nonfinite_count"] == 1 and state["pending_indices"].tolist() == [2, 4]
    restored = LossLedger(6, ema=0.5)
    restored.load_state_dict(state)
    state["losses"][0] = 99.0  # the restored ledger owns its tensors
    for one in (ledger, restored):
        one.synchronize()
    assert values(restored) == values(ledger) == [1.0, None, 4.0, None, 6.0, None]
    assert torch.equal(restored.record_count, ledger.record_count) and torch.equal(restored.seen, ledger.seen)
    assert restored.nonfinite_count == 1


def test_state_dict_is_plain_cpu_tensors() -> None:
    state = LossLedger(3).state_dict()
    assert all(value.device.type == "cpu" for value in state.values() if isinstance(value, torch.Tensor))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.update(version=2), "version 2"),
        (lambda s: s.update(size=7), "7 samples"),
        (lambda s: s.update(ema=0.9), "ema=0.9"),
        (lambda s: s.pop("record_count"), "lacks"),
        (lambda s: s.update(losses=torch.zeros(4)), "shape"),
        (lambda s: s.update(seen=torch.ones(6, dtype=torch.bool)), "inconsistent"),
        (lambda s: s.update(pending_losses=torch.zeros(3)), "pending"),
    ],
)
def test_load_state_dict_refuses_what_does_not_fit(change, message: str) -> None:  # type: ignore[no-untyped-def]
    state = LossLedger(6).state_dict()
    change(state)
    with pytest.raises(ValueError, match=message):
        LossLedger(6).load_state_dict(state)
    with pytest.raises(ValueError, match="dict"):
        LossLedger(6).load_state_dict([1, 2])  # type: ignore[arg-type]


def test_to_moves_in_place_and_returns_the_ledger() -> None:
    ledger = LossLedger(3)
    ledger.record(torch.tensor([1]), torch.tensor([2.0]))
    assert ledger.to("cpu") is ledger
    ledger.synchronize()
    assert values(ledger) == [None, 2.0, None] and "size=3" in repr(ledger)


# --------------------------------------------------------------------------------------------
# Two gloo processes
# --------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=2)
    try:
        ledger = LossLedger(8, ema=None)
        if rank == 0:
            ledger.record(torch.tensor([0, 1, 5]), torch.tensor([0.0, 0.1, 0.5]))
        else:
            ledger.record(torch.tensor([2, 5]), torch.tensor([1.2, 1.5]))  # index 5 on both ranks
            ledger.record(torch.tensor([3]), torch.tensor([NAN]))
        ledger.synchronize()
        # Second round: lengths differ, rank 1 has nothing to send.
        if rank == 0:
            ledger.record(torch.tensor([6, 7, 0, 1]), torch.tensor([0.6, 0.7, 0.05, 0.15]))
        ledger.synchronize()
        torch.save(ledger.state_dict(), f"{folder}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks_end_with_identical_ledgers(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    for key in ("losses", "seen", "record_count"):
        assert torch.equal(a[key].nan_to_num(-1.0), b[key].nan_to_num(-1.0)), key
    assert a["nonfinite_count"] == b["nonfinite_count"] == 1
    expected = torch.tensor([0.05, 0.15, 1.2, NAN, NAN, 1.5, 0.6, 0.7])  # rank 1 applied after rank 0 for index 5
    assert torch.allclose(a["losses"], expected, equal_nan=True)
    assert a["record_count"].tolist() == [2, 2, 1, 0, 0, 2, 1, 1]
