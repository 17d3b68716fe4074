"""Per-epoch overhead of the optimizer-side hooks (CWD + CST + CGC) against plain training.

Both variants train the same model on the same data in one process, in alternating epochs
(ABAB...), so machine noise hits both alike; the ratio of median epoch times is the overhead.
Target: <= 1.03.

    .venv/bin/python benchmarks/hooks_overhead.py [--model resnet10t] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cycdata.config import load_config
from cycdata.loaders import CyclicalLoader, TensorImageDataset, load_dataset
from cycdata.plan import Plan
from cycdata.train.builders import Normalize, build_model, build_optimizer, setup_runtime
from cycdata.train.hooks import CyclicalHooks
from cycdata.train.trainer import EpochContext, train_one_epoch

VARIANTS = {
    # Plain: constant weight decay, no temperature, no clipping.
    "off": ["optim.weight_decay=5.0e-5", "temperature=null", "grad_clip=null"],
    # Every optimizer-side knob cyclical.
    "on": [
        "optim.weight_decay={easy: 1.0e-5, hard: 5.0e-4}",
        "temperature={easy: 0.5, hard: 2.0}",
        "grad_clip={easy: 0.5, hard: 2.0, mode: norm}",
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--samples", type=int, default=2048, help="training samples per epoch")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per variant")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # The ladder is off in both variants: this measures the optimizer-side hooks alone.
    base = [f"model={args.model}", f"data.dataset={args.dataset}", "epochs=10", "runtime.progress=false",
            "augment.ladder=none"]
    configs = {name: load_config(None, base + overrides) for name, overrides in VARIANTS.items()}
    runtime = setup_runtime("auto")
    data = load_dataset(args.dataset)
    subset_size = min(args.samples, len(data.train))
    subset = TensorImageDataset(data.train.images[:subset_size], data.train.labels[:subset_size])
    runs = {}
    for name, config in configs.items():
        torch.manual_seed(0)
        plan = Plan.from_config(config)
        model = build_model(config, data).to(runtime.device)
        optimizer = build_optimizer(model, config, plan)
        hooks = CyclicalHooks(optimizer, plan, clip_mode="norm", set_lr=True)  # as the trainer
        loader = CyclicalLoader(subset, epochs=config.epochs, batch_size=args.batch_size, shuffle=True, seed=0)
        normalize = Normalize(data.mean, data.std, channels_last=False).to(runtime.device)
        context = EpochContext(hooks=hooks, optimizer=optimizer, config=config, normalize=normalize, runtime=runtime)
        runs[name] = (model, loader, context)

    def one_epoch(name: str, epoch: int) -> float:
        model, loader, context = runs[name]
        loader.set_epoch(epoch % 10)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        train_one_epoch(model, loader, epoch % 10, context, None)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    for name in runs:  # warm-up epoch each (allocator, kernels)
        one_epoch(name, 0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(one_epoch(name, repeat + 1))
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "device": str(runtime.device),
        "model": args.model,
        "samples_per_epoch": subset_size,
        "median_epoch_seconds": medians,
        "epoch_seconds": times,
        "overhead_ratio": medians["on"] / medians["off"],
        "target": 1.03,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"device {result['device']}, model {args.model}, {args.dataset}, {subset_size} samples/epoch, "
              f"batch {args.batch_size}, {args.repeats} epochs each")
        for name in runs:
            print(
                f"  hooks {name:>3}: median {medians[name]:.3f} s/epoch  ({', '.join(f'{t:.3f}' for t in times[name])})"
            )
        print(f"  overhead ratio on/off: {result['overhead_ratio']:.4f}  (target <= 1.03)")


if __name__ == "__main__":
    main()
