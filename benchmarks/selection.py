"""Time self-paced selection and the loss ledger on a 10-million-sample dataset (CPU).

Figures: :func:`cycdata.selection.select` (keep = 0.5, every sample seen, default refresh) with hard
and with linear weighting, and :meth:`cycdata.ledger.LossLedger.synchronize` applying 10 million
records (one epoch: every index once; and with EMA and random, repeating indices). Each is the
median of 3 runs, printed with its ratio to the 1 s target.

    .venv/bin/python benchmarks/selection.py [--size 10000000] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from cycdata.ledger import LossLedger
from cycdata.selection import select

TARGET_S = 1.0


def median_time(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ledger_with_records(size: int, indices: torch.Tensor, losses: torch.Tensor, ema: float | None,
                        batch: int = 1 << 16) -> LossLedger:
    """A fresh ledger with ``indices``/``losses`` queued in training-sized batches."""
    ledger = LossLedger(size, ema=ema)
    for start in range(0, len(indices), batch):
        ledger.record(indices[start : start + batch], losses[start : start + batch])
    return ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args()
    size, repeats = args.size, args.repeats
    generator = torch.Generator().manual_seed(0)
    losses = torch.rand(size, generator=generator) * 3.0
    seen = torch.ones(size, dtype=torch.bool)
    figures: dict[str, float] = {}
    for weighting in ("hard", "linear"):
        figures[f"select keep=0.5 {weighting}"] = median_time(
            lambda weighting=weighting: select(losses, seen, keep=0.5, weighting=weighting), repeats)

    epoch = torch.randperm(size, generator=generator)
    random_indices = torch.randint(size, (size,), generator=generator)
    cases = {"synchronize epoch (each index once)": (epoch, None),
             "synchronize epoch, ema=0.9": (epoch, 0.9),
             "synchronize random indices (repeats), ema=0.9": (random_indices, 0.9)}
    for name, (indices, ema) in cases.items():
        times = []
        for _ in range(repeats):
            ledger = ledger_with_records(size, indices, losses, ema)  # recording is not timed
            start = time.perf_counter()
            ledger.synchronize()
            times.append(time.perf_counter() - start)
        figures[name] = statistics.median(times)

    if args.json:
        print(json.dumps({"size": size, "threads": torch.get_num_threads(), "seconds": figures}))
        return
    print(f"size {size:,}, {torch.get_num_threads()} threads, median of {repeats}, target {TARGET_S:g} s")
    for name, seconds in figures.items():
        print(f"{name:48s} {seconds:7.3f} s   {seconds / TARGET_S:5.2f} x target")


if __name__ == "__main__":
    main()
