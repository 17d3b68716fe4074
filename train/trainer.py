"""The training loop: short enough to read in one sitting.

One epoch: the CyclicalLoader fixes the epoch's batch size and sample selection (or its
labeled/unlabeled mix), the hooks set LR/WD/T/clip from the plan at each step, each batch goes to
the device and is augmented and normalized there, the objective (:mod:`cycdata.train.objectives`:
the tempered per-sample loss, self-paced weights, distillation, FixMatch) gives the loss, the
per-sample losses go to the loader's loss ledger, gradients are clipped with the cyclical threshold
(CGC), and named metric sums stay on the device so no step waits for the host. After each epoch:
evaluation (top-1, NLL, ECE; no temperature), one CSV row, TensorBoard, plots and an atomic
checkpoint. Under ``torchrun`` the same code runs DistributedDataParallel. What the run is built
from lives in :mod:`cycdata.train.builders`, its checkpoints in :mod:`cycdata.train.checkpoint`.

**Numeric failure is a clear stop.** The first non-finite loss (or a non-finite weight or buffer after
the epoch's last step) raises :class:`TrainingDiverged`: one line with the epoch, the step, the knobs'
values at that step and what to try. It is a :class:`~cycdata.config.RunStopped` (the knobs' values
caused it), so ``cycdata train`` exits with status 2. The check costs no host sync per step: the first
bad step is kept on the device and read at the epoch's end, before evaluation and before anything is
saved, so the checkpoints of the epochs before stay as they were. ``--resume`` continues from the last
good epoch with the same config and so stops at the same point again (the message says so).

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
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cycdata.augment_ladder.ladder import Ladder
from cycdata.config import RunConfig, RunStopped, dump_config, validate_config
from cycdata.loaders.torch_loader import BatchLoader, CyclicalLoader
from cycdata.plan import Plan, warn_if_short_cycle
from cycdata.samplers import epoch_generator
from cycdata.train.builders import (
    Normalize,
    Runtime,
    autocast,
    build_eval_loader,
    build_model,
    build_model_ema,
    build_normalize,
    build_optimizer,
    build_run_model,
    build_run_teacher,
    build_test_loader,
    build_train_loader,
    collective_timeout,
    leave_broken_group,
    resolve_ladder,
    run_dataset,
    setup_runtime,
    wrap_for_training,
)
from cycdata.train.checkpoint import restore_run, resume, save_run
from cycdata.train.hooks import CyclicalHooks
from cycdata.train.metrics import DeviceSums, EvalAccumulator, RunLogger, summary_line
from cycdata.train.objectives import (
    Batch,
    Distillation,
    FixMatch,
    Objective,
    SelfPaced,
    Supervised,
    batch_self_paced_threshold,
    fixmatch_views,
)

__all__ = [
    "EpochContext",
    "TrainingDiverged",
    "build_model",
    "build_optimizer",
    "build_train_loader",
    "check_supported",
    "evaluate",
    "resume",
    "train",
    "train_one_epoch",
]


# Features that parse and plan but that this trainer does not run yet: refused up front rather
# than silently ignored.
def check_supported(config: RunConfig) -> None:
    """Refuse, before training, a config built or changed in code that breaks a rule across keys."""
    validate_config(config)


# --------------------------------------------------------------------------------------------
# Numeric failure
# --------------------------------------------------------------------------------------------

_NO_STEP = 2**62  # "no bad step yet" for the device-side minimum over steps (and ranks)


class TrainingDiverged(RunStopped):
    """The loss or the weights became NaN or infinite: the run stops with one line (``cycdata train``: exit 2)."""

    def __init__(self, what: str, epoch: int, epochs: int, step: int, steps: int,
                 knobs: Mapping[str, float | int]) -> None:
        values = ", ".join(f"{name}={float(value):.4g}" for name, value in knobs.items())
        clip = "a tighter grad_clip" if "grad_clip" in knobs else "grad_clip (e.g. grad_clip={easy: 0.5, hard: 2})"
        super().__init__("", (
            f"training diverged: {what} in epoch {epoch + 1}/{epochs}, step {step + 1}/{steps} ({values}); "
            f"try a lower optim.lr, a higher temperature or {clip}. Nothing of this epoch was saved; "
            "--resume would repeat it with the same config and stop here again"))


def _first_nonfinite_step(first: Tensor, loss: Tensor, step: int) -> Tensor:
    """``first`` with ``step`` in it if it is the first step whose ``loss`` is not finite (device ops only)."""
    return torch.where(torch.isfinite(loss.detach()), first, first.clamp(max=step))


def _all_finite(module: nn.Module) -> bool:
    """Whether every parameter and buffer of ``module`` is finite: one host read for the whole model."""
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _check_finite(first_bad: Tensor, model: nn.Module, epoch: int, epochs: int,
                  knobs_by_step: list[dict[str, float | int]]) -> None:
    """Raise :class:`TrainingDiverged` when some rank saw a non-finite loss, or the weights are not finite."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)  # every rank stops together
    steps = len(knobs_by_step)
    step = int(first_bad)
    if step != _NO_STEP:
        raise TrainingDiverged("the loss became NaN or infinite", epoch, epochs, step, steps, knobs_by_step[step])
    if steps and not _all_finite(model):
        raise TrainingDiverged("the weights became NaN or infinite", epoch, epochs, steps - 1, steps,
                               knobs_by_step[-1])


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
    model: nn.Module | None = None  # the unwrapped model (the model EMA follows it)
    ema: nn.Module | None = None  # timm's ModelEmaV3, updated after every optimizer step
    optimizer_steps: int = 0  # over the run: the EMA's warmup counts them

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.config, self.runtime.device)

    def objective(self) -> Objective:
        """This epoch's loss terms, composed (see :mod:`cycdata.train.objectives`)."""
        sp, ssl = self.config.self_paced, self.config.semi_supervised
        return Objective(
            supervised=Supervised(self.config, self.hooks.scale_logits),
            self_paced=SelfPaced(self.batch_threshold, sp.weighting if sp is not None else "hard"),
            distillation=None if self.teacher is None else Distillation(self.teacher, self.autocast),
            fixmatch=None if ssl is None else FixMatch(ssl.confidence, ssl.weight),
        )

    def model_inputs(
        self, images: Tensor, labels: Tensor, labeled: int, knobs: dict[str, float | int]
    ) -> tuple[Tensor, Tensor]:
        """The model's input and the labeled samples' targets, from a batch already on the device.

        The ladder augments the labeled part at this step's strength; with semi-supervision, FixMatch's
        weak and strong views follow the normalization.
        """
        targets = labels[:labeled]
        if self.ladder is not None:
            images, targets = augment_batch(self, images, labels, labeled, float(knobs["augment.strength"]))
        images = self.normalize(images)
        if self.config.semi_supervised is not None:
            images = fixmatch_views(images, labeled, self.generator)
        return images, targets


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
    model: nn.Module, loader: CyclicalLoader, epoch: int, context: EpochContext, report: StepReport | None = None
) -> dict[str, float]:
    """One pass of the loader; per-sample losses go to the loader's ledger (no host sync per step).

    Raises :class:`TrainingDiverged` at the epoch's end when a loss or the weights became non-finite.
    """
    model.train()
    hooks, optimizer, device = context.hooks, context.optimizer, context.runtime.device
    objective, amp = context.objective(), context.autocast
    sums = DeviceSums((*objective.sums, "grad_norm", "passes"), device)
    steps, seen, epoch_samples = len(loader), 0, max(1, loader.samples_per_epoch)  # len(): before the pass
    first_bad = torch.full((), _NO_STEP, dtype=torch.int64, device=device)  # the first non-finite loss's step
    knobs_by_step: list[dict[str, float | int]] = []  # host values the hooks computed anyway: for the message
    accumulate = context.config.optim.accumulate
    updates = 0
    for step, (images, labels) in enumerate(loader):
        opens_window = step % accumulate == 0
        if opens_window:
            # Per-step knobs advance by the share of this epoch's samples already seen (the one clock), once per
            # optimizer step: a window of accumulated batches trains at one LR, temperature and strength.
            knobs = hooks.update(epoch, min(1.0, seen / epoch_samples))
            window = min(accumulate, steps - step)  # an epoch's last window may hold fewer batches
            optimizer.zero_grad(set_to_none=True)
        knobs_by_step.append(knobs)
        labeled = loader.labeled_count
        seen += labeled
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        inputs, targets = context.model_inputs(images, labels, labeled, knobs)
        with amp:
            logits = model(inputs)
        batch = Batch(logits, labels, targets, labeled, inputs, knobs)
        loss, per_sample, step_sums = objective(batch, loader.batch_weights)
        first_bad = _first_nonfinite_step(first_bad, loss, step)
        closes_window = step % accumulate == window - 1
        # Under DDP the gradients are all-reduced once per window, at its last backward.
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if no_sync is not None and not closes_window else contextlib.nullcontext():
            (loss / window if window > 1 else loss).backward()
        if closes_window:
            grad_norm = hooks.clip_gradients(model)
            optimizer.step()
            updates += 1
            context.optimizer_steps += 1
            if context.ema is not None:
                context.ema.update(context.model, step=context.optimizer_steps)  # type: ignore[operator]
            if grad_norm is not None:
                sums.add(grad_norm=grad_norm.detach())
        loader.record_loss(per_sample.detach())
        sums.add(step_sums, passes=inputs.shape[0])  # rows through forward and backward: the compute count
        if report is not None:
            report.step(step, sums, knobs)
    sums.all_reduce()
    totals = sums.totals()
    _check_finite(first_bad, model, epoch, context.config.epochs, knobs_by_step)
    step_metrics: dict[str, float] = {"train_passes": totals["passes"]}
    if hooks.clip_threshold is not None and hooks.clip_mode == "norm":
        step_metrics["grad_norm"] = totals["grad_norm"] / (max(1, updates) * context.runtime.world_size)
    return objective.metrics(totals, step_metrics)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, config: RunConfig, normalize: Normalize, runtime: Runtime,
    split: str = "test", num_classes: int | None = None,
) -> dict[str, float]:
    """Top-1, NLL and ECE on the plain (untempered) logits (with ``num_classes`` also the balanced accuracy),
    reduced over all ranks, named ``{split}_accuracy`` and so on.

    ``{split}_nonfinite`` (samples whose logits were NaN or infinite) is in the result only when some were.
    """
    model.eval()
    scores = EvalAccumulator(device=runtime.device, num_classes=num_classes)
    amp = autocast(config, runtime.device)
    for images, labels, _indices in loader:
        with amp:
            logits = model(normalize(images.to(runtime.device, non_blocking=True)))
        scores.add(logits, labels.to(runtime.device, non_blocking=True))
    scores.all_reduce()
    result = scores.compute()
    metrics = {f"{split}_accuracy": result["accuracy"], f"{split}_nll": result["nll"], f"{split}_ece": result["ece"]}
    if "balanced_accuracy" in result:
        metrics[f"{split}_balanced_accuracy"] = result["balanced_accuracy"]
    if result["nonfinite"]:
        metrics[f"{split}_nonfinite"] = result["nonfinite"]
    return metrics


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
    data = run_dataset(config)
    ladder = resolve_ladder(config, data)  # a bad ladder fails here, before any model is built
    plan = Plan.from_config(config)

    model = build_run_model(config, data, runtime, fresh=resume_from is None)
    teacher = build_run_teacher(config, data, runtime)
    optimizer = build_optimizer(model, config, plan)
    ema = build_model_ema(config, model)
    clip_mode = config.grad_clip.mode if config.grad_clip is not None else "norm"
    hooks = CyclicalHooks(optimizer, plan, clip_mode=clip_mode, set_lr=True)  # the trainer's LR is the plan's
    normalize = build_normalize(config, data, runtime)
    train_loader = build_train_loader(config, data, runtime, plan, ladder)  # the data side reads the same plan
    test_loader = build_test_loader(config, data, runtime)
    val_loader = None if data.val is None else build_eval_loader(config, data.val, runtime)

    def eval_loaders(epoch: int) -> list[tuple[str, BatchLoader]]:
        """What an epoch evaluates: with a validation split, it every epoch and the test split at the last
        epoch only (every choice is made on the validation split; never with ``data.test: false``); without
        one, the test split every epoch."""
        if val_loader is None:
            return [("test", test_loader)]
        last = epoch == config.epochs - 1 and config.data.test
        return [("val", val_loader)] + ([("test", test_loader)] if last else [])

    run = restore_run(resume_from, model, optimizer, train_loader, runtime.rank, ema=ema)
    train_model = wrap_for_training(model, config, runtime)
    context = EpochContext(hooks=hooks, optimizer=optimizer, config=config, normalize=normalize, runtime=runtime,
                           # A loader that applies the ladder per image (whole images): the batches come augmented.
                           ladder=None if train_loader.ladder is not None else ladder,
                           num_classes=data.num_classes, teacher=teacher, model=model, ema=ema,
                           optimizer_steps=run.optimizer_steps)
    if resume_from is None and runtime.is_main:  # once everything is checked: a failing run prints its error only
        warn_if_short_cycle(config)

    if runtime.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(config))
    logger = RunLogger(out, run.history, enabled=runtime.is_main)
    logger.plan = plan  # knobs.png draws the knobs step by step from the run's own plan
    # A bar only on a terminal: in a file (nohup, CI, a cluster job) every frame would be a line of its own.
    show_progress = config.runtime.progress and runtime.is_main and sys.stdout.isatty()
    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    row: dict[str, Any] = run.history[-1] if run.history else {}
    try:
        for epoch in range(run.epoch, last_epoch):
            started = time.perf_counter()
            train_loader.set_epoch(epoch)
            data_knobs = train_loader.knobs  # fixes the epoch's selection and batch size
            context.batch_threshold = batch_self_paced_threshold(config, plan, train_loader, epoch)
            context.generator = epoch_generator(config.seed, epoch, stream=4 + runtime.rank, device=runtime.device)
            report = None
            if runtime.is_main and (show_progress or config.runtime.log_steps is not None):
                report = StepReport(epoch=epoch, epochs=config.epochs, steps=len(train_loader), bar=show_progress,
                                    every=config.runtime.log_steps, refresh=config.runtime.log_every)
            train_metrics = train_one_epoch(train_model, train_loader, epoch, context, report)
            train_seconds = time.perf_counter() - started
            test_metrics: dict[str, float] = {}
            for split, loader in eval_loaders(epoch):
                test_metrics.update(evaluate(model, loader, config, normalize, runtime, split, data.num_classes))
                if ema is not None:  # the EMA weights, evaluated as the model is (timm keeps the best by them)
                    ema_metrics = evaluate(ema.module, loader, config, normalize, runtime, split,  # type: ignore[arg-type]
                                           data.num_classes)
                    ema_metrics.pop(f"{split}_nonfinite", 0)
                    test_metrics.update({f"ema_{name}": value for name, value in ema_metrics.items()})
                if test_metrics.pop(f"{split}_nonfinite", 0):  # finite but huge weights: the outputs overflow
                    steps = len(train_loader)
                    raise TrainingDiverged("the model's outputs became NaN or infinite (evaluation)", epoch,
                                           config.epochs, steps - 1, steps, hooks.values)
            if report is not None:
                report.close()
            passes_before = float(row.get("train_passes_total", 0.0))  # the previous epoch's row, also on resume
            row = {"epoch": epoch, **plan.at(epoch), **data_knobs, **train_metrics, **test_metrics,
                   "train_passes_total": passes_before + train_metrics["train_passes"],
                   "images_per_second": train_metrics["train_samples"] / train_seconds,
                   "epoch_seconds": time.perf_counter() - started}
            if config.semi_supervised is not None:
                row["semi_supervised.coverage"] = train_loader.batch_sampler.unlabeled.coverage
                row["semi_supervised.passes"] = train_loader.batch_sampler.unlabeled.passes
            logger.log_epoch(row)
            improved = run.record(row, optimizer_steps=context.optimizer_steps)
            save_run(out, runtime, run, improved=improved, model=model, optimizer=optimizer, config=config,
                     data_state=train_loader.state_dict(), ema=ema)
            if runtime.is_main:
                print(summary_line(row, config.epochs), flush=True)
    except RuntimeError as error:
        stopped = collective_timeout(error, runtime)  # another rank stopped: one line naming this rank
        if stopped is None:
            raise
        leave_broken_group()
        raise stopped from None
    finally:
        logger.close()
    return row


class StepReport:
    """What an epoch shows while it runs: a progress bar (on a terminal) and, with ``runtime.log_steps``, one
    line every N steps. The mean loss is read from the device only when something shows it.

    Example:
        >>> import io, contextlib
        >>> report = StepReport(epoch=0, epochs=3, steps=4, bar=False, every=2)
        >>> sums = {"loss": torch.tensor(3.0), "samples": torch.tensor(6.0)}
        >>> with contextlib.redirect_stdout(io.StringIO()) as text:
        ...     for step in range(4):
        ...         report.step(step, sums, {"optim.lr": 0.05})
        >>> print(text.getvalue().strip())
        epoch 1/3  step 2/4  loss 0.5000  lr 0.05
        epoch 1/3  step 4/4  loss 0.5000  lr 0.05
    """

    def __init__(self, *, epoch: int, epochs: int, steps: int, bar: bool, every: int | None,
                 refresh: int = 20) -> None:
        self.epoch, self.epochs, self.steps = epoch, epochs, steps
        self.every, self.refresh = every, refresh
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True,
                            file=sys.stdout)

    def step(self, step: int, sums: Any, knobs: dict[str, float | int]) -> None:
        done = step + 1
        line = self.every is not None and (done % self.every == 0 or done == self.steps)
        refresh = self.bar is not None and done % self.refresh == 0
        if line or refresh:  # the only host read of the step, and only when shown
            loss = float(sums["loss"].item() / max(1.0, float(sums["samples"].item())))
            if refresh:
                self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # type: ignore[union-attr]
            if line:
                text = f"epoch {self.epoch + 1}/{self.epochs}  step {done}/{self.steps}  loss {loss:.4f}"
                if "optim.lr" in knobs:
                    text += f"  lr {float(knobs['optim.lr']):.4g}"
                if self.bar is not None:
                    self.bar.write(text, file=sys.stdout)
                else:
                    print(text, flush=True)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
