"""``CyclicalTrainer``: a transformers ``Trainer`` that runs a :class:`~cycdata.loaders.CyclicalLoader`'s plan.

A plain ``Trainer`` reads ``len()`` of its loader once and runs every epoch at epoch 0's length, and it takes a
whole gradient-accumulation window from the iterator before the first forward, so "the batch most recently
yielded" is not the batch being trained. ``CyclicalTrainer`` fixes both:

* every epoch runs the loader's own batch count for that epoch; ``max_steps`` (so the LR scheduler) is the sum
  over epochs of ``ceil(batches / gradient_accumulation_steps)``;
* each batch carries its own sample indices (key :data:`INDEX_KEY`, removed before the model sees the batch),
  and its per-sample losses are credited through them;
* optional :class:`~cycdata.train.hooks.CyclicalHooks`: cyclical weight decay and momentum before each
  optimizer step, CST (``logits / T`` in the training loss, never at evaluation), CGC in place of the
  Trainer's fixed ``max_grad_norm`` clipping, and the plan's LR (HF's scheduler then stands aside);
* checkpoints hold the loader's state (``cycdata_loader.pt``); ``train(resume_from_checkpoint=...)`` restores
  it and continues at the exact batch, without replaying the epoch through ``skip_first_batches``.

**Inputs.** HF models take keyword arguments: the loader's batches must be dicts of model inputs (a dataset whose
items are dicts of tensors, as Hugging Face datasets give, collates to one), or ``inputs=`` maps each batch to
such a dict (e.g. ``inputs=lambda b: {"x": b[0], "labels": b[1]}`` for ``(x, y)`` batches).

**Run length.** The loader's plan sets it: ``args.max_steps`` is refused, and ``args.num_train_epochs`` must be
the loader's epochs or HF's default (3), which the loader's epochs replace.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as error:  # pragma: no cover - the extra is installed for the tests
    raise ImportError("cycdata.integrations.hf needs transformers: pip install cycdata[hf]") from error

from cycdata.loaders import CyclicalLoader
from cycdata.plan import Plan
from cycdata.train.checkpoint import load_untrusted, save_checkpoint, verify_checksum
from cycdata.train.hooks import CyclicalHooks, clip_gradients

__all__ = ["INDEX_KEY", "LOADER_STATE_NAME", "CyclicalTrainer", "causal_lm_per_sample_loss", "per_sample_cross_entropy"]

#: The batch key that carries the batch's dataset indices (removed before the model's forward).
INDEX_KEY = "cycdata_index"
#: The loader's state inside an HF checkpoint folder.
LOADER_STATE_NAME = "cycdata_loader.pt"
_HF_DEFAULT_EPOCHS = 3.0
_HF_DEFAULT_MAX_GRAD_NORM = 1.0

PerSampleLoss = Callable[[Any, Mapping[str, Any]], Tensor]


@dataclass(frozen=True)
class _SampleIndices:
    """The batch's dataset indices (and its sample weights, None when all weigh 1), boxed so that the Trainer's
    ``_prepare_inputs`` leaves them on the CPU (a tensor would be moved to the GPU and read back at every
    record: a host sync per step)."""

    tensor: Tensor
    weights: Tensor | None = None


def _logits(outputs: Any) -> Tensor:
    return outputs["logits"] if isinstance(outputs, Mapping) else outputs.logits


def per_sample_cross_entropy(outputs: Any, inputs: Mapping[str, Any]) -> Tensor:
    """The default per-sample loss: cross-entropy of ``outputs.logits`` against ``inputs["labels"]``.

    2-d logits ``[B, C]`` with labels ``[B]`` give one loss per sample; 3-d logits ``[B, L, V]`` with labels
    ``[B, L]`` (aligned positions, e.g. token classification) give each sample's mean token loss over labels
    other than -100. A causal LM shifts its labels inside the model: use :func:`causal_lm_per_sample_loss`.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0], [0.0, 10.0]])
        >>> per_sample_cross_entropy({"logits": logits}, {"labels": torch.tensor([0, 1])}).round(decimals=3)
        tensor([0.6930, 0.0000])
    """
    logits, labels = _logits(outputs), inputs["labels"]
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    return _mean_token_loss(logits, labels)


def causal_lm_per_sample_loss(outputs: Any, inputs: Mapping[str, Any]) -> Tensor:
    """Each sample's mean next-token loss for a causal LM (logits at position t predict label t + 1, -100 ignored).

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> causal_lm_per_sample_loss({"logits": logits}, {"labels": torch.tensor([[1, 2, -100]])}).round(decimals=3)
        tensor([1.3860])
    """
    logits, labels = _logits(outputs), inputs["labels"]
    return _mean_token_loss(logits[:, :-1], labels[:, 1:])


def _mean_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    tokens = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=-100)
    counted = (labels != -100).sum(dim=1).clamp(min=1)  # a sample without labels counts 0, not NaN
    return tokens.view(labels.shape).sum(dim=1) / counted


def update_counts(batches: list[int], accumulation: int) -> list[int]:
    """Optimizer steps per epoch: ``ceil(batches / accumulation)`` (the Trainer steps on an epoch's last batch).

    Example:
        >>> update_counts([2, 20, 2], 2)
        [1, 10, 1]
    """
    return [math.ceil(count / accumulation) for count in batches]


def position(global_step: int, batches: list[int], accumulation: int) -> tuple[int, float]:
    """The (epoch, fraction of its batches done) before optimizer step ``global_step`` (0-based).

    Past the last epoch it returns ``(epochs, 0.0)``: the run is over.

    Example:
        >>> [position(step, [2, 20, 2], 1) for step in (0, 1, 2, 12, 23, 24)]
        [(0, 0.0), (0, 0.5), (1, 0.0), (1, 0.5), (2, 0.5), (3, 0.0)]
    """
    start = 0
    for epoch, updates in enumerate(update_counts(batches, accumulation)):
        if global_step < start + updates:
            return epoch, min((global_step - start) * accumulation, batches[epoch]) / batches[epoch]
        start += updates
    return len(batches), 0.0


def _as_model_inputs(batch: Any, inputs: Callable[[Any], Mapping[str, Any]] | None) -> dict[str, Any]:
    mapped = batch if inputs is None else inputs(batch)
    if not isinstance(mapped, Mapping):
        raise TypeError(
            f"CyclicalTrainer needs batches that are dicts of model inputs; the loader yielded a "
            f"{type(mapped).__name__}. Make the dataset's items dicts of tensors (e.g. {{'input_ids': ..., "
            "'labels': ...}}, as Hugging Face datasets give), or pass inputs=lambda batch: {'x': batch[0], "
            "'labels': batch[1]} to CyclicalTrainer"
        )
    if INDEX_KEY in mapped:
        raise ValueError(f"the batch already has a key {INDEX_KEY!r}, which CyclicalTrainer uses for the sample "
                         "indices; rename that field of the dataset")
    return dict(mapped)


class _IndexedBatches:
    """The loader as the Trainer sees it: each batch a dict that carries its own sample indices."""

    def __init__(self, loader: CyclicalLoader, inputs: Callable[[Any], Mapping[str, Any]] | None) -> None:
        self.loader, self.inputs = loader, inputs

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self) -> Any:  # the Trainer counts examples with len(dataloader.dataset)
        return self.loader.dataset

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            # Read now, as the batch is yielded: the Trainer fetches a whole accumulation window ahead.
            boxed = _SampleIndices(self.loader.batch_indices, self.loader.batch_weights)
            yield {**_as_model_inputs(batch, self.inputs), INDEX_KEY: boxed}


class _PlanDrivesLR:
    """The scheduler slot when the plan drives the LR: steps nothing, reports the optimizer's LR.

    Not a torch scheduler on purpose: one would mark the optimizer (``initial_lr``) and fight the hooks.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        """The hooks wrote this step's LR already."""

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the LR is a function of the restored step."""


class _FollowThePlan(TrainerCallback):
    """Sets the hooks' knobs before each optimizer step, reports the true ``state.epoch`` after it, and applies
    the last records when training ends."""

    def __init__(self, trainer: CyclicalTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer.cyclical_hooks is not None:
            epoch, fraction = position(state.global_step, trainer.epoch_batches, args.gradient_accumulation_steps)
            trainer.cyclical_hooks.update(min(epoch, trainer.cyclical_loader.epochs - 1), fraction)

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer's own formula counts from the resumed batch, not the epoch's start.
        epoch, fraction = position(state.global_step, self.trainer.epoch_batches, args.gradient_accumulation_steps)
        state.epoch = epoch + fraction

    def on_train_end(self, args, state, control, **kwargs):
        # The last epoch's records are applied, so the ledger read after train() holds every loss (every rank
        # ends training here, as the collective under torch.distributed needs).
        self.trainer.cyclical_loader.ledger.synchronize()


def _check_arguments(args: TrainingArguments, loader: CyclicalLoader, plan: Plan | None) -> None:
    """Refuse the TrainingArguments that would contradict the loader's plan, each with the fix."""
    if args.max_steps > 0:
        raise ValueError(f"TrainingArguments(max_steps={args.max_steps}) and the loader's plan both set the run's "
                         f"length; drop max_steps: CyclicalTrainer runs the plan's {loader.epochs} epochs")
    if args.num_train_epochs not in (_HF_DEFAULT_EPOCHS, loader.epochs):
        raise ValueError(f"TrainingArguments(num_train_epochs={args.num_train_epochs:g}) disagrees with the "
                         f"loader's epochs={loader.epochs}; leave num_train_epochs out (the loader's epochs set it) "
                         "or build the loader for the epochs you train")
    if plan is not None and "grad_clip" in plan.names and args.max_grad_norm != _HF_DEFAULT_MAX_GRAD_NORM:
        raise ValueError(f"TrainingArguments(max_grad_norm={args.max_grad_norm:g}) and the plan's cyclical "
                         "grad_clip would both decide the clipping; the plan's threshold replaces max_grad_norm: "
                         "leave max_grad_norm at its default, or drop grad_clip from the plan to keep HF's clipping")


class CyclicalTrainer(Trainer):
    """A transformers ``Trainer`` driven by a :class:`~cycdata.loaders.CyclicalLoader` (see the module doc).

    Args:
        model, args: as for ``Trainer``.
        cyclical_loader: the training loader (replaces ``train_dataset``). Its batches are dicts of model inputs,
            or ``inputs=`` maps them to one.
        hooks: ``None``; a :class:`~cycdata.plan.Plan` (hooks are built on the optimizer the Trainer creates);
            or a :class:`~cycdata.train.hooks.CyclicalHooks` built on the optimizer passed in ``optimizers=``.
        per_sample_loss: ``(outputs, inputs) -> Tensor[batch]``, the loss recorded per sample (default:
            :func:`per_sample_cross_entropy`; :func:`causal_lm_per_sample_loss` for causal LMs). With CST it
            is also the training loss (its mean, on ``logits / T``).
        inputs: maps a loader batch to the model's keyword inputs (default: the batch is that dict already).
        **kwargs: the other ``Trainer`` arguments (``eval_dataset``, ``callbacks``, ``optimizers``, ...).

    Raises:
        ValueError: ``train_dataset=`` given too, or TrainingArguments that contradict the plan (``max_steps``,
            another ``num_train_epochs``, ``max_grad_norm`` beside a planned ``grad_clip``).
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None, *,
                 cyclical_loader: CyclicalLoader, hooks: CyclicalHooks | Plan | None = None,
                 per_sample_loss: PerSampleLoss | None = None,
                 inputs: Callable[[Any], Mapping[str, Any]] | None = None, **kwargs: Any) -> None:
        if kwargs.get("train_dataset") is not None:
            raise ValueError("CyclicalTrainer trains on cyclical_loader=; drop train_dataset= (build the loader "
                             "over that dataset: CyclicalLoader(train_dataset, ...))")
        if not isinstance(cyclical_loader, CyclicalLoader):
            raise TypeError(f"cyclical_loader= takes a cycdata CyclicalLoader, got {type(cyclical_loader).__name__}")
        super().__init__(model=model, args=args, **kwargs)
        plan = hooks.plan if isinstance(hooks, CyclicalHooks) else hooks
        _check_arguments(self.args, cyclical_loader, plan)
        self.cyclical_loader = cyclical_loader
        self.cyclical_hooks: CyclicalHooks | None = hooks if isinstance(hooks, CyclicalHooks) else None
        self._hooks_plan = hooks if isinstance(hooks, Plan) else None
        if self.cyclical_hooks is not None and self.optimizer is not self.cyclical_hooks.optimizer:
            raise ValueError("CyclicalHooks must act on the optimizer the Trainer steps: pass the same one as "
                             "optimizers=(optimizer, None), or pass hooks=plan to build them on HF's optimizer")
        self.per_sample_loss = per_sample_loss or per_sample_cross_entropy
        self.batch_inputs = inputs
        self.epoch_batches = [cyclical_loader.num_batches(epoch) for epoch in range(cyclical_loader.epochs)]
        self._resumed_at: tuple[int, int] | None = None  # (epoch, batches already trained in it)
        if plan is not None and "temperature" in plan.names:
            # CST's loss is a per-batch mean computed here: the Trainer must scale it for accumulation itself.
            self.model_accepts_loss_kwargs = False
        self.add_callback(_FollowThePlan(self))

    # --- the loader and the run's length ------------------------------------------------------------

    def get_train_dataloader(self) -> _IndexedBatches:  # type: ignore[override]
        """The loader itself (never re-wrapped by accelerate), each batch carrying its indices."""
        return _IndexedBatches(self.cyclical_loader, self.batch_inputs)

    def set_initial_training_values(self, args: TrainingArguments, dataloader: Any):
        """The loader's epochs and its per-epoch batch counts instead of epoch 0's ``len()`` times epochs."""
        accumulation = args.gradient_accumulation_steps
        updates = update_counts(self.epoch_batches, accumulation)
        examples = len(self.cyclical_loader.dataset)
        return (self.cyclical_loader.epochs, updates[0], examples, examples * self.cyclical_loader.epochs,
                self.get_total_train_batch_size(args), self.epoch_batches[0], sum(updates))

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs,
                             resume_from_checkpoint, trial):
        epochs_trained, skipped = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial)
        if resume_from_checkpoint is None:
            return epochs_trained, skipped
        epoch, consumed = self._restore_loader(resume_from_checkpoint)
        self._resumed_at = (epoch, consumed)
        return epoch, 0  # 0: the loader continues where it stood; the Trainer must not skip batches itself

    def _restore_loader(self, checkpoint: str) -> tuple[int, int]:
        path = os.path.join(checkpoint, LOADER_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{checkpoint} has no {LOADER_STATE_NAME} (the loader's state); resume from a "
                             "checkpoint that CyclicalTrainer wrote")
        saved = load_untrusted(path)  # a file from disk: tensors and plain data only, never code
        verify_checksum(saved, path)
        state = saved["loader"]
        self.cyclical_loader.load_state_dict(state)
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        accumulation = self.args.gradient_accumulation_steps
        expected = sum(update_counts(self.epoch_batches[:epoch], accumulation)) + math.ceil(consumed / accumulation)
        if expected != self.state.global_step:
            raise ValueError(f"{checkpoint}: the loader stood at epoch {epoch}, batch {consumed} (step {expected}) "
                             f"but the trainer at step {self.state.global_step}; resume with the loader and "
                             "gradient_accumulation_steps of the run that wrote it")
        return epoch, consumed

    def _run_epoch(self, model, epoch, train_dataloader, steps_in_epoch, num_update_steps_per_epoch, trial,
                   ignore_keys_for_eval, start_time, resume_from_checkpoint, epochs_trained,
                   steps_trained_in_current_epoch):
        """One epoch of the loader's own length (in a resumed epoch: the batches it has left)."""
        done = self._resumed_at[1] if self._resumed_at is not None and epoch == self._resumed_at[0] else 0
        remaining = self.epoch_batches[epoch] - done
        super()._run_epoch(
            model=model, epoch=epoch, train_dataloader=train_dataloader, steps_in_epoch=remaining,
            num_update_steps_per_epoch=math.ceil(remaining / self.args.gradient_accumulation_steps), trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval, start_time=start_time,
            resume_from_checkpoint=resume_from_checkpoint, epochs_trained=epochs_trained,
            steps_trained_in_current_epoch=0)

    # --- the optimizer side -----------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None):
        optimizer = super().create_optimizer(model)
        if self._hooks_plan is not None and self.cyclical_hooks is None:
            self.cyclical_hooks = CyclicalHooks(self.optimizer, self._hooks_plan)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """HF's scheduler, unless the plan drives the LR: then a scheduler that steps nothing."""
        if self.cyclical_hooks is not None and self.cyclical_hooks.drives_lr and self.lr_scheduler is None:
            self.lr_scheduler = _PlanDrivesLR(optimizer or self.optimizer)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def _clip_grad_norm(self, model: nn.Module):
        """CGC at the plan's threshold when it has ``grad_clip`` (HF calls this while ``max_grad_norm > 0``)."""
        hooks = self.cyclical_hooks
        threshold = None if hooks is None else hooks.clip_threshold
        if threshold is None:
            return super()._clip_grad_norm(model)
        if hooks.clip_mode == "norm":  # accelerate unscales AMP gradients first
            return self.accelerator.clip_grad_norm_(model.parameters(), threshold)
        self.accelerator.unscale_gradients()
        norm = clip_gradients([p for p in model.parameters() if p.grad is not None], math.inf, "norm")
        hooks.clip_gradients(self.accelerator.unwrap_model(model))
        return norm

    # --- the loss ---------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss (or, with CST, the mean per-sample loss on ``logits / T``); each sample's loss is
        recorded in the loader's ledger through the batch's own indices."""
        boxed = inputs.pop(INDEX_KEY, None)
        if boxed is None or not model.training:  # evaluation, or a batch from elsewhere: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        given = dict(inputs)  # super pops the labels when label smoothing or compute_loss_func is set
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        temperature = 1.0 if self.cyclical_hooks is None else self.cyclical_hooks.temperature
        if temperature != 1.0:
            outputs["logits"] = _logits(outputs) / temperature
            per_sample = self.per_sample_loss(outputs, given)
            loss = per_sample.mean()
        else:
            per_sample = self.per_sample_loss(outputs, given)
        if boxed.weights is not None:  # soft self-paced weights, or pruning's inverse keep probabilities
            weights = boxed.weights.to(per_sample.device, non_blocking=True)
            loss = (per_sample * weights).sum() / per_sample.numel()
        self.cyclical_loader.record_loss(per_sample.detach(), indices=boxed.tensor)
        return (loss, outputs) if return_outputs else loss

    # --- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """HF's checkpoint plus the loader's state, written first so that no folder the Trainer finished lacks it."""
        state = self.cyclical_loader.state_dict()  # every rank: between epochs it is a collective
        if self.args.should_save:
            run_dir = self._get_output_dir(trial=trial)
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_checkpoint({"loader": state}, os.path.join(folder, LOADER_STATE_NAME))
        super()._save_checkpoint(model, trial)
