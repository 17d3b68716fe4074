"""``CyclicalCallback``: a :class:`~cycdata.loaders.CyclicalLoader` (and optionally :class:`CyclicalHooks`) run by a
PyTorch Lightning ``Trainer``.

Lightning reads ``len(train_dataloader)`` once and never tells a non-DataLoader which epoch it runs, so a plain
``CyclicalLoader`` would run epoch 0's batch count every epoch and its ledger would stay empty. The callback:

* reloads the train loader every epoch (``reload_dataloaders_every_n_epochs = 1``) after ``set_epoch(e + 1)``, so
  each epoch's ``len()`` is the plan's (Lightning's public knob; no private loop state is patched);
* records ``training_step``'s ``{"loss": ..., "per_sample_loss": ...}`` against the indices of the batch it was
  computed on (read when Lightning starts that batch);
* drives the plan's optimizer-side knobs (``plan=``): WD/momentum/LR and the temperature each batch, CGC in
  ``on_before_optimizer_step`` (gradients unscaled by the precision plugin, synced by DDP);
* keeps the loader's state in Lightning checkpoints and restores it before Lightning reads the length, so a
  resumed run gets the right epoch, mid-epoch included.

Settings it cannot follow (another reload interval, ``limit_train_batches``, ``gradient_clip_val`` with a planned
``grad_clip``, more ``max_epochs`` than the cycle spans, a different loader each epoch) raise with the fix.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cycdata.config import ConfigError
from cycdata.loaders import CyclicalLoader
from cycdata.plan import Plan
from cycdata.train.hooks import CyclicalHooks

try:
    import lightning.pytorch as pl
except ImportError:  # the older distribution name ships the same classes
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as error:
        raise ImportError("cycdata.integrations.lightning needs Lightning: pip install cycdata[lightning]") from error

__all__ = ["PER_SAMPLE_LOSS", "CyclicalCallback"]  # and PytorchLightningCyclicalCallback, built on first use

#: The key of ``training_step``'s returned dict whose 1-d tensor holds the batch's per-sample losses.
PER_SAMPLE_LOSS = "per_sample_loss"


def _train_loader_of(trainer: Any) -> Any:
    """What the fit's train source returns: the module's or datamodule's ``train_dataloader()``, or the loader
    passed to ``fit``. Lightning keeps that source on the fit loop only (no public accessor), and it is needed
    before Lightning reads the loader's length, to restore a checkpoint's loader state in time."""
    return trainer.fit_loop._data_source.dataloader()


def _check_trainer_settings(trainer: Any) -> None:
    """Refuse the Trainer settings under which Lightning would not run the plan's epochs."""
    every = trainer.reload_dataloaders_every_n_epochs
    if every not in (0, 1):
        raise ConfigError("reload_dataloaders_every_n_epochs",
                          f"CyclicalCallback reloads the train loader every epoch (each epoch has its own length), "
                          f"got {every}; leave it at 0 or 1")
    limit = trainer.limit_train_batches
    if limit is not None and limit != 1.0:
        raise ConfigError("limit_train_batches",
                          f"CyclicalCallback runs each epoch's planned batches, got limit_train_batches={limit}; "
                          "leave it at 1.0 and shorten the run with a smaller dataset "
                          "(torch.utils.data.Subset) or fewer epochs")


def _check_run_length(trainer: Any, loader: CyclicalLoader) -> None:
    max_epochs = trainer.max_epochs
    if max_epochs is not None and max_epochs > loader.epochs:
        raise ConfigError("max_epochs", f"the CyclicalLoader's cycle spans {loader.epochs} epochs, the Trainer runs "
                                        f"{max_epochs}; pass Trainer(max_epochs={loader.epochs}) or build the loader "
                                        f"with epochs={max_epochs}")


def _check_loader(loader: Any) -> CyclicalLoader:
    if not isinstance(loader, CyclicalLoader):
        raise ConfigError("train_dataloader", f"CyclicalCallback drives a CyclicalLoader, but train_dataloader gave a "
                                              f"{type(loader).__name__}; return the CyclicalLoader itself (or pass "
                                              "CyclicalCallback(loader=...))")
    return loader


def _per_sample_losses(outputs: Any) -> Tensor | None:
    """The per-sample losses ``training_step`` returned, detached (None when it returned none)."""
    if isinstance(outputs, dict) and outputs.get(PER_SAMPLE_LOSS) is not None:
        losses = outputs[PER_SAMPLE_LOSS]
        return losses.detach() if isinstance(losses, Tensor) else losses
    return None


class _CyclicalCallbackLogic:
    """Makes a Lightning ``Trainer`` run a ``CyclicalLoader``'s plan; add it to ``Trainer(callbacks=[...])``.

    Args:
        plan: a :class:`~cycdata.plan.Plan` whose optimizer-side knobs (weight decay, momentum, temperature,
            ``grad_clip``, the LR when the config gave it) are applied to the module's single optimizer through
            :class:`~cycdata.train.hooks.CyclicalHooks` (available as :attr:`hooks`; use
            ``hooks.scale_logits`` in ``training_step`` for CST). None: the loader's data knobs only.
        loader: the ``CyclicalLoader`` ``train_dataloader`` returns (default: found by calling it at fit start).
        clip_mode, set_lr: passed to ``CyclicalHooks``.

    ``training_step`` returns ``{"loss": losses.mean(), "per_sample_loss": losses}`` so that self-paced
    selection sees each sample's loss; a loader that selects by loss refuses a step that returns none.
    """

    def __init__(self, plan: Plan | None = None, *, loader: CyclicalLoader | None = None, clip_mode: str = "norm",
                 set_lr: bool | None = None) -> None:
        self.plan, self.clip_mode, self.set_lr = plan, clip_mode, set_lr
        self.loader: CyclicalLoader | None = loader
        self.hooks: CyclicalHooks | None = None
        self._pending_state: dict[str, Any] | None = None  # a checkpoint's loader state, until the loader is known
        self._batch_indices: Tensor | None = None  # the indices of the batch being trained
        self._fit_started = False

    # --- fit start: settings, the loader, a restored state, the hooks ----------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        _check_trainer_settings(trainer)
        trainer.reload_dataloaders_every_n_epochs = 1  # each epoch's len() is read anew (a public attribute)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        loader = _check_loader(self.loader if self.loader is not None else _train_loader_of(trainer))
        self.loader = loader
        _check_run_length(trainer, loader)
        if self._pending_state is not None:  # restored before the loader was known (the usual order)
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        if self.plan is not None:
            self.hooks = self._build_hooks(trainer)
        self._fit_started = True

    def _build_hooks(self, trainer: Any) -> CyclicalHooks:
        assert self.plan is not None
        if len(trainer.optimizers) != 1:
            raise ConfigError("plan", f"CyclicalCallback(plan=) drives one optimizer, the module has "
                                      f"{len(trainer.optimizers)}; return one optimizer from configure_optimizers")
        if "grad_clip" in self.plan.names and trainer.gradient_clip_val:
            raise ConfigError("gradient_clip_val", f"the plan clips gradients (grad_clip) and the Trainer clips too "
                                                   f"(gradient_clip_val={trainer.gradient_clip_val}); keep one: drop "
                                                   "gradient_clip_val or grad_clip from the plan")
        return CyclicalHooks(trainer.optimizers[0], self.plan, clip_mode=self.clip_mode, set_lr=self.set_lr)

    # --- each epoch and batch --------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        loader, epoch = self.loader, trainer.current_epoch
        if trainer.train_dataloader is not loader:
            raise ConfigError("train_dataloader", "train_dataloader returned a different loader than at fit start; "
                                                  "build the CyclicalLoader once (in __init__ or setup) and return "
                                                  "that same object every time")
        assert loader is not None
        if trainer.num_training_batches != loader.num_batches(epoch):
            raise ConfigError("train_dataloader", f"Lightning runs {trainer.num_training_batches} batches in epoch "
                                                  f"{epoch}, the plan {loader.num_batches(epoch)}: the loader's length "
                                                  "was read for another epoch; let CyclicalCallback drive set_epoch")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        loader = self.loader
        assert loader is not None
        planned = loader.batch
        # Lightning does not prefetch a loader of known length: the batch just yielded is the one being trained.
        # Should that change, refuse rather than credit losses to the wrong samples.
        if planned is None or planned.epoch != trainer.current_epoch or planned.number != batch_idx:
            where = "none" if planned is None else f"epoch {planned.epoch} batch {planned.number}"
            raise RuntimeError(f"CyclicalCallback: Lightning trains epoch {trainer.current_epoch} batch {batch_idx} "
                               f"but the loader last yielded {where} (a prefetching data fetcher?); run the loader "
                               "without prefetching")
        self._batch_indices = planned.indices
        if self.hooks is not None:
            self.hooks.update(trainer.current_epoch, fraction=batch_idx / max(1, trainer.num_training_batches))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loader, indices = self.loader, self._batch_indices
        assert loader is not None and indices is not None
        losses = _per_sample_losses(outputs)
        if losses is None:
            if getattr(loader.batch_sampler, "selecting", False):
                raise ConfigError(PER_SAMPLE_LOSS, "the CyclicalLoader selects samples by their losses, but "
                                                   "training_step returned none; return {'loss': losses.mean(), "
                                                   "'per_sample_loss': losses} with losses = F.cross_entropy(logits, "
                                                   "y, reduction='none')")
            return
        loader.record_loss(losses, indices=indices)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self.hooks is not None:
            self.hooks.clip_gradients(pl_module)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        assert self.loader is not None
        self.loader.set_epoch(trainer.current_epoch + 1)  # the next reload reads the next epoch's length

    # --- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The loader's state (a collective between epochs under torch.distributed: Lightning calls this on every
        rank)."""
        return {} if self.loader is None else {"loader": self.loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("loader")
        if state is None:
            return
        if self._fit_started and self.loader is not None:  # restored after on_fit_start (some strategies)
            self.loader.load_state_dict(state)
        else:
            self._pending_state = state


class CyclicalCallback(_CyclicalCallbackLogic, pl.Callback):
    __doc__ = _CyclicalCallbackLogic.__doc__


def __getattr__(name: str) -> Any:
    """``PytorchLightningCyclicalCallback``: the same callback for a ``pytorch_lightning.Trainer`` (that distribution
    checks callbacks against its own ``Callback`` class), built on first use."""
    if name != "PytorchLightningCyclicalCallback":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import pytorch_lightning
    except ImportError as error:
        raise ImportError("PytorchLightningCyclicalCallback needs pytorch_lightning: pip install cycdata[lightning]"
                          ) from error
    cls = type("PytorchLightningCyclicalCallback", (_CyclicalCallbackLogic, pytorch_lightning.Callback),
               {"__doc__": _CyclicalCallbackLogic.__doc__, "__module__": __name__})
    globals()[name] = cls  # built once
    return cls
