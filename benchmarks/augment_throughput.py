"""Images/s of the augmentation ladder on its two paths, against no augmentation, in one run.

* batched: whole batches of float images augmented on the device (the GPU when present) with
  per-sample parameters, as the trainer does;
* workers: each sample augmented in DataLoader workers by ``CyclicalLoader`` (strength sent with
  its index), for every kernel backend (torch, torchvision, albumentations).

    .venv/bin/python benchmarks/augment_throughput.py [--ladder default] [--samples 8192] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import Dataset

from cycdata.augment_ladder.ladder import load_ladder
from cycdata.loaders.datasets import load_dataset
from cycdata.loaders.torch_loader import CyclicalLoader


def batched_rate(images: torch.Tensor, ladder, strength: float | None, batch: int, device: torch.device) -> float:
    """Images/s through uint8 -> device -> float (-> ladder) for every batch of the dataset."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = images.to(device)

    def one_pass() -> None:
        for start in range(0, len(images), batch):
            pixels = images[start : start + batch].float() / 255.0
            if strength is not None:
                pixels = ladder.apply(pixels, strength, generator)

    one_pass()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    one_pass()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - started)


def worker_rate(dataset: Dataset, ladder: str | None, backend: str, workers: int) -> float:
    options = {"ladder": ladder, "strength": 1.0, "augment_backend": backend} if ladder else {}
    loader = CyclicalLoader(dataset, epochs=4, batch_size=256, num_workers=workers, placement="workers",
                            persistent_workers=workers > 0, **options)
    for _ in loader:  # warm-up epoch: worker start-up
        pass
    started = time.perf_counter()
    count = sum(len(labels) for _, labels in loader)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ladder", default="default")
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset(f"synthetic:{args.samples}")
    ladder = load_ladder(args.ladder)
    images = data.train.images
    results: dict[str, dict[str, float]] = {"batched": {}, "workers": {}}
    results["batched"]["none"] = batched_rate(images, ladder, None, 256, device)
    for strength in (0.5, 1.0):
        results["batched"][f"strength {strength}"] = batched_rate(images, ladder, strength, 256, device)
    per_sample = data.train  # served one item at a time through placement="workers"
    results["workers"]["none"] = worker_rate(per_sample, None, "torch", args.workers)
    for backend in ("torch", "torchvision", "albumentations"):
        results["workers"][f"{backend} strength 1.0"] = worker_rate(per_sample, args.ladder, backend, args.workers)
    if args.json:
        print(json.dumps({"device": str(device), "ladder": args.ladder, **results}))
        return
    print(f"ladder {args.ladder!r}, {args.samples} synthetic 3x32x32 images, batched on {device}, "
          f"{args.workers} workers")
    for path, rates in results.items():
        baseline = rates["none"]
        for name, rate in rates.items():
            print(f"  {path:>8} {name:<28} {rate:>10.0f} img/s   ratio to no augmentation {rate / baseline:.3f}")


if __name__ == "__main__":
    main()
