"""The training loop: short enough to read in one sitting.

One epoch: the CyclicalLoader fixes the epoch's batch size and sample selection (or its
labeled/unlabeled mix), the hooks set LR/WD/T/clip from the plan at each step, each batch goes to
the device and is normalized there, the training logits are divided by T (CST), the loss is
computed per sample (``reduction="none"``; weighted by the self-paced weights, plus the FixMatch
term with semi-supervision) and recorded in the loader's loss ledger, gradients are clipped with
the cyclical threshold (CGC), and metrics are summed on the device so no step waits for the host.
After each epoch: evaluation (top-1, NLL, ECE; no temperature), one CSV row, TensorBoard, plots
and an atomic checkpoint. Under ``torchrun`` the same code runs DistributedDataParallel.

Example:
    >>> from cycdata.config import parse_config
    >>> import tempfile
    >>> cfg = parse_config({"epochs": 2, "model": "test_resnet", "data": {"dataset": "synthetic:64"},
    ...                     "runtime": {"progress": False}})
    >>> result = train(cfg, tempfile.mkdtemp())  # doctest: +ELLIPSIS
    epoch   1/2  loss ...
    epoch   2/2  loss ...
    >>> result["epoch"], 0.0 <= result["test_accuracy"] <= 1.0
    (1, True)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cycdata.augment_ladder.ladder import Ladder, LadderError, load_ladder
from cycdata.augment_ladder.views import strong_view, weak_view
from cycdata.config import ConfigError, RunConfig, config_to_dict, dump_config, parse_config, read_yaml
from cycdata.loaders.datasets import DatasetSplits, load_dataset
from cycdata.loaders.device_loader import fits_in_memory
from cycdata.loaders.torch_loader import BatchLoader, CyclicalLoader
from cycdata.plan import Plan
from cycdata.samplers import ShuffledBatchSampler, epoch_generator
from cycdata.selection import loss_quantile, spl_weights
from cycdata.train.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from cycdata.train.hooks import CyclicalHooks
from cycdata.train.losses import cyclical_focal_loss, distillation_loss, soft_cross_entropy
from cycdata.train.metrics import KNOB_PREFIXES, EvalAccumulator, RunLogger
from cycdata.train.weights import build_teacher, load_weights

__all__ = ["check_supported", "resume", "train"]


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: device, rank and world size."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(requested: str) -> Runtime:
    """Pick the device and join the process group when launched by ``torchrun``."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("runtime.device", f"got {requested!r} but no CUDA device is available; use auto or cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Runtime(device=device, rank=rank, world_size=world_size)


# Features that parse and plan but that this trainer does not run yet: refused up front rather
# than silently ignored.
def check_supported(config: RunConfig) -> None:
    """Refuse, before training, config features this trainer cannot honour."""
    if config.self_paced is not None and config.semi_supervised is not None:
        raise ConfigError("self_paced", "self-paced selection and semi_supervised cannot be combined; set one to null")


def resolve_ladder(config: RunConfig, data: DatasetSplits) -> Ladder | None:
    """The run's ladder (``auto``: ``digits`` for 1-channel digit data, else ``default``); None for ``none``."""
    name = config.augment.ladder
    if name == "auto":
        name = "digits" if data.name in ("mnist5k", "digits") or data.in_chans == 1 else "default"
    if name == "none":
        return None
    try:
        return load_ladder(name)
    except LadderError as error:
        raise ConfigError("augment.ladder", str(error)) from None


def build_model(config: RunConfig, data: DatasetSplits) -> nn.Module:
    import timm

    try:
        return timm.create_model(config.model, num_classes=data.num_classes, in_chans=data.in_chans)
    except RuntimeError as error:  # timm's "Unknown model" is a RuntimeError
        raise ConfigError("model", f"{error}; see timm.list_models() for names") from None


def build_optimizer(model: nn.Module, config: RunConfig, plan: Plan) -> torch.optim.Optimizer:
    """timm's optimizer factory: biases and norms go to a no-decay group, the rest to the decay group."""
    import timm.optim

    first = plan.at(0)
    knob = plan.knob("optim.weight_decay")
    start = max(knob.ends) if knob.ends else float(first["optim.weight_decay"])
    momentum = float(first.get("optim.momentum", plan.momentum))
    options: dict[str, Any] = {"momentum": momentum}
    name = config.optim.name
    if name == "sgd":
        name = "sgd" if config.optim.nesterov else "momentum"  # timm: "sgd" is Nesterov, "momentum" is not
    else:
        options = {"betas": (momentum, 0.999)}
    # The initial LR, momentum and weight decay only build the groups; the hooks overwrite them before step 1.
    return timm.optim.create_optimizer_v2(model, opt=name, lr=float(first["optim.lr"]), weight_decay=start,
                                          **options)


def training_loss(config: RunConfig, plan_values: dict[str, float | int]):
    """The per-sample training loss of this config, as a function of (logits, targets)."""
    loss = config.loss
    if loss.name == "cyclical_focal":
        xi = float(plan_values["loss.xi"])
        return lambda logits, target: cyclical_focal_loss(
            logits,
            target,
            xi,
            gamma_pos=loss.gamma_pos,
            gamma_neg=loss.gamma_neg,
            gamma_hc=loss.gamma_hc,
            eps=loss.smoothing,
            reduction="none",
        )
    return lambda logits, target: soft_cross_entropy(logits, target, label_smoothing=loss.smoothing, reduction="none")


class Normalize(nn.Module):
    """uint8 images (or float images in [0, 1]) on the device -> normalized float, done on the device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("scale", 1.0 / torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: Tensor) -> Tensor:
        images = images.to(memory_format=self.memory_format)
        pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (pixels - self.mean) * self.scale


# --------------------------------------------------------------------------------------------
# One epoch
# --------------------------------------------------------------------------------------------


@dataclass
class EpochContext:
    """What one training epoch needs besides the model and the loader."""

    hooks: CyclicalHooks
    optimizer: torch.optim.Optimizer
    config: RunConfig
    normalize: Normalize
    runtime: Runtime
    batch_threshold: float | None = None  # batch-level self-paced threshold of this epoch
    generator: torch.Generator | None = None  # augmentation and SSL view parameters, on the training device
    ladder: Ladder | None = None  # the augmentation ladder, applied to batches on the device
    num_classes: int = 0
    teacher: nn.Module | None = None  # distillation teacher: eval mode, no gradients


def batch_self_paced_weights(per_sample: Tensor, threshold: float | None, weighting: str) -> Tensor | None:
    """The batch-level self-paced variant: samples above the epoch's loss threshold weigh 0 (or less)."""
    if threshold is None or not math.isfinite(threshold):
        return None
    return spl_weights(per_sample.detach().float(), threshold, weighting)


def fixmatch_loss(logits_weak: Tensor, logits_strong: Tensor, confidence: float) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch: pseudo-labels from the weak view where confident, cross-entropy on the strong view.

    Returns the per-sample unlabeled loss, the confidence mask and the pseudo-labels.
    """
    probabilities = logits_weak.detach().float().softmax(dim=1)
    top, pseudo = probabilities.max(dim=1)
    mask = (top >= confidence).float()
    per_sample = F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask
    return per_sample, mask, pseudo


def augment_batch(
    context: EpochContext, images: Tensor, labels: Tensor, labeled: int, strength: float
) -> tuple[Tensor, Tensor]:
    """Apply the ladder at ``strength`` to the labeled part of a uint8 batch, on its device.

    Returns float images in [0, 1] and the training targets (soft when a rung mixes batches).
    """
    assert context.ladder is not None
    pixels = images.float() / 255.0
    supervised, targets = pixels[:labeled], labels[:labeled]
    if context.ladder.mixes:
        supervised, targets = context.ladder.apply_with_targets(
            supervised, targets, strength, context.num_classes, context.generator
        )
    else:
        supervised = context.ladder.apply(supervised, strength, context.generator)
    return torch.cat([supervised, pixels[labeled:]]), targets


def train_one_epoch(
    model: nn.Module, loader: CyclicalLoader, epoch: int, context: EpochContext, progress: Any
) -> dict[str, float]:
    """One pass of the loader; per-sample losses go to the loader's ledger (no host sync per step)."""
    model.train()
    hooks, optimizer, config, runtime = context.hooks, context.optimizer, context.config, context.runtime
    device = runtime.device
    autocast = _autocast(config, device)
    # loss, correct, labeled samples, grad norm, unlabeled loss, confident, unlabeled, pseudo correct, distill
    sums = torch.zeros(9, dtype=torch.float64, device=device)
    steps = len(loader)
    seen = 0
    epoch_samples = max(1, loader.samples_per_epoch)
    loss_fn = None
    ssl = config.semi_supervised
    weighting = config.self_paced.weighting if config.self_paced is not None else "hard"
    for step, (images, labels) in enumerate(loader):
        # Per-step knobs advance by the share of this epoch's samples already seen (the one clock).
        values = hooks.update(epoch, min(1.0, seen / epoch_samples))
        if loss_fn is None or config.schedule_unit == "step":
            loss_fn = training_loss(config, values)
        labeled = loader.labeled_count
        seen += labeled
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        targets: Tensor = labels[:labeled]
        if context.ladder is not None:
            images, targets = augment_batch(context, images, labels, labeled, float(values["augment.strength"]))
        images = context.normalize(images)
        if ssl is not None:
            unlabeled = images[labeled:]
            images = torch.cat(
                [
                    weak_view(images[:labeled], context.generator),
                    weak_view(unlabeled, context.generator),
                    strong_view(unlabeled, context.generator),
                ]
            )
        with autocast:
            logits = model(images)
        labeled_logits = logits[:labeled]
        per_sample = loss_fn(hooks.scale_logits(labeled_logits.float()), targets)
        trained = per_sample
        if context.teacher is not None:
            with torch.no_grad(), autocast:
                teacher_logits = context.teacher(images[:labeled])
            distill = distillation_loss(labeled_logits.float(), teacher_logits.float(),
                                        float(values["distill.temperature"]), reduction="none")
            share = float(values["distill.weight"])
            trained = (1.0 - share) * per_sample + share * distill
        weights = loader.batch_weights
        if weights is None:
            weights = batch_self_paced_weights(per_sample, context.batch_threshold, weighting)
        else:
            weights = weights.to(device, non_blocking=True)
        # Self-paced weights v_i scale each sample's loss; normalised by the batch size, not by Σv,
        # so a batch of mostly excluded samples does not take a full-size step.
        loss = trained.mean() if weights is None else (trained * weights).sum() / len(trained)
        if ssl is not None:
            count = len(unlabeled)
            weak_logits, strong_logits = logits[labeled : labeled + count], logits[labeled + count :]
            unlabeled_loss, mask, pseudo = fixmatch_loss(weak_logits, strong_logits, ssl.confidence)
            if count:
                loss = loss + ssl.weight * unlabeled_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = hooks.clip_gradients(model)
        optimizer.step()
        loader.record_loss(per_sample.detach())
        with torch.no_grad():
            sums[0] += per_sample.detach().sum()
            sums[1] += (labeled_logits.argmax(dim=1) == labels[:labeled]).sum()
            sums[2] += labeled
            if grad_norm is not None:
                sums[3] += grad_norm.detach().double()
            if context.teacher is not None:
                sums[8] += distill.detach().sum()
            if ssl is not None and count:
                sums[4] += unlabeled_loss.detach().sum()
                sums[5] += mask.sum()
                sums[6] += count
                # A diagnostic only: the hidden labels of the unlabeled pool never enter the loss.
                sums[7] += ((pseudo == labels[labeled:]).float() * mask).sum()
        if progress is not None and (step + 1) % config.runtime.log_every == 0:
            progress.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}", refresh=False)
        if progress is not None:
            progress.update(1)
    if runtime.distributed:
        dist.all_reduce(sums)
    values = sums.tolist()
    metrics = {"train_loss": values[0] / values[2], "train_accuracy": values[1] / values[2], "train_samples": values[2]}
    if hooks.clip_threshold is not None and hooks.clip_mode == "norm":
        metrics["grad_norm"] = values[3] / (steps * runtime.world_size)
    if context.teacher is not None:
        metrics["distill_loss"] = values[8] / values[2]
    if ssl is not None:
        # NaN, not 0, for an epoch with no unlabeled samples (ratio 0) or no confident pseudo-label.
        unlabeled_seen = values[6] or math.nan
        metrics.update(
            {
                "unlabeled_loss": values[4] / unlabeled_seen,
                "unlabeled_samples": values[6],
                "pseudo_label_rate": values[5] / unlabeled_seen,
                "pseudo_label_accuracy": values[7] / (values[5] or math.nan),
            }
        )
    return metrics


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, config: RunConfig, normalize: Normalize, runtime: Runtime
) -> dict[str, float]:
    """Top-1, NLL and ECE on the plain (untempered) logits, reduced over all ranks."""
    model.eval()
    scores = EvalAccumulator(device=runtime.device)
    autocast = _autocast(config, runtime.device)
    for images, labels, _indices in loader:
        with autocast:
            logits = model(normalize(images.to(runtime.device, non_blocking=True)))
        scores.add(logits, labels.to(runtime.device, non_blocking=True))
    scores.all_reduce()
    result = scores.compute()
    return {"test_accuracy": result["accuracy"], "test_nll": result["nll"], "test_ece": result["ece"]}


def _autocast(config: RunConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if config.runtime.amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def train(
    config: RunConfig, out_dir: str | Path, *, resume_from: dict[str, Any] | None = None, stop_after: int | None = None
) -> dict[str, Any]:
    """Train ``config`` into the run folder ``out_dir``; returns the last epoch's metrics row.

    Args:
        config: a validated run config.
        out_dir: the run folder (config.yaml, metrics.csv, tensorboard/, *.png, last.pt, best.pt).
        resume_from: a checkpoint state to continue from (see :func:`resume`).
        stop_after: stop after this many epochs in total (a time-sliced job); resume later.
    """
    check_supported(config)
    runtime = setup_runtime(config.runtime.device)
    out = Path(out_dir)
    data = limit_train(load_dataset(config.data.dataset), config.data.train_limit)
    ladder = resolve_ladder(config, data)  # a bad ladder fails here, before any model is built
    plan = Plan.from_config(config)

    torch.manual_seed(config.seed)  # same initial weights on every rank (DDP broadcasts them anyway)
    model = build_model(config, data)
    if config.init is not None and resume_from is None:
        report = load_weights(model, config.init)  # weights only: this run starts its own schedule
        if runtime.is_main:
            print(report.summary(), flush=True)
    model = model.to(runtime.device)
    teacher = None
    if config.distill is not None:
        teacher, description = build_teacher(config.distill.teacher, num_classes=data.num_classes,
                                             in_chans=data.in_chans, device=runtime.device)
        if runtime.is_main:
            print(description, flush=True)
    # With torch.compile, inductor picks memory layouts itself; channels_last weights on top of it
    # trip a stride assertion in its convolution backward (seen with torch 2.11 on an H200).
    channels_last = config.runtime.channels_last and runtime.device.type == "cuda" and not config.runtime.compile
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config, plan)
    clip_mode = config.grad_clip.mode if config.grad_clip is not None else "norm"
    hooks = CyclicalHooks(optimizer, plan, clip_mode=clip_mode)
    normalize = Normalize(data.mean, data.std, channels_last).to(runtime.device)

    start_epoch, best_accuracy, history = 0, -math.inf, []
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        start_epoch, best_accuracy, history = resume_from["epoch"], resume_from["best_accuracy"], resume_from["history"]
        restore_rng_state(resume_from["rng"][min(runtime.rank, len(resume_from["rng"]) - 1)])

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None
        )
    if config.runtime.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    pin = runtime.device.type == "cuda"
    train_loader = build_train_loader(config, data, runtime)
    test_sampler = ShuffledBatchSampler(
        len(data.test),
        config.data.eval_batch_size,
        shuffle=False,
        pad=False,
        rank=runtime.rank,
        world_size=runtime.world_size,
    )
    # A .beton test split is decoded once: evaluation reads every image every epoch anyway.
    test_data = data.test.decoded() if hasattr(data.test, "decoded") else data.test
    test_loader = BatchLoader(test_data, test_sampler, num_workers=_workers(config, test_data), pin_memory=pin)
    if resume_from is not None and resume_from.get("data_state"):
        train_loader.load_state_dict(resume_from["data_state"])
    context = EpochContext(
        hooks=hooks,
        optimizer=optimizer,
        config=config,
        normalize=normalize,
        runtime=runtime,
        ladder=ladder,
        num_classes=data.num_classes,
        teacher=teacher,
    )

    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
    logger = RunLogger(out, history, enabled=runtime.is_main)
    show_progress = config.runtime.progress and runtime.is_main
    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    row: dict[str, Any] = history[-1] if history else {}
    try:
        for epoch in range(start_epoch, last_epoch):
            started = time.perf_counter()
            train_loader.set_epoch(epoch)
            data_knobs = train_loader.knobs  # fixes the epoch's selection and batch size
            context.batch_threshold = _batch_level_threshold(config, plan, train_loader, epoch)
            context.generator = epoch_generator(config.seed, epoch, stream=4 + runtime.rank, device=runtime.device)
            progress = _progress_bar(epoch, config.epochs, len(train_loader)) if show_progress else None
            train_metrics = train_one_epoch(train_model, train_loader, epoch, context, progress)
            train_seconds = time.perf_counter() - started
            test_metrics = evaluate(model, test_loader, config, normalize, runtime)
            if progress is not None:
                progress.close()
            row = {
                "epoch": epoch,
                **plan.at(epoch),
                **data_knobs,
                **train_metrics,
                **test_metrics,
                "images_per_second": train_metrics["train_samples"] / train_seconds,
                "epoch_seconds": time.perf_counter() - started,
            }
            if config.semi_supervised is not None:
                row["semi_supervised.coverage"] = train_loader.batch_sampler.unlabeled.coverage
                row["semi_supervised.passes"] = train_loader.batch_sampler.unlabeled.passes
            logger.log_epoch(row)
            best_accuracy = _save(
                out,
                runtime,
                model,
                optimizer,
                config,
                epoch,
                row,
                best_accuracy,
                logger.history,
                train_loader.state_dict(),
            )
            if runtime.is_main:
                print(_summary(row, config.epochs), flush=True)
    finally:
        logger.close()
    return row


def _workers(config: RunConfig, dataset: object) -> int:
    """In-memory datasets are gathered in the main process: worker processes would only add copies."""
    return 0 if hasattr(dataset, "images") else config.data.num_workers


def limit_train(data: DatasetSplits, count: int | None) -> DatasetSplits:
    """The splits with the train split cut to a fixed, class-balanced subset of ``count`` samples."""
    if count is None:
        return data
    labels = getattr(data.train, "labels", None)
    images = getattr(data.train, "images", None)
    if not isinstance(labels, Tensor) or not isinstance(images, Tensor):
        raise ConfigError("data.train_limit", f"needs an in-memory dataset; {data.name} is read lazily")
    if count >= len(labels):
        return data
    chosen = labeled_subset(labels, count, data.num_classes)
    from dataclasses import replace

    from cycdata.loaders.datasets import TensorImageDataset

    return replace(data, train=TensorImageDataset(images[chosen], labels[chosen]))


def labeled_subset(labels: Tensor, count: int, num_classes: int) -> Tensor:
    """A fixed, class-balanced choice of ``count`` labeled samples (seed 0: the same for every run).

    Example:
        >>> labeled_subset(torch.tensor([0, 1] * 50), 10, 2).numel()
        10
    """
    generator = torch.Generator().manual_seed(0)
    per_class = [count // num_classes + (1 if c < count % num_classes else 0) for c in range(num_classes)]
    chosen = []
    for cls, take in enumerate(per_class):
        members = (labels == cls).nonzero().flatten()
        if take > len(members):
            raise ConfigError(
                "semi_supervised.labeled",
                f"asks for {count} labeled samples, but class {cls} has only "
                f"{len(members)}; use at most {len(members) * num_classes}",
            )
        chosen.append(members[torch.randperm(len(members), generator=generator)[:take]])
    return torch.cat(chosen).sort().values


def build_train_loader(config: RunConfig, data: DatasetSplits, runtime: Runtime) -> CyclicalLoader:
    """The training loader: every data-side knob of the config, rank-aware."""
    options: dict[str, Any] = {
        "epochs": config.epochs,
        "batch_size": config.data.batch_size,
        "seed": config.seed,
        "schedule_unit": config.schedule_unit,
        "normalization": config.normalization,
        "cycle": (config.cycle.start, config.cycle.end),
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "pin_memory": runtime.device.type == "cuda",
        "ledger_device": runtime.device if runtime.device.type == "cuda" else None,
        "device": runtime.device,
    }
    placement = config.data.placement
    if placement == "auto" and hasattr(data.train, "images"):
        placement = "device" if fits_in_memory(data.train.images.numel(), runtime.device) else "workers"
    options["placement"] = placement
    if placement == "ffcv":
        options["num_workers"] = config.data.num_workers
    elif placement in ("workers", "auto"):
        options["num_workers"] = _workers(config, data.train) if placement == "auto" else config.data.num_workers
        if options["num_workers"] > 0:
            options["persistent_workers"] = True
    sp, ssl = config.self_paced, config.semi_supervised
    if sp is not None:
        options["ledger_ema"] = sp.ema
    if sp is not None and sp.level == "epoch":
        options.update(
            keep=sp.keep,
            threshold=sp.threshold,
            weighting=sp.weighting,
            per_class=sp.per_class,
            refresh_fraction=sp.refresh,
            labels=getattr(data.train, "labels", None),
        )
    if ssl is not None:
        labels = getattr(data.train, "labels", None)
        if labels is None:
            raise ConfigError("semi_supervised", f"needs a dataset with in-memory labels; {data.name} has none")
        options.update(labeled=labeled_subset(labels, ssl.labeled, data.num_classes), unlabeled_ratio=ssl.ratio)
    try:
        return CyclicalLoader(data.train, **options)
    except ValueError as error:  # a placement that cannot serve this dataset
        raise ConfigError("data.placement", str(error)) from None


def _batch_level_threshold(config: RunConfig, plan: Plan, loader: CyclicalLoader, epoch: int) -> float | None:
    """The batch-level self-paced threshold: from the ledger's keep-quantile (or the threshold knob)."""
    sp = config.self_paced
    if sp is None or sp.level != "batch":
        return None
    t = plan.clock.progress(epoch)
    if sp.threshold is not None:
        return float(sp.threshold(t))
    seen = loader.ledger.seen.cpu()
    if not bool(seen.any()):
        return None  # nothing scored yet: the first epoch trains on every sample
    assert sp.keep is not None
    return loss_quantile(loader.ledger.losses.cpu()[seen], float(sp.keep(t))) * (1 + 1e-6)


def _save(
    out: Path,
    runtime: Runtime,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    epoch: int,
    row: dict[str, Any],
    best_accuracy: float,
    history: list[dict[str, Any]],
    data_state: dict[str, Any],
) -> float:
    """Atomic last.pt every epoch, best.pt when test accuracy improves. RNG states of every rank."""
    rng = [capture_rng_state()]
    if runtime.distributed:
        gathered: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    improved = row["test_accuracy"] > best_accuracy
    best_accuracy = max(best_accuracy, row["test_accuracy"])
    if runtime.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "best_accuracy": best_accuracy,
            "history": history,
            "rng": rng,
            "config": config_to_dict(config),
            "data_state": data_state,
        }
        save_checkpoint(state, out / "last.pt")
        if improved:
            save_checkpoint(state, out / "best.pt")
    if runtime.distributed:
        dist.barrier()
    return best_accuracy


def resume(run_dir: str | Path, stop_after: int | None = None) -> dict[str, Any]:
    """Continue a killed or stopped run from ``run_dir/last.pt`` with the run's saved config."""
    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "last.pt")
    config = parse_config(read_yaml(run_dir / "config.yaml"))
    if state["epoch"] >= config.epochs:
        return state["history"][-1]
    return train(config, run_dir, resume_from=state, stop_after=stop_after)


def _progress_bar(epoch: int, epochs: int, steps: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True, file=sys.stdout)


def _summary(row: dict[str, Any], epochs: int) -> str:
    knobs = "  ".join(f"{name} {value:.4g}" for name, value in row.items() if name.startswith(KNOB_PREFIXES))
    return (
        f"epoch {row['epoch'] + 1:>3}/{epochs}  loss {row['train_loss']:.4f}  "
        f"train {100 * row['train_accuracy']:.2f}%  test {100 * row['test_accuracy']:.2f}%  "
        f"nll {row['test_nll']:.4f}  ece {row['test_ece']:.4f}  {knobs}  "
        f"{row['images_per_second']:.0f} img/s  {row['epoch_seconds']:.1f}s"
    )
