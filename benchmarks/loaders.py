"""Images/s of every way cycdata feeds batches, on the same data in one run, cyclical features off and on.

Datasets: synthetic 3x32x32 images stored raw, the same stored as JPEG, and the embedded MNIST
(mnist5k, 4,000 1x32x32 training digits). Paths:

* ``dataloader``: a plain per-sample ``torch.utils.data.DataLoader`` (workers, default collate; JPEG
  decoded per sample with ``torchvision.io.decode_jpeg``), the baseline;
* ``torch``: ``CyclicalLoader(placement="workers")`` over the same per-sample dataset;
* ``ffcv``: ``CyclicalLoader(NAME.beton, placement="ffcv")``, ffcv decoding with as many threads;
* ``device``: ``CyclicalLoader(placement="device")``, the split decoded once into one tensor;
* ``indexing``: plain in-memory tensor indexing with a random permutation, the ceiling.

Variants: "plain" reads all the data with the batch size of the epoch; "on" adds a cyclical batch
size (256 -> 64 -> 256), a cyclical self-paced share (keep 0.5 -> 1.0) chosen by loss and
``record_loss`` after every batch; "off" delivers, each epoch, as many samples as "on" in batches of
the same size (a random share, see ``measure_path``), so "on"/"off" isolates what the cyclical
features cost from what the batch size and the epoch length do by themselves (the batch size moves a
DataLoader's images/s more than 3x between 64 and 256). Paths are compared with "plain". Epochs of
the variants alternate, so machine noise hits all of them.
Targets (2-core CPU): ffcv raw >= 5x the DataLoader; device
>= 0.8x indexing; on/off >= 0.95 on every path.

    .venv/bin/python benchmarks/loaders.py [--samples 50000] [--workers 2] [--datasets raw jpeg mnist] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from loader_throughput import run_epoch  # the same timed loop (benchmarks run as scripts from this folder)
from torch.utils.data import DataLoader, Dataset
from torchvision.io import decode_jpeg, encode_jpeg

from cycdata.clock import Clock
from cycdata.loaders.datasets import TensorImageDataset, load_dataset
from cycdata.loaders.ffcv_loader import BetonDataset, convert
from cycdata.loaders.torch_loader import CyclicalLoader
from cycdata.schedules import as_schedule

EPOCHS = 5  # batch size 256, 160, 64, 160, 256; keep 0.5, 0.75, 1.0, 0.75, 0.5
ON = {"epochs": EPOCHS, "batch_size": {"easy": 256, "hard": 64}, "keep": {"easy": 0.5, "hard": 1.0}}
JPEG_QUALITY = 90


class PerSampleJpeg(Dataset):
    """JPEG bytes decoded per sample, as an image-file dataset does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.encoded = [encode_jpeg(image, quality=JPEG_QUALITY) for image in images]
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return decode_jpeg(self.encoded[index]), int(self.targets[index])


class TensorIndexing:
    """The ceiling: a random permutation and one ``index_select`` per batch, nothing else."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.generator = torch.Generator().manual_seed(0)

    def __iter__(self):  # type: ignore[no-untyped-def]
        order = torch.randperm(len(self.labels), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start : start + self.batch_size]
            yield self.images.index_select(0, chosen), self.labels.index_select(0, chosen)


def plain_dataloader(dataset: Dataset, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=workers > 0)


def measure_path(plain: Any, off: Any | None, on: Any | None, repeats: int) -> dict[str, float]:
    """Images/s per variant: epochs alternate between variants; each epoch runs ``repeats`` times.

    ``plain(batch_size)`` reads all the data; ``off(batch_size, keep)`` delivers as many samples as
    the "on" epoch in batches of the same size (a cyclical loader with a constant keep fraction and
    no recorded losses draws a fresh random share each epoch), so "on" vs "off" isolates what the
    cyclical features do: record every batch's losses, apply them at the epoch's end, select by loss.
    """
    clock = Clock(EPOCHS)
    batch_schedule, keep_schedule = as_schedule(ON["batch_size"], 2.0), as_schedule(ON["keep"], 2.0)
    epochs = [(round(batch_schedule(clock.progress(e))), float(keep_schedule(clock.progress(e))))
              for e in range(EPOCHS)]
    loaders: dict[str, dict[Any, Any]] = {"plain": {shape: plain(shape[0]) for shape in sorted(set(epochs))}}
    if off is not None:
        loaders["off"] = {shape: off(*shape) for shape in sorted(set(epochs))}
    if on is not None:
        single = on()
        loaders["on"] = {shape: single for shape in epochs}
    for variant in loaders.values():  # warm-up: worker start-up, ffcv's compilation, page cache
        for loader in {id(loader): loader for loader in variant.values()}.values():
            run_epoch(loader, False)
    totals = {name: [0, 0.0] for name in loaders}
    for epoch, shape in enumerate(epochs):
        names = list(loaders) if epoch % 2 == 0 else list(reversed(loaders))
        for _ in range(repeats):
            for name in names:
                loader = loaders[name][shape]
                if name == "on":
                    loader.set_epoch(epoch)  # the same epoch again: its plan is kept, the ledger only grows
                count, seconds = run_epoch(loader, name == "on")
                totals[name][0] += count
                totals[name][1] += seconds
    rates = {name: count / seconds for name, (count, seconds) in totals.items()}
    if "on" in rates:
        rates["on_vs_off"] = rates["on"] / rates["off"]
    return rates


def measure_dataset(name: str, images: torch.Tensor, labels: torch.Tensor, beton: Path, jpeg: bool,
                    workers: int, repeats: int) -> dict[str, dict[str, float]]:
    # Per-sample items; the torch path is forced onto DataLoader workers with placement="workers".
    per_sample: Dataset = PerSampleJpeg(images, labels) if jpeg else TensorImageDataset(images, labels)
    resident = BetonDataset(beton).decoded()  # what the device path holds (JPEG: decoded once)
    dl_workers = {"num_workers": workers, "persistent_workers": workers > 0}

    def variants(source: Any, placement: str, **options: Any) -> tuple[Any, Any, Any]:
        options = {"shuffle": True, "seed": 0, **options}  # a shuffled order, as the DataLoader baseline's
        def plain(batch_size: int) -> CyclicalLoader:
            return CyclicalLoader(source, epochs=2, batch_size=batch_size, placement=placement, **options)

        def off(batch_size: int, keep: float) -> CyclicalLoader:
            return CyclicalLoader(source, epochs=2, batch_size=batch_size, keep=keep, refresh_fraction=0.0,
                                  placement=placement, **options)

        def on() -> CyclicalLoader:
            return CyclicalLoader(source, placement=placement, refresh_fraction=0.0, **ON, **options)

        return plain, off, on

    paths = {
        "dataloader": (lambda b: plain_dataloader(per_sample, b, workers), None, None),
        "torch": variants(per_sample, "workers", **dl_workers),
        "ffcv": variants(str(beton), "ffcv", num_workers=workers),
        "device": variants(str(beton), "device"),
        "indexing": (lambda b: TensorIndexing(resident.images, resident.labels, b), None, None),
    }
    results = {}
    for path, (plain, off, on) in paths.items():
        results[path] = measure_path(plain, off, on, repeats)
        print(f"  {name}/{path}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[path].items()), file=sys.stderr,
              flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000, help="synthetic images (raw and JPEG)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers = ffcv threads")
    parser.add_argument("--datasets", nargs="+", default=["raw", "jpeg", "mnist"], choices=["raw", "jpeg", "mnist"])
    parser.add_argument("--min-samples", type=int, default=200_000,
                        help="repeat each epoch of a small dataset until about this many images are timed")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    args = parser.parse_args()
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="cycdata-bench-"))
    synthetic = load_dataset(f"synthetic:{args.samples}").train
    mnist = load_dataset("mnist5k").train
    specs = {"raw": (f"synthetic:{args.samples}", synthetic, None), "jpeg": (f"synthetic:{args.samples}", synthetic,
             JPEG_QUALITY), "mnist": ("mnist5k", mnist, None)}
    results: dict[str, Any] = {}
    for name in args.datasets:
        spec, data, quality = specs[name]
        beton = folder / f"{name}.beton"
        convert(spec, beton, jpeg_quality=quality, progress=False)
        repeats = max(1, math.ceil(args.min_samples / len(data.labels)))
        results[name] = measure_dataset(name, data.images, data.labels, beton, quality is not None, args.workers,
                                        repeats)
    summary: dict[str, Any] = {"samples": args.samples, "workers": args.workers, "datasets": results}
    targets: dict[str, float] = {}
    for name, paths in results.items():
        targets[f"{name}: ffcv / dataloader"] = paths["ffcv"]["plain"] / paths["dataloader"]["plain"]
        targets[f"{name}: device / indexing"] = paths["device"]["plain"] / paths["indexing"]["plain"]
    on_vs_off = [paths[p]["on_vs_off"] for paths in results.values() for p in ("torch", "ffcv", "device")]
    targets["min on / off"] = min(on_vs_off)
    summary["ratios"] = targets
    summary["seconds"] = time.perf_counter() - started
    if not args.json:
        print(f"{args.samples} synthetic 3x32x32 images (raw, JPEG q{JPEG_QUALITY}) and mnist5k; {args.workers} "
              f"workers/threads; images/s, cyclical features off and on")
        print(f"{'dataset':<7} {'path':<11} {'plain':>10} {'off':>10} {'on':>10} {'on/off':>7}")
        for name, paths in results.items():
            for path, rates in paths.items():
                cyclical = (f"{rates['off']:>10.0f} {rates['on']:>10.0f} {rates['on_vs_off']:>7.3f}" if "on" in rates
                            else f"{'-':>10} {'-':>10} {'-':>7}")
                print(f"{name:<7} {path:<11} {rates['plain']:>10.0f} {cyclical}")
        print("ratios (targets: ffcv/dataloader >= 5 on raw; device/indexing >= 0.8; on/off >= 0.95):")
        for key, value in targets.items():
            print(f"  {key:<28} {value:.3f}")
        print(f"{summary['seconds']:.0f}s in all")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
