"""Batches of ``(images uint8 [B,C,H,W], labels int64 [B], indices int64 [B])`` from a batch sampler.

In-memory datasets (anything with ``images`` and ``labels`` tensors) are gathered by index in
the main process: for data that fits in memory this beats per-sample worker processes. Other
datasets go through a ``torch.utils.data.DataLoader`` whose batch sampler, living in the main
process, decides the indices; each item comes back with its dataset index so per-sample losses
can be mapped back.

Example:
    >>> import torch
    >>> from cycdata.samplers import ShuffledBatchSampler
    >>> class Tiny:
    ...     images = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    ...     labels = torch.arange(6)
    ...     def __len__(self): return 6
    >>> loader = BatchLoader(Tiny(), ShuffledBatchSampler(6, 4, shuffle=False))
    >>> [indices.tolist() for _, _, indices in loader]
    [[0, 1, 2, 3], [4, 5]]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cycdata.clock import Clock
from cycdata.ledger import LossLedger
from cycdata.samplers import CyclicalBatchSampler, EpochPlan, SemiSupervisedBatchSampler
from cycdata.schedules import as_schedule

__all__ = ["AugmentedDataset", "BatchLoader", "CyclicalLoader", "IndexedDataset", "choose_placement"]

Batch = tuple[Tensor, Tensor, Tensor]


class _BatchSampler(Protocol):
    def __iter__(self) -> Iterator[list[int]]: ...
    def __len__(self) -> int: ...


class IndexedDataset(Dataset):
    """Wraps a dataset of ``(image, label)`` so items are ``(image, label, index)``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image, label = self.dataset[index]
        return image, label, index


def _is_in_memory(dataset: object) -> bool:
    return isinstance(getattr(dataset, "images", None), Tensor) and isinstance(getattr(dataset, "labels", None), Tensor)


class BatchLoader(Iterable[Batch]):
    """Iterates one epoch of batches as chosen by ``batch_sampler``.

    Args:
        dataset: ``(uint8 image, label)`` items, or an in-memory dataset with ``images``/``labels``.
        batch_sampler: yields lists of indices (call its ``set_epoch`` before each epoch).
        num_workers: worker processes for datasets that are not in memory.
        pin_memory: pin host batches for asynchronous copies to a GPU.
    """

    def __init__(self, dataset: Dataset, batch_sampler: _BatchSampler, *, num_workers: int = 0,
                 pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.pin_memory = pin_memory
        self._loader: DataLoader | None = None
        if not _is_in_memory(dataset):
            self._loader = DataLoader(
                IndexedDataset(dataset), batch_sampler=batch_sampler, num_workers=num_workers,  # type: ignore[arg-type]
                pin_memory=pin_memory, persistent_workers=num_workers > 0,
            )

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        if self._loader is not None:
            for images, labels, indices in self._loader:
                yield images, torch.as_tensor(labels), torch.as_tensor(indices)
            return
        images, labels = self.dataset.images, self.dataset.labels  # type: ignore[attr-defined]
        for batch in self.batch_sampler:
            indices = torch.as_tensor(batch, dtype=torch.long)
            batch_images, batch_labels = images.index_select(0, indices), labels.index_select(0, indices)
            if self.pin_memory:
                batch_images, batch_labels = batch_images.pin_memory(), batch_labels.pin_memory()
            yield batch_images, batch_labels, indices


def _ladder_and_strength(ladder: Any, strength: Any, factor: float) -> tuple[Any, Any]:
    if ladder is None:
        if strength is not None:
            raise ValueError("strength= needs a ladder= (a built-in name, a YAML file or a Ladder)")
        return None, None
    from cycdata.augment_ladder.ladder import Ladder, load_ladder

    resolved = ladder if isinstance(ladder, Ladder) else load_ladder(ladder)
    return resolved, as_schedule({"easy": 0.0, "hard": 1.0} if strength is None else strength, factor)


def choose_placement(dataset: Any, placement: str, device: torch.device | str | None,
                     dataloader_kwargs: dict[str, Any], with_strength: bool = False) -> str:
    """Where batches come from: ``device`` (resident tensors), ``ffcv`` (.beton) or ``workers`` (DataLoader).

    ``auto`` picks the fastest that fits: a dataset that fits in half the device's free memory lives
    there whole (a .beton is decoded once for it); a .beton that does not is read by ffcv; anything
    else goes through DataLoader workers.

    Example:
        >>> import torch
        >>> from cycdata.loaders.datasets import TensorImageDataset
        >>> data = TensorImageDataset(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.long))
        >>> choose_placement(data, "auto", None, {}), choose_placement(data, "auto", None, {"num_workers": 2})
        ('device', 'workers')
    """
    from .device_loader import PLACEMENTS, fits_in_memory

    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    beton = hasattr(dataset, "image_bytes") and hasattr(dataset, "decoded")
    target = torch.device(device or "cpu")
    custom = [key for key in ("collate_fn",) if dataloader_kwargs.get(key) is not None] + (
        ["with_strength"] if with_strength else [])
    if placement == "auto":
        if beton:
            return "device" if fits_in_memory(dataset.image_bytes, target) else "ffcv"
        in_memory = _is_in_memory(dataset)
        if in_memory and not custom and dataloader_kwargs.get("num_workers", 0) == 0 and (
                target.type == "cpu" or fits_in_memory(dataset.images.numel(), target)):
            return "device"
        return "workers"
    if placement == "ffcv" and not beton:
        raise ValueError("placement='ffcv' reads .beton files; convert the dataset first (cycdata convert DATASET "
                         "NAME.beton) and pass the path, or choose placement='device' or 'workers'")
    if placement == "workers" and beton:
        raise ValueError("a .beton is read with placement='ffcv' or 'device' (decoded once), not by DataLoader workers")
    if placement != "workers" and custom:
        raise ValueError(f"{' and '.join(custom)} apply to DataLoader workers; use placement='workers' with them")
    return placement


class AugmentedDataset(Dataset):
    """Items ``(image, *rest)`` of ``dataset`` with the image augmented at the strength sent with the index.

    Indices arrive as ``(index, strength, seed)`` from the loader's batch sampler, in the worker.
    """

    def __init__(self, dataset: Dataset, transform: Any, with_strength: bool = False) -> None:
        self.dataset, self.transform, self.with_strength = dataset, transform, with_strength

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, float, int]) -> tuple[Any, ...]:
        index, strength, seed = key
        item = self.dataset[index]
        image = item[0]
        if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
            raise TypeError("a ladder in CyclicalLoader needs items (image, ...) with a uint8 [C, H, W] tensor image; "
                            f"got {type(image).__name__}; convert with torchvision.transforms.v2.PILToTensor()")
        augmented = self.transform(image, strength, seed)
        return (augmented, *item[1:], strength) if self.with_strength else (augmented, *item[1:])


class _WithStrength:
    """Wraps a batch sampler: each index leaves the main process with the epoch's strength and a seed."""

    def __init__(self, inner: Any, strength_at: Any, seed: int) -> None:
        self.inner, self.strength_at, self.seed = inner, strength_at, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[list[tuple[int, float, int]]]:
        epoch = self.inner.epoch
        strength = self.strength_at(epoch)
        for batch in self.inner:
            yield [(index, strength, (self.seed * 1_000_003 + epoch) * 1_000_033 + index) for index in batch]


class CyclicalLoader:
    """A drop-in for ``DataLoader(dataset, batch_size=B, shuffle=True, ...)`` with cyclical knobs.

    Swap the constructor, call ``record_loss`` after each forward pass, and the loader varies the
    batch size each epoch and (with ``keep`` or ``threshold``) trains on the self-paced selection
    of the samples; with ``labeled`` and ``unlabeled_ratio`` each batch is a labeled batch followed
    by a cyclical share of unlabeled samples. It yields exactly what a ``DataLoader`` over the same
    dataset yields (same collate, same structure). The sampler decides everything in the main
    process, so workers (persistent ones too) see every change with the indices they get.

    Args:
        dataset: any map-style dataset.
        epochs: epochs the cycle spans.
        batch_size: a number, ``{"easy": 256, "hard": 64}`` or a schedule (per process).
        keep: kept fraction of lowest-loss samples (number, mapping or schedule), or None.
        threshold: absolute loss threshold instead of ``keep``, or None.
        weighting: ``hard`` | ``linear`` | ``log`` | ``mixture``; soft weights are in ``batch_weights``.
        per_class: select ``keep`` within each class (labels from ``labels`` or ``dataset.labels``).
        labeled, unlabeled_ratio: semi-supervised mode: the labeled indices and the unlabeled
            samples per labeled one (every other index is the unlabeled pool).
        factor: shared cyclical factor for mapping knobs. seed: run seed.
        schedule_unit, normalization: as in the config language (the clock).
        cycle: the window ``(start, end)`` of the easy→hard→easy cycle these ``epochs`` cover.
        refresh_fraction: share of excluded samples re-admitted each epoch to refresh stale losses.
        ledger_ema, ledger_device: loss-ledger options.
        rank, world_size: default from the initialised process group (like DistributedSampler).
        drop_last: drop each epoch's last incomplete batch.
        ladder, strength: an augmentation ladder (name, YAML file or Ladder) and its strength knob
            (default ``{"easy": 0, "hard": 1}``). With workers, items must be ``(uint8 [C,H,W] image, ...)``;
            each is augmented in its worker at the strength sent with its index. In-memory datasets
            without workers are augmented as whole batches in the main process.
        augment_backend: ``torch`` | ``torchvision`` | ``albumentations`` kernels for the worker path.
        with_strength: append the strength each item was augmented at (a diagnostic, workers only).
        placement: ``auto`` | ``device`` | ``workers`` | ``ffcv``: where batches come from (see
            :func:`choose_placement`). ``dataset`` may also be the path of a ``.beton`` written by
            ``cycdata convert`` (its train split), read through ffcv or decoded once onto the device.
        device: where device-resident data lives and ffcv puts its batches (default: the CPU).
        **dataloader_kwargs: passed to ``torch.utils.data.DataLoader`` (num_workers, collate_fn,
            pin_memory, persistent_workers, ...). ``shuffle``/``sampler``/``batch_sampler`` are ours.

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(100, 3), torch.randint(0, 2, (100,)))
        >>> loader = CyclicalLoader(data, epochs=3, batch_size={"easy": 50, "hard": 10},
        ...                         keep={"easy": 0.5, "hard": 1.0})
        >>> for epoch in range(3):
        ...     sizes = []
        ...     for x, y in loader:
        ...         loader.record_loss((x ** 2).sum(1))   # per-sample losses of this batch
        ...         sizes.append(len(y))
        ...     print(epoch, sum(sizes), max(sizes))
        0 50 50
        1 100 10
        2 50 50
    """

    def __init__(self, dataset: Dataset | str | os.PathLike[str], *, epochs: int, batch_size: Any = 64,
                 keep: Any = None, threshold: Any = None, weighting: str = "hard", per_class: bool = False,
                 labels: Tensor | None = None, labeled: Tensor | None = None, unlabeled_ratio: Any = None,
                 factor: float = 2.0, seed: int = 0, schedule_unit: str = "epoch", normalization: str = "reference",
                 refresh_fraction: float = 0.05, ledger_ema: float | None = None,
                 ledger_device: torch.device | str | None = None, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False, ladder: Any = None, strength: Any = None,
                 augment_backend: str = "torch", with_strength: bool = False, placement: str = "auto",
                 device: torch.device | str | None = None, cycle: tuple[float, float] = (0.0, 1.0),
                 **dataloader_kwargs: Any) -> None:
        for reserved in ("shuffle", "sampler", "batch_sampler"):
            if dataloader_kwargs.get(reserved) not in (None, False):
                raise ValueError(f"CyclicalLoader chooses the samples itself; drop the {reserved}= argument")
            dataloader_kwargs.pop(reserved, None)
        if isinstance(dataset, (str, os.PathLike)):
            from .ffcv_loader import BetonDataset

            dataset = BetonDataset(dataset, "train")
        self.dataset = dataset
        self.clock = Clock(epochs, unit=schedule_unit, normalization=normalization,  # type: ignore[arg-type]
                           start=cycle[0], end=cycle[1])
        size = len(dataset)  # type: ignore[arg-type]
        self.semi_supervised = labeled is not None
        if self.semi_supervised:
            if keep is not None or threshold is not None:
                raise ValueError("self-paced selection and semi-supervised batches cannot be combined in one loader")
            if unlabeled_ratio is None:
                raise ValueError("semi-supervised mode needs unlabeled_ratio= (a number, mapping or schedule)")
            labeled = torch.as_tensor(labeled, dtype=torch.long)
            mask = torch.ones(size, dtype=torch.bool)
            mask[labeled] = False
            self.batch_sampler: Any = SemiSupervisedBatchSampler(
                labeled, mask.nonzero().flatten(), clock=self.clock, batch_size=as_schedule(batch_size, factor),
                ratio=as_schedule(unlabeled_ratio, factor), seed=seed, rank=rank, world_size=world_size)
            self.ledger = LossLedger(size, ema=ledger_ema, device=ledger_device)
        else:
            if per_class and labels is None:
                labels = getattr(dataset, "labels", None)
                if labels is None:
                    raise ValueError("per_class=True needs labels= (one class label per sample)")
            selecting = keep is not None or threshold is not None
            self.ledger = LossLedger(size, ema=ledger_ema, device=ledger_device)
            self.batch_sampler = CyclicalBatchSampler(
                size, clock=self.clock, batch_size=as_schedule(batch_size, factor),
                keep=None if keep is None else as_schedule(keep, factor),
                threshold=None if threshold is None else as_schedule(threshold, factor), weighting=weighting,
                labels=torch.as_tensor(labels) if per_class and selecting else None, ledger=self.ledger,
                refresh_fraction=refresh_fraction, seed=seed, rank=rank, world_size=world_size, drop_last=drop_last)
        self._pin = bool(dataloader_kwargs.get("pin_memory", False))
        self.ladder, self.strength = _ladder_and_strength(ladder, strength, factor)
        self._seed = seed
        self.placement = choose_placement(dataset, placement, device, dataloader_kwargs, with_strength)
        self._loader: DataLoader | None = None
        self._source: Any = None
        if self.placement == "device":
            from .device_loader import DeviceSource

            self._source = DeviceSource(dataset, device or "cpu", pin_memory=self._pin)
        elif self.placement == "ffcv":
            from .ffcv_loader import FFCVSource

            self._source = FFCVSource(dataset, num_workers=dataloader_kwargs.get("num_workers") or None,  # type: ignore[arg-type]
                                      device=device)
        else:
            source_dataset, source_sampler = dataset, self.batch_sampler
            if self.ladder is not None:
                from cycdata.augment_ladder.backends import LadderTransform

                # The strength and a per-sample seed travel with each index (DESIGN rule 3): workers,
                # persistent ones included, never hold a strength of their own.
                source_dataset = AugmentedDataset(dataset, LadderTransform(self.ladder, augment_backend),
                                                  with_strength)
                source_sampler = _WithStrength(self.batch_sampler, self._strength_at, seed)
            self._loader = DataLoader(source_dataset, batch_sampler=source_sampler, **dataloader_kwargs)
        self.epoch = 0
        self.batch_indices: Tensor = torch.empty(0, dtype=torch.long)
        self.labeled_count = 0
        self._consumed = 0
        self._in_epoch = False

    # --- the epoch -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration runs (it also advances by itself after each full pass)."""
        self.epoch = epoch
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def samples_per_epoch(self) -> int:
        """This process's samples in the current epoch (labeled ones in semi-supervised mode)."""
        return self.batch_sampler.samples_per_epoch

    def __iter__(self) -> Iterator[Any]:
        self.batch_sampler.set_epoch(self.epoch)
        self._in_epoch = True
        source = self._loader if self._loader is not None else self._gather()
        for batch in source:
            self.batch_indices = torch.as_tensor(self.batch_sampler.yielded.popleft(), dtype=torch.long)
            if self.semi_supervised:
                self.labeled_count = self.batch_sampler.labeled_counts.popleft()
            else:
                self.labeled_count = len(self.batch_indices)
            self._consumed += 1
            yield batch
        # The epoch is complete: every rank applies the same records, then the next epoch starts.
        self.ledger.synchronize()
        self._in_epoch = False
        self._consumed = 0
        self.set_epoch(self.epoch + 1)

    def _gather(self) -> Iterator[list[Tensor]]:
        """Device-resident and ffcv data: batches of tensors (what default_collate would build); a ladder
        augments each whole batch where it lies, with per-sample parameters."""
        # ffcv needs the epoch's whole order before it starts; the device path takes batches as they come.
        batches = self.batch_sampler.batches(as_tensors=True)
        if self.placement == "ffcv":
            batches = list(batches)
        for number, (images, labels, _) in enumerate(self._source.epoch(batches)):
            if self.ladder is not None:
                generator = torch.Generator(images.device)
                generator.manual_seed(self._seed * 1_000_003 + self.epoch * 10_007 + number)
                pixels = self.ladder.apply(images.float() / 255.0, self._strength_at(self.epoch), generator)
                images = (pixels * 255.0).round_().clamp_(0, 255).to(torch.uint8)
            yield [images, labels]

    def _strength_at(self, epoch: int) -> float:
        return 0.0 if self.strength is None else min(1.0, max(0.0, float(self.strength(self.clock.progress(epoch)))))

    # --- losses ---------------------------------------------------------------------------------

    def record_loss(self, losses: Tensor) -> None:
        """Record per-sample losses of the batch most recently yielded (its labeled part in SSL mode).

        No host synchronisation: the losses stay on their device until the epoch ends.
        """
        count = len(losses)
        if count not in (len(self.batch_indices), self.labeled_count):
            raise ValueError(f"record_loss got {count} losses for a batch of {len(self.batch_indices)} samples "
                             f"({self.labeled_count} labeled); pass one loss per sample (reduction='none')")
        # The loader's index tensors are its own and never modified: no defensive copy.
        self.ledger.record(self.batch_indices[:count], losses, copy_indices=False)

    @property
    def batch_weights(self) -> Tensor | None:
        """Self-paced weights of the current batch's samples (None with hard weighting)."""
        if self.semi_supervised:
            return None
        weights = self.batch_sampler.plan(self.epoch if self._in_epoch else self.epoch - 1).weights
        return None if weights is None else weights[self.batch_indices]

    @property
    def knobs(self) -> dict[str, float | int]:
        """What the loader does this epoch, by dotted name (for logs)."""
        if self.semi_supervised:
            sampler = self.batch_sampler
            return {"data.batch_size": sampler.batch_size_at(self.epoch),
                    "semi_supervised.ratio": sampler.ratio_at(self.epoch),
                    "semi_supervised.coverage": sampler.unlabeled.coverage,
                    "semi_supervised.passes": sampler.unlabeled.passes}
        plan = self.batch_sampler.plan(self.epoch)
        knobs: dict[str, float | int] = {"data.batch_size": plan.batch_size}
        if self.ladder is not None:
            knobs["augment.strength"] = self._strength_at(self.epoch)
        if self.batch_sampler.selecting:
            knobs.update({"self_paced.kept": plan.kept, "self_paced.threshold": plan.threshold,
                          "self_paced.unseen": plan.unseen, "self_paced.refreshed": plan.refreshed,
                          "self_paced.nonfinite": self.ledger.nonfinite_count})
        return knobs

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue, mid-epoch included (torchdata's StatefulDataLoader protocol)."""
        state: dict[str, Any] = {"version": 1, "epoch": self.epoch, "consumed": self._consumed if self._in_epoch else 0,
                                 "ledger": self.ledger.state_dict()}
        if self.semi_supervised:
            sampler = self.batch_sampler
            state["sampler"] = sampler.epoch_start_state if self._in_epoch else sampler.state_dict()
        elif self._in_epoch:
            state["plan"] = dataclasses.asdict(self.batch_sampler.plan(self.epoch))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != 1:
            raise ValueError("not a CyclicalLoader state of version 1")
        self.ledger.load_state_dict(state["ledger"])
        self.epoch = int(state["epoch"])
        consumed = int(state["consumed"])
        if self.semi_supervised:
            self.batch_sampler.load_state_dict(state["sampler"], skip_batches=consumed)
        elif "plan" in state:
            self.batch_sampler.restore_plan(EpochPlan(**state["plan"]), skip_batches=consumed)
        self.batch_sampler.set_epoch(self.epoch)
        self._consumed = consumed
