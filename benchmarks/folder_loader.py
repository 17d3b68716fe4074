"""Images/s of cycdata's folder path against ``timm.data.create_loader`` on the same folder, in one run.

Both read the same ImageFolder tree of real JPEG/PNG files (written by this script from the embedded MNIST
digits, upscaled to 256..320 px with varying aspect ratios, unless ``--folder`` names one) through
DataLoader workers, with the same worker count, batch size and image size, in alternating epochs so that
machine noise hits both:

* cycdata: ``CyclicalLoader`` over ``folder:PATH`` at ``image_size`` with the built-in ``imagenet`` ladder at
  strength 0.4 (its rung 2: the full random-resized crop, scale (0.08, 1) and ratio (3/4, 4/3), and a
  random horizontal flip), cropped from the full image in the workers; uint8 batches.
* timm: ``create_loader(ImageDataset(PATH), is_training=True)`` with timm's default train transform
  (RandomResizedCrop + flip + ColorJitter 0.4 + normalization, ``use_prefetcher=False``: CPU tensors),
  and once more with ``color_jitter=0`` (the same work as cycdata's rung: crop and flip only).

The ratio is cycdata's images/s over timm's; the acceptance target is >= 0.9. On a shared machine the
figures are noisy: compare the ratios of one run, not figures of different runs.

    .venv/bin/python benchmarks/folder_loader.py [--images 512] [--workers 2] [--batch-size 64] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from cycdata.loaders.datasets import load_dataset
from cycdata.loaders.torch_loader import CyclicalLoader

STRENGTH = 0.4  # the imagenet ladder's rung 2: resized_crop at 1.0 and hflip, timm's RRC + flip


def write_folder(root: Path, count: int) -> Path:
    """``root/<digit>/<n>.{jpg,png}``: ``count`` real digits at 256..320 px (one PNG in four, JPEG quality 90)."""
    digits = load_dataset("mnist5k").train
    rng = np.random.default_rng(0)
    for n in range(count):
        image, label = digits[n * len(digits) // count]
        width, height = (int(v) for v in rng.integers(256, 321, size=2))
        gray = Image.fromarray(image[0].numpy()).resize((width, height), Image.Resampling.BILINEAR)
        rgb = Image.merge("RGB", (gray, gray.point(lambda v: 255 - v), gray.point(lambda v: v // 2)))
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        rgb.save(folder / (f"{n}.png" if n % 4 == 0 else f"{n}.jpg"), quality=90)
    return root


def run_epoch(loader: Iterable) -> tuple[int, float]:
    started = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch[1])
    return count, time.perf_counter() - started


def build_loaders(folder: Path, workers: int, batch_size: int, size: int, epochs: int) -> dict[str, Iterable]:
    import timm.data
    import torch

    data = load_dataset(f"folder:{folder}", image_size=size)
    # The folder's whole tree as one training split (load_dataset holds out 20% for its test split).
    train = type(data.train)(data.train.samples + data.test.samples, data.train.classes, size)
    cyclical = CyclicalLoader(train, epochs=epochs, batch_size=batch_size, ladder="imagenet", strength=STRENGTH,
                              seed=0, shuffle=True, placement="workers", num_workers=workers,
                              persistent_workers=workers > 0)
    loaders: dict[str, Iterable] = {"cycdata": cyclical}
    for name, jitter in (("timm", 0.4), ("timm_no_jitter", 0.0)):
        loaders[name] = timm.data.create_loader(
            timm.data.ImageDataset(str(folder)), input_size=(3, size, size), batch_size=batch_size,
            is_training=True, color_jitter=jitter, num_workers=workers, use_prefetcher=False,
            persistent_workers=workers > 0, device=torch.device("cpu"))
    return loaders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="an ImageFolder tree (default: written from MNIST)")
    parser.add_argument("--images", type=int, default=512, help="images to write when no --folder is given")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loader (after one warm-up)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or write_folder(Path(tmp), args.images)
        loaders = build_loaders(folder, args.workers, args.batch_size, args.size, args.epochs + 1)
        for loader in loaders.values():  # warm-up: worker start, page cache, imports
            run_epoch(loader)
        rates: dict[str, list[float]] = {name: [] for name in loaders}
        for _ in range(args.epochs):
            for name, loader in loaders.items():
                count, seconds = run_epoch(loader)
                rates[name].append(count / seconds)
    result = {name: statistics.median(values) for name, values in rates.items()}
    result.update(ratio=result["cycdata"] / result["timm"],
                  ratio_no_jitter=result["cycdata"] / result["timm_no_jitter"],
                  workers=args.workers, batch_size=args.batch_size, size=args.size)
    if args.json:
        print(json.dumps(result))
        return
    print(f"folder at {args.size} px, {args.workers} workers, batch {args.batch_size} (median of {args.epochs} epochs)")
    print(f"  cycdata (imagenet ladder, RRC + flip)     {result['cycdata']:8.1f} images/s")
    print(f"  timm create_loader (default train)         {result['timm']:8.1f} images/s")
    print(f"  timm create_loader (color_jitter=0)        {result['timm_no_jitter']:8.1f} images/s")
    print(f"  ratio cycdata / timm: {result['ratio']:.2f}  (/ timm without jitter: {result['ratio_no_jitter']:.2f}; "
          "target >= 0.9)")


if __name__ == "__main__":
    main()
