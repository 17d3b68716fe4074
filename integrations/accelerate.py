"""A :class:`~cycdata.loaders.CyclicalLoader` under Hugging Face Accelerate (``pip install cycdata[hf]``).

``accelerator.prepare`` only prepares ``torch.utils.data.DataLoader`` instances and returns anything else
unchanged (accelerate 1.15 ``Accelerator._prepare_one``); rebuilding the loader as a ``DataLoaderShard`` would
throw away its batch sampler. :func:`prepare` does instead what ``prepare`` does for a DataLoader, the
loader's own way::

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model, optimizer = accelerator.prepare(model, optimizer)
    loader = prepare(accelerator, CyclicalLoader(dataset, epochs=E, batch_size={"easy": 256, "hard": 64}))
    for epoch in range(E):
        for x, y in loader:                              # on accelerator.device
            with accelerator.accumulate(model):          # sees the epoch's last batch
                losses = F.cross_entropy(model(x), y, reduction="none")
                loader.record_loss(losses.detach())
                accelerator.backward(losses.mean())
                optimizer.step(); optimizer.zero_grad()
    accelerator.save_state(folder)   # also writes the loader's state; load_state(folder) resumes mid-epoch

* **Device**: every batch goes to ``accelerator.device`` (``send_to_device``), when it is asked for.
* **Sharding** is the loader's own: it reads rank and world size from the process group when an epoch
  begins, so every process gets a disjoint share with the same batch count and sizes.
* **Gradient accumulation**: the wrapper tells accelerate's ``GradientState`` when the batch being yielded
  is the epoch's last (the loader knows its length, so nothing is fetched ahead and ``loader.batch_indices``
  stays the batch just yielded).
* **Resume**: :meth:`Accelerator.save_state` writes each process's loader state (``cycdata_loader_rank{r}.pt``,
  a cycdata checkpoint: tensors and plain data, checksummed) and :meth:`Accelerator.load_state` restores it,
  read without executing code (unlike ``register_for_checkpointing``, whose pickles accelerate loads with
  ``weights_only=False``). ``accelerate.skip_first_batches`` cannot skip a loader's planned batches: on the
  wrapper it raises, pointing to ``load_state``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    from accelerate import Accelerator
    from accelerate.data_loader import DataLoaderStateMixin
    from accelerate.utils import send_to_device
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("cycdata.integrations.accelerate needs accelerate: pip install cycdata[hf]") from None

from cycdata.loaders import CyclicalLoader
from cycdata.train.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["AcceleratedLoader", "loader_state_file", "prepare"]

_SKIP_MESSAGE = ("skip_first_batches cannot skip a CyclicalLoader's planned batches (their sizes and samples vary "
                 "by epoch); resume mid-epoch with accelerator.load_state(folder) after "
                 "accelerator.save_state(folder): cycdata.integrations.accelerate.prepare saves the loader's "
                 "position with it")


def loader_state_file(folder: str | Path, rank: int) -> Path:
    """Where :meth:`Accelerator.save_state` keeps process ``rank``'s loader state inside its folder.

    One file per process: mid-epoch, each rank's pending loss records are its own until the epoch ends.
    """
    return Path(folder) / f"cycdata_loader_rank{rank}.pt"


class AcceleratedLoader(DataLoaderStateMixin):
    """A :class:`CyclicalLoader` driven by accelerate: batches on ``device``, the epoch's end told to
    ``accelerator.accumulate``. Everything else (``record_loss``, ``batch_indices``, ``set_epoch``,
    ``total_steps``, ``state_dict``, ...) is the loader's own, reached through this wrapper.
    """

    def __init__(self, loader: CyclicalLoader, accelerator: Accelerator, non_blocking: bool = False) -> None:
        self.loader = loader
        self.device = accelerator.device
        self.gradient_state = accelerator.gradient_state  # what DataLoaderStateMixin.begin/end report to
        self._non_blocking = non_blocking
        # gather_for_metrics trims a last batch padded to the total batch size; the loader pads nothing
        # accelerate could know about (its batch sizes vary), so the remainder stays unknown (-1).
        self._drop_last = True

    @property
    def dataset(self) -> Any:
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        # Only called for names the wrapper lacks: the loader's API (record_loss, batch_indices, epoch, ...).
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        if name in ("sampler", "batch_sampler"):
            # accelerate.skip_first_batches reads .sampler: the one place to say what to do instead. An
            # AttributeError keeps getattr(loader, "sampler", None) (Lightning, transformers) working.
            raise AttributeError(_SKIP_MESSAGE)
        return getattr(self.loader, name)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration runs (as ``CyclicalLoader.set_epoch``)."""
        self.loader.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        self.begin()
        try:
            batches = iter(self.loader)
            for number, batch in enumerate(batches, start=1):
                # The running epoch's count, read once it has begun (before, len() may describe the last one).
                self.end_of_dataloader = number == self.loader.num_batches(self.loader.epoch)
                yield send_to_device(batch, self.device, non_blocking=self._non_blocking)
        finally:  # complete or abandoned: accelerate stops treating this as the active loader
            self.end()


def _save_hook(loader: CyclicalLoader, rank: int) -> Any:
    def save_loader_state(models: list[Any], weights: list[Any], output_dir: str) -> None:
        # Every process saves (between epochs state_dict is a collective: all ranks must call it).
        save_checkpoint({"loader": loader.state_dict()}, loader_state_file(output_dir, rank))

    return save_loader_state


def _load_hook(loader: CyclicalLoader, rank: int) -> Any:
    def load_loader_state(models: list[Any], input_dir: str) -> None:
        loader.load_state_dict(load_checkpoint(loader_state_file(input_dir, rank))["loader"])

    return load_loader_state


def prepare(accelerator: Accelerator, loader: CyclicalLoader, *, non_blocking: bool = False) -> AcceleratedLoader:
    """``accelerator.prepare`` for a :class:`CyclicalLoader`: batches on the accelerator's device, the epoch's
    end seen by ``accelerator.accumulate``, and the loader's state saved and restored by
    ``accelerator.save_state`` / ``load_state``. Call it once per loader.

    Raises:
        TypeError: ``loader`` is not a CyclicalLoader (prepare a plain DataLoader with ``accelerator.prepare``).
    """
    if not isinstance(loader, CyclicalLoader):
        raise TypeError(f"prepare takes a CyclicalLoader, got {type(loader).__name__}; prepare other loaders with "
                        "accelerator.prepare(loader)")
    rank = accelerator.process_index
    accelerator.register_save_state_pre_hook(_save_hook(loader, rank))
    accelerator.register_load_state_pre_hook(_load_hook(loader, rank))
    return AcceleratedLoader(loader, accelerator, non_blocking=non_blocking)
