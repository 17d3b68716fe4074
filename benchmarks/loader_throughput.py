"""Images/s of ``CyclicalLoader`` with every data-side feature on, against a plain ``DataLoader``.

Both iterate the same dataset (synthetic 3x32x32 uint8 images, served per sample by
``__getitem__``) with the same worker count, in alternating epochs so machine noise hits both.
The cyclical loader varies its batch size (256 -> 64 -> 256), keeps a cyclical self-paced share
(0.5 -> 1.0) and records a per-sample loss for every batch; the plain one shuffles all samples
with, in each epoch, the same batch size. Target: ratio >= 0.97. A second pair compares the
in-memory fast path (no workers) with a DataLoader over the same tensors.

    .venv/bin/python benchmarks/loader_throughput.py [--samples 50000] [--workers 2] [--epochs 4] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from cycdata.loaders.datasets import load_dataset
from cycdata.loaders.torch_loader import CyclicalLoader


def run_epoch(loader: object, record: bool) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    for images, labels in loader:  # type: ignore[attr-defined]
        losses = images[:, 0, 0, :].float().mean(dim=1)  # a stand-in per-sample loss, computed by both loops
        if record:
            loader.record_loss(losses)  # type: ignore[attr-defined]
        count += len(labels)
    return count, time.perf_counter() - started


def compare(plain: DataLoader, cyclical: CyclicalLoader, epochs: int) -> dict:
    """Alternate epochs of both loaders; before each, the plain one takes the cyclical one's batch size.

    Matching the batch size isolates what the cyclical loader adds (selection, the sampler, index
    tracking, ``record_loss``) from the batch size itself, which moves a DataLoader's images/s by
    more than 3x between 64 and 256 here.
    """
    run_epoch(plain, False)  # warm-up: worker start-up, page cache
    run_epoch(cyclical, True)
    rates: dict[str, list[float]] = {"plain": [], "cyclical": []}
    batch_sizes = []
    for epoch in range(epochs):
        batch_size = int(cyclical.knobs["data.batch_size"])
        plain.batch_sampler.batch_size = batch_size  # type: ignore[union-attr]  (read again by __iter__)
        batch_sizes.append(batch_size)
        pairs = [("plain", plain, False), ("cyclical", cyclical, True)]
        for name, loader, record in pairs if epoch % 2 == 0 else reversed(pairs):
            count, seconds = run_epoch(loader, record)
            rates[name].append(count / seconds)
    ratios = [c / p for c, p in zip(rates["cyclical"], rates["plain"])]
    return {"images_per_second": {k: statistics.median(v) for k, v in rates.items()}, "all": rates,
            "batch_sizes": batch_sizes, "ratio": statistics.median(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per loader")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    data = load_dataset(f"synthetic:{args.samples}")
    # The tensors served one item at a time: placement="workers" keeps the CyclicalLoader per sample too.
    per_sample = data.train
    knobs = {"epochs": 2 * args.epochs + 2, "batch_size": {"easy": 256, "hard": 64}, "keep": {"easy": 0.5, "hard": 1.0},
             "shuffle": True, "seed": 0}
    workers = {"num_workers": args.workers, "persistent_workers": args.workers > 0}
    def plain(dataset: Dataset, **options: object) -> DataLoader:
        sampler = BatchSampler(RandomSampler(dataset), batch_size=128, drop_last=False)
        return DataLoader(dataset, batch_sampler=sampler, **options)  # type: ignore[arg-type]

    results = {
        "workers": compare(plain(per_sample, **workers),
                           CyclicalLoader(per_sample, placement="workers", **knobs, **workers), args.epochs),
        "in_memory": compare(plain(data.train), CyclicalLoader(data.train, **knobs), args.epochs),
    }
    if args.json:
        print(json.dumps(results))
        return
    print(f"{args.samples} synthetic 3x32x32 images, {args.epochs} timed epochs each, {args.workers} workers")
    for name, result in results.items():
        rates = result["images_per_second"]
        print(f"  {name:>9}: DataLoader {rates['plain']:>9.0f} img/s   CyclicalLoader {rates['cyclical']:>9.0f} img/s"
              f"   median per-epoch ratio {result['ratio']:.3f} (target >= 0.97), batch sizes {result['batch_sizes']}")


if __name__ == "__main__":
    main()
