"""``CyclicalLoader``, the drop-in DataLoader, and ``BatchLoader``, the evaluation loader.

Both take their indices from a batch sampler that lives in the main process. cycdata's own in-memory
datasets are gathered by index in the main process (for data that fits in memory this beats
per-sample worker processes); every other dataset goes through a ``torch.utils.data.DataLoader``, its
items fetched by its own ``__getitem__``, and each item comes back with its dataset index, so a
per-sample loss is always credited to the sample it was computed on.

Example:
    >>> import torch
    >>> from cycdata.loaders.datasets import TensorImageDataset
    >>> from cycdata.samplers import ShuffledBatchSampler
    >>> tiny = TensorImageDataset(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.arange(6))
    >>> loader = BatchLoader(tiny, ShuffledBatchSampler(6, 4, shuffle=False))
    >>> [indices.tolist() for _, _, indices in loader]
    [[0, 1, 2, 3], [4, 5]]
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler
from torch.utils.data._utils.collate import default_collate

from cycdata.ledger import LossLedger
from cycdata.loaders.datasets import ImageFileDataset, TensorImageDataset
from cycdata.plan import Plan
from cycdata.samplers import (
    CyclicalBatchSampler,
    EpochPlan,
    PlannedBatch,
    SemiSupervisedBatchSampler,
    data_plan,
    integer_vector,
    labeled_pools,
)

__all__ = ["AugmentedDataset", "BatchLoader", "CyclicalLoader", "IndexedDataset", "choose_placement",
           "is_resident_dataset"]

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


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.ndim}-d {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def is_resident_dataset(dataset: object) -> bool:
    """Whether ``dataset`` is cycdata's own in-memory tensor dataset, safe to gather by index.

    Only cycdata's own type: a user's dataset that happens to have ``images`` and ``labels`` tensors
    still has a ``__getitem__`` (a transform, extra fields) that must not be bypassed.
    """
    return isinstance(dataset, TensorImageDataset)


class BatchLoader(Iterable[Batch]):
    """Iterates one epoch of batches as chosen by ``batch_sampler``.

    Args:
        dataset: ``(uint8 image, label)`` items, or cycdata's in-memory ``TensorImageDataset``.
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
        if not is_resident_dataset(dataset):
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


def _ladder_and_strength(ladder: Any, strength: Any) -> tuple[Any, Any]:
    if ladder is None:
        if strength is not None:
            raise ValueError("strength= needs a ladder= (a built-in name, a YAML file or a Ladder)")
        return None, None
    from cycdata.augment_ladder.ladder import Ladder, load_ladder

    resolved = ladder if isinstance(ladder, Ladder) else load_ladder(ladder)
    return resolved, {"easy": 0.0, "hard": 1.0} if strength is None else strength


def choose_placement(dataset: Any, placement: str, device: torch.device | str | None,
                     dataloader_kwargs: dict[str, Any], with_strength: bool = False) -> str:
    """Where batches come from: ``device`` (resident tensors), ``ffcv`` (.beton) or ``workers`` (DataLoader).

    ``auto`` picks the fastest that serves the dataset as it is: cycdata's own in-memory dataset that
    fits in half the device's free memory lives there whole (a .beton is decoded once for it); a .beton
    that does not is read by ffcv; anything else (every user dataset) goes through a DataLoader, so its
    ``__getitem__`` runs. ``placement="device"`` asks for the resident path explicitly.

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
        if is_resident_dataset(dataset) and not custom and dataloader_kwargs.get("num_workers", 0) == 0 and (
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
    """The user's dataset behind keys ``(index, ticket[, strength, seed])`` sent by the loader's sampler.

    Each item is fetched by the dataset's own ``__getitem__`` (or ``__getitems__``), augmented in the
    worker at the strength sent with its index when there is a ladder, and comes back with its index
    and its batch's ticket: what the loader hands out and what it credits losses to are one object.
    """

    def __init__(self, dataset: Dataset, transform: Any = None, with_strength: bool = False) -> None:
        self.dataset, self.transform, self.with_strength = dataset, transform, with_strength

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, ...]) -> tuple[Any, int, int]:
        if self._sized:
            return self._sized_item(key)
        return self._finish(self.dataset[key[0]], key)

    @property
    def _sized(self) -> bool:
        # cycdata's own image files are cropped from the full image, before the images of different sizes
        # would be collated; any other dataset's __getitem__ runs as it is.
        return self.transform is not None and isinstance(self.dataset, ImageFileDataset)

    def _sized_item(self, key: tuple[int, ...]) -> tuple[Any, int, int]:
        index, ticket, strength, seed = key[0], key[1], key[2], key[3]
        dataset: ImageFileDataset = self.dataset  # type: ignore[assignment]
        image = self.transform.sized(lambda magnitude, generator: dataset.resized_crop(index, magnitude, generator)[0],
                                     strength, seed)
        label = int(dataset.labels[index])
        return ((image, label, strength) if self.with_strength else (image, label)), index, ticket

    def __getitems__(self, keys: list[tuple[int, ...]]) -> list[tuple[Any, int, int]]:
        if self._sized:
            return [self._sized_item(key) for key in keys]
        # A dataset with a batched fetch (Hugging Face datasets have one) keeps it.
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch([key[0] for key in keys]) if fetch else [self.dataset[key[0]] for key in keys]
        return [self._finish(item, key) for item, key in zip(items, keys)]

    def _finish(self, item: Any, key: tuple[int, ...]) -> tuple[Any, int, int]:
        index, ticket = key[0], key[1]
        if self.transform is not None:
            image = item[0]
            if not isinstance(image, Tensor) or image.dtype != torch.uint8 or image.dim() != 3:
                raise TypeError("a ladder in CyclicalLoader needs items (image, ...) with a uint8 [C, H, W] tensor "
                                f"image; got {type(image).__name__}; convert with "
                                "torchvision.transforms.v2.PILToTensor()")
            strength, seed = key[2], key[3]
            augmented = self.transform(image, strength, seed)
            item = (augmented, *item[1:], strength) if self.with_strength else (augmented, *item[1:])
        return item, index, ticket


class _CollateWithKeys:
    """Collates the user's items with the user's ``collate_fn`` (default: DataLoader's) and keeps the
    indices and the ticket beside them."""

    def __init__(self, collate_fn: Any = None) -> None:
        self.collate_fn = default_collate if collate_fn is None else collate_fn

    def __call__(self, keyed: list[tuple[Any, int, int]]) -> tuple[Any, Tensor, int]:
        return (self.collate_fn([item for item, _, _ in keyed]), torch.tensor([index for _, index, _ in keyed]),
                keyed[0][2])


_SEED_MODULUS = 2**63 - 1  # per-sample seeds stay within what torch.Generator.manual_seed takes


class _KeySampler:
    """The DataLoader's batch sampler: the loader's planned batches as lists of keys.

    Each key carries what varies (the batch's ticket; with a ladder its strength and a per-sample
    seed), so workers, persistent ones included, never hold a setting of their own (DESIGN rule 3).
    """

    def __init__(self, loader: CyclicalLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[list[tuple[int, ...]]]:
        loader = self.loader
        for planned in loader._planned_batches():
            ticket = loader._issue(planned)
            indices = planned.indices.tolist()
            if loader.ladder is None:
                yield [(index, ticket) for index in indices]
            else:
                base = (loader.seed * 1_000_003 + planned.epoch) * 1_000_033
                yield [(index, ticket, planned.strength, (base + index) % _SEED_MODULUS) for index in indices]


def _compose_sampler(sampler: Any, shuffle: bool | None, generator: torch.Generator | None) -> dict[str, Any]:
    """What a DataLoader ``sampler=`` means for CyclicalLoader: the order options it stands for, or a refusal."""
    if sampler is None:
        return {"shuffle": bool(shuffle), "generator": generator}
    if shuffle:
        raise ValueError("sampler option is mutually exclusive with shuffle (as in DataLoader); drop one of them")
    if isinstance(sampler, DistributedSampler):
        if sampler.drop_last:
            raise ValueError("CyclicalLoader pads uneven shares like DistributedSampler(drop_last=False); build the "
                             "DistributedSampler with drop_last=False (or pass rank=/world_size= instead of sampler=)")
        return {"shuffle": sampler.shuffle, "generator": generator, "seed": sampler.seed, "rank": sampler.rank,
                "world_size": sampler.num_replicas, "distributed_sampler": sampler}
    if isinstance(sampler, SequentialSampler):
        return {"shuffle": False, "generator": generator}
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None:
        return {"shuffle": True, "generator": sampler.generator if generator is None else generator}
    raise ValueError(f"CyclicalLoader chooses and orders each epoch's samples itself, so it cannot follow a "
                     f"{type(sampler).__name__}; for a subset pass torch.utils.data.Subset(dataset, indices), for the "
                     "order shuffle=/generator=/seed=, for sample weights keep= or threshold= with weighting=")


def _required_state_keys(state: dict[str, Any], semi_supervised: bool) -> tuple[str, ...]:
    """The keys :meth:`CyclicalLoader.load_state_dict` reads from ``state``."""
    keys: tuple[str, ...] = ("ledger", "epoch", "consumed")
    if semi_supervised:
        keys += ("sampler",)
    return keys


def _check_map_style(dataset: Any) -> None:
    """Refuse a dataset the loader cannot index: it picks each epoch's samples by index, so it needs ``len``."""
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"CyclicalLoader chooses each epoch's samples by index, so it needs a map-style dataset "
                        f"(__getitem__ and __len__); got {type(dataset).__name__}. Materialise a stream first (e.g. "
                        "a list or a datasets.Dataset), or use a DataLoader for an IterableDataset")


def _check_selection_options(policy: str, rescale: bool, max_drop: float, min_last_batch: float, weighting: str,
                             threshold: Any) -> None:
    """Refuse a selection policy or last-batch share the samplers cannot honour, each with the fix."""
    from cycdata.selection import POLICIES

    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: choose one of {', '.join(POLICIES)}")
    if policy == "prune" and threshold is not None:
        raise ValueError("policy='prune' needs keep= (the share trained on each epoch), not threshold=")
    if policy == "prune" and weighting != "hard":
        raise ValueError(f"policy='prune' weighs samples by their inverse keep probability; pass weighting='hard' "
                         f"(got {weighting!r})")
    if not isinstance(rescale, bool):
        raise ValueError(f"rescale= takes True or False, got {rescale!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 < max_drop < 1:
        raise ValueError(f"max_drop={max_drop!r}: give the largest share of the well-learned samples dropped, "
                         "in (0, 1)")
    if isinstance(min_last_batch, bool) or not isinstance(min_last_batch, (int, float)) \
            or not 0 <= min_last_batch <= 1:
        raise ValueError(f"min_last_batch={min_last_batch!r}: give a share of the batch size in [0, 1] (0.5 merges "
                         "a last batch under half a batch into the one before)")


def _class_labels(labels: Any, size: int) -> Tensor:
    """``labels`` as an int64 tensor of one class per sample, for per-class selection; refused with the fix."""
    tensor = integer_vector(labels)
    if tensor is None:
        kind = type(labels[0]).__name__ if isinstance(labels, (list, tuple)) and labels else type(labels).__name__
        raise TypeError(f"per_class=True needs integer class labels, one per sample; got {kind} labels. Map class "
                        "names to numbers first, e.g. classes = sorted(set(names)); "
                        "labels = torch.tensor([classes.index(n) for n in names])")
    if tensor.numel() != size:
        raise ValueError(f"per_class=True got {tensor.numel()} labels for a dataset of {size}; give one per sample")
    return tensor.long()


class CyclicalLoader:
    """A drop-in for ``DataLoader(dataset, batch_size=B, shuffle=..., ...)`` with cyclical knobs.

    Swap the constructor, call ``record_loss`` after each forward pass, and the loader varies the
    batch size each epoch and (with ``keep`` or ``threshold``) trains on the self-paced selection
    of the samples; with ``labeled`` and ``unlabeled_ratio`` each batch is a labeled batch followed
    by a cyclical share of unlabeled samples. It yields exactly what a ``DataLoader`` over the same
    dataset yields (same ``__getitem__``, same collate, same structure).

    **The epoch is explicit.** Iterating runs the current epoch; ``len()`` describes it until the next
    one begins; a new iteration after a complete *or abandoned* pass begins the next epoch (or the one
    given to :meth:`set_epoch`). Losses recorded in any pass, partial ones included, are applied before
    the next epoch's selection. :attr:`total_steps` is the run's batch count, known up front.

    **Order** as in a DataLoader: ``shuffle=False`` takes the epoch's samples in index order (with
    constant knobs exactly ``DataLoader(shuffle=False)``'s batches); ``shuffle=True`` shuffles them
    each epoch from a run seed: ``seed=`` if given, else one number drawn (at the first epoch) from
    ``generator=`` or from torch's default generator, so ``torch.manual_seed`` changes the order as it
    does a DataLoader's. Under ``torch.distributed`` the drawn seed is rank 0's, so all ranks agree.

    Args:
        dataset: any map-style dataset, or the path of a ``.beton`` written by ``cycdata convert``.
        epochs: epochs the cycle spans (or give ``plan=``).
        batch_size: a number, ``{"easy": 256, "hard": 64}`` or a schedule (per process).
        shuffle, generator, seed, sampler, drop_last: as for ``DataLoader``; ``sampler=`` may be a
            ``RandomSampler``, ``SequentialSampler`` or ``DistributedSampler`` (whose options and
            ``set_epoch`` it follows); other samplers and ``batch_sampler=`` are refused with the fix.
        min_last_batch: a last batch smaller than this share of the batch size joins the batch before
            (default 0: as a DataLoader, except that a single sample never makes a batch of its own).
        keep: kept fraction of lowest-loss samples (number, mapping or schedule), or None; with
            ``policy="prune"`` the share of samples trained on (exactly ``ceil(keep·N)`` each epoch).
        policy: ``easy_first`` (train on the lowest-loss ``keep`` share, the paper's self-paced direction) or
            ``prune`` (drop well-learned samples at random down to the ``keep`` share and, with
            ``rescale``, weigh the kept well-learned ones up so the epoch's expected gradient is the full
            epoch's: InfoBatch's direction, weights in ``batch_weights``).
        rescale, max_drop: pruning's options (:func:`cycdata.selection.select`).
        threshold: absolute loss threshold instead of ``keep``, or None.
        weighting: ``hard`` | ``linear`` | ``log`` | ``mixture``; soft weights are in ``batch_weights``.
        per_class: select ``keep`` within each class (labels from ``labels`` or ``dataset.labels``).
        labeled, unlabeled_ratio: semi-supervised mode: the labeled indices and the unlabeled
            samples per labeled one (every other index is the unlabeled pool). With ``keep`` or
            ``threshold`` too, the labeled part of each batch comes from the epoch's self-paced selection
            of the labeled pool (record the labeled part's losses); the unlabeled pool is never selected.
        factor: shared cyclical factor for mapping knobs.
        schedule_unit, normalization, cycle: the clock (as in the config language).
        plan: a :class:`~cycdata.plan.Plan` instead of the knob arguments (the trainer's way): the
            loader reads its data knobs (``data.batch_size``, ``self_paced.*``, ``augment.strength``,
            ``semi_supervised.ratio``) through the plan's one clock.
        select_samples: with ``plan=``, whether to apply its self-paced knob (default: when present).
        refresh_fraction: share of excluded samples re-admitted each epoch to refresh stale losses.
        ledger_ema, ledger_device: loss-ledger options.
        rank, world_size: default from the process group when an epoch starts (like DistributedSampler).
        ladder, strength: an augmentation ladder (name, YAML file or Ladder) and its strength knob
            (default ``{"easy": 0, "hard": 1}``). With workers, items must be ``(uint8 [C,H,W] image, ...)``;
            each is augmented in its worker at the strength sent with its index. On the device and
            ffcv paths whole batches are augmented in the main process.
        augment_backend: ``torch`` | ``torchvision`` | ``albumentations`` kernels for the worker path.
        with_strength: append the strength each item was augmented at (a diagnostic, workers only).
        placement: ``auto`` | ``device`` | ``workers`` | ``ffcv``: where batches come from (see
            :func:`choose_placement`).
        device: where device-resident data lives and ffcv puts its batches (default: the CPU).
        **dataloader_kwargs: passed to ``torch.utils.data.DataLoader`` (num_workers, collate_fn,
            pin_memory, persistent_workers, in_order, ...).

    Example:
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(100, 3), torch.randint(0, 2, (100,)))
        >>> loader = CyclicalLoader(data, epochs=3, batch_size={"easy": 50, "hard": 10},
        ...                         keep={"easy": 0.5, "hard": 1.0}, shuffle=True, seed=0)
        >>> loader.total_steps
        12
        >>> for epoch in range(3):
        ...     sizes = []
        ...     for x, y in loader:
        ...         loader.record_loss((x ** 2).sum(1))   # per-sample losses of this batch
        ...         sizes.append(len(y))
        ...     print(epoch, len(loader), sum(sizes), max(sizes))
        0 1 50 50
        1 10 100 10
        2 1 50 50
    """

    def __init__(self, dataset: Dataset | str | os.PathLike[str], *, epochs: int | None = None,
                 batch_size: Any = 64, shuffle: bool | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None, sampler: Any = None, keep: Any = None, threshold: Any = None,
                 weighting: str = "hard", per_class: bool = False, labels: Tensor | None = None,
                 labeled: Tensor | None = None, unlabeled_ratio: Any = None, factor: float = 2.0,
                 schedule_unit: str = "epoch", normalization: str = "reference",
                 cycle: tuple[float, float] = (0.0, 1.0), plan: Plan | None = None,
                 select_samples: bool | None = None, refresh_fraction: float = 0.05,
                 ledger_ema: float | None = None, ledger_device: torch.device | str | None = None,
                 rank: int | None = None, world_size: int | None = None, drop_last: bool = False,
                 min_last_batch: float = 0.0, policy: str = "easy_first", rescale: bool = True,
                 max_drop: float = 0.5, ladder: Any = None,
                 strength: Any = None, augment_backend: str = "torch", with_strength: bool = False,
                 placement: str = "auto", device: torch.device | str | None = None, **dataloader_kwargs: Any) -> None:
        if dataloader_kwargs.get("batch_sampler") is not None:
            raise ValueError("CyclicalLoader is the batch sampler: it decides each epoch's batch size and samples; "
                             "drop batch_sampler= and pass batch_size= (a number or {'easy': ..., 'hard': ...})")
        dataloader_kwargs.pop("batch_sampler", None)
        if batch_size is None:
            raise ValueError("CyclicalLoader always yields batches; batch_size=None (no batching) is not supported")
        order = _compose_sampler(sampler, shuffle, generator)
        rank = order.get("rank", rank) if rank is None else rank
        world_size = order.get("world_size", world_size) if world_size is None else world_size
        seed = order.get("seed", seed) if seed is None else seed
        self._distributed_sampler = order.get("distributed_sampler")
        self._sampler_epoch = None if self._distributed_sampler is None else self._distributed_sampler.epoch
        if isinstance(dataset, (str, os.PathLike)):
            from .ffcv_loader import BetonDataset

            dataset = BetonDataset(dataset, "train")
        _check_map_style(dataset)
        self.dataset = dataset
        self.ladder, strength = _ladder_and_strength(ladder, strength)
        self.semi_supervised = labeled is not None
        if plan is None:
            if epochs is None:
                raise ValueError("CyclicalLoader needs epochs= (the epochs the cycle spans) or plan=")
            plan = data_plan(epochs, batch_size=batch_size, keep=keep, threshold=threshold, strength=strength,
                             unlabeled_ratio=unlabeled_ratio, factor=factor, schedule_unit=schedule_unit,
                             normalization=normalization, cycle=cycle)
        elif epochs is not None and epochs != plan.epochs:
            raise ValueError(f"epochs={epochs} disagrees with the plan's {plan.epochs}; give one of them")
        self.plan = plan
        self.shuffle = order["shuffle"]
        self._seed, self._generator = seed, order["generator"]
        self.drop_last = drop_last
        size = len(dataset)  # type: ignore[arg-type]
        self.ledger = LossLedger(size, ema=ledger_ema, device=ledger_device)
        if per_class and labels is None:
            labels = getattr(dataset, "labels", None)
            if labels is None:
                raise ValueError("per_class=True needs labels= (one class label per sample)")
        _check_selection_options(policy, rescale, max_drop, min_last_batch, weighting, threshold)
        selection = {"select_samples": select_samples, "weighting": weighting, "ledger": self.ledger,
                     "labels": _class_labels(labels, size) if per_class else None,
                     "refresh_fraction": refresh_fraction, "policy": policy, "rescale": rescale,
                     "max_drop": max_drop}
        if self.semi_supervised:
            if "semi_supervised.ratio" not in plan.names:
                raise ValueError("semi-supervised mode needs unlabeled_ratio= (a number, mapping or schedule)")
            labeled_pool, unlabeled_pool = labeled_pools(labeled, size)
            self.batch_sampler: Any = SemiSupervisedBatchSampler(
                labeled_pool, unlabeled_pool, plan=plan, rank=rank, world_size=world_size, **selection)
        else:
            self.batch_sampler = CyclicalBatchSampler(size, plan=plan, shuffle=self.shuffle, rank=rank,
                                                      world_size=world_size, drop_last=drop_last,
                                                      min_last_batch=min_last_batch, **selection)
        if self._seed is not None:
            self._set_sampler_seed()
        # Only what is random draws a seed: a plain shuffle=False loader leaves torch's RNG as a DataLoader does.
        self._uses_seed = bool(self.shuffle or self.semi_supervised or self.ladder is not None
                               or getattr(self.batch_sampler, "selecting", False))
        self._pin = bool(dataloader_kwargs.get("pin_memory", False))
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
            transform = None
            if self.ladder is not None:
                from cycdata.augment_ladder.backends import LadderTransform

                transform = LadderTransform(self.ladder, augment_backend)
            collate = _CollateWithKeys(dataloader_kwargs.pop("collate_fn", None))
            self._loader = DataLoader(AugmentedDataset(dataset, transform, with_strength),
                                      batch_sampler=_KeySampler(self), collate_fn=collate, **dataloader_kwargs)
        # The explicit epoch: `epoch` is the one len() and knobs describe; a pass of it has begun or not.
        self.epoch = 0
        self._requested: int | None = None
        self._begun = False
        self._in_epoch = False
        self._pass = 0  # numbers the passes: a pass finalised late (garbage-collected) leaves a newer one alone
        self._consumed = 0
        self._resume_consumed = 0
        self._tickets = itertools.count()
        self._issued: dict[int, PlannedBatch] = {}
        self._batch: PlannedBatch | None = None
        self._recorded: PlannedBatch | None = None  # the batch whose losses were recorded last (once per batch)
        self._warned_past_end = False

    # --- the run seed ---------------------------------------------------------------------------

    @property
    def seed(self) -> int:
        """The run seed: ``seed=``, else drawn once from ``generator=`` or torch's default generator."""
        if self._seed is None:
            # 31 bits: the seed is mixed with epochs and indices into other seeds that must stay within int64.
            drawn = int(torch.randint(0, 2**31 - 1, (), generator=self._generator).item())
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                shared = [drawn]
                dist.broadcast_object_list(shared, src=0)  # every rank follows rank 0's order
                drawn = int(shared[0])
            self._seed = drawn
            self._set_sampler_seed()
        return self._seed

    def _set_sampler_seed(self) -> None:
        self.batch_sampler.reseed(self._seed)

    # --- the epoch -----------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch the next iteration runs (without it, each new pass runs the next epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"set_epoch takes an epoch number >= 0, got {epoch!r}")
        self._requested = epoch

    @property
    def epochs(self) -> int:
        """Epochs the cycle spans."""
        return self.plan.epochs

    def _described_epoch(self) -> int:
        """The epoch len() and knobs describe: the requested one, else the current one."""
        return self.epoch if self._requested is None else self._requested

    def _follow_distributed_sampler(self) -> None:
        sampler = self._distributed_sampler
        if sampler is not None and sampler.epoch != self._sampler_epoch:
            self._sampler_epoch = sampler.epoch
            self._requested = sampler.epoch

    def __len__(self) -> int:
        self._follow_distributed_sampler()
        return self.num_batches(self._described_epoch())

    def num_batches(self, epoch: int) -> int:
        """Batches this process gets in ``epoch`` (known up front except with a loss ``threshold``)."""
        if self._needs_planning(epoch):
            self._plan_epoch(epoch)
        return self.batch_sampler.num_batches(epoch)

    @property
    def total_steps(self) -> int:
        """Batches this process gets over the whole run (for per-step schedulers such as OneCycleLR)."""
        if self._needs_planning(self.epochs - 1) or self._needs_planning(0):
            raise ValueError("with threshold= the number of kept samples depends on the losses, so the run's step "
                             "count is not known up front; use keep= (an exact kept fraction) for a fixed count")
        return sum(self.batch_sampler.num_batches(epoch) for epoch in range(self.epochs))

    @property
    def total_samples(self) -> int:
        """Samples this process trains on over the whole run (labeled ones in semi-supervised mode): the
        planned forward and backward passes, known up front as :attr:`total_steps` is."""
        if self._needs_planning(self.epochs - 1) or self._needs_planning(0):
            raise ValueError("with threshold= the number of kept samples depends on the losses, so the run's "
                             "sample count is not known up front; use keep= (an exact kept fraction)")
        return sum(int(self.batch_sampler.samples(epoch)) for epoch in range(self.epochs))

    @property
    def samples_per_epoch(self) -> int:
        """This process's samples in the described epoch (labeled ones in semi-supervised mode)."""
        epoch = self._described_epoch()
        samples = self.batch_sampler.samples(epoch)
        if samples is None:
            self._plan_epoch(epoch)
            samples = self.batch_sampler.samples(epoch)
        return int(samples)

    def _needs_planning(self, epoch: int) -> bool:
        """Whether ``epoch``'s length depends on the losses (threshold mode) and it is not planned yet."""
        return not self.semi_supervised and self.batch_sampler.samples(epoch) is None

    def _plan_epoch(self, epoch: int) -> EpochPlan | None:
        """Fix ``epoch``'s plan: pending loss records are applied first, so partial epochs count."""
        if self._uses_seed:
            _ = self.seed  # drawn now, from torch's default RNG unless given
        if self.semi_supervised and not self.batch_sampler.selecting:
            return None
        if not self.batch_sampler.planned(epoch):
            self.ledger.synchronize()  # a collective under torch.distributed: every rank plans at the same point
        return self.batch_sampler.epoch_plan(epoch)

    def _begin_epoch(self) -> int:
        self._follow_distributed_sampler()
        if self._requested is not None:
            epoch, self._requested = self._requested, None
        elif self._begun:
            epoch = self.epoch + 1
        else:
            epoch = self.epoch
        self._consumed, self._resume_consumed = self._resume_consumed, 0
        if epoch >= self.epochs and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(f"CyclicalLoader was built for epochs={self.epochs}; epoch {epoch} and later repeat the "
                          "last epoch's knobs. Pass the number of epochs you train for.", stacklevel=3)
        if self.semi_supervised:
            self.ledger.synchronize()
        self.epoch, self._begun, self._in_epoch = epoch, True, True
        self._plan_epoch(epoch)
        self._issued.clear()
        return epoch

    def _planned_batches(self) -> Iterator[PlannedBatch]:
        return self.batch_sampler.batches(self.epoch)

    def _issue(self, planned: PlannedBatch) -> int:
        ticket = next(self._tickets)
        self._issued[ticket] = planned
        return ticket

    def __iter__(self) -> Iterator[Any]:
        self._begin_epoch()
        self._pass += 1
        this_pass = self._pass
        try:
            if self._loader is not None:
                for collated, indices, ticket in self._loader:
                    # The indices come back with the items themselves: right whatever order batches arrive in.
                    self._batch = dataclasses.replace(self._issued.pop(ticket), indices=indices)
                    self._consumed += 1
                    yield collated
            else:
                for planned, batch in self._gather():
                    self._batch = planned
                    self._consumed += 1
                    yield batch
        finally:  # complete, or abandoned (the loop broke): the next pass begins the next epoch
            if self._pass == this_pass:
                self._in_epoch = False

    def _mid_epoch(self) -> bool:
        """A pass is running and has batches left. A framework that stops at ``len()`` (Lightning, a transformers
        Trainer) never asks for the end of the iterator: once every planned batch was yielded the epoch is done."""
        return self._in_epoch and self._consumed < self.batch_sampler.num_batches(self.epoch)

    def _gather(self) -> Iterator[tuple[PlannedBatch, list[Tensor]]]:
        """Device-resident and ffcv data: batches of tensors (what default_collate would build); a ladder
        augments each whole batch where it lies, with per-sample parameters."""
        ladder = self.ladder
        if self.placement == "ffcv":  # ffcv needs the epoch's whole order before it starts
            planned = list(self._planned_batches())
            crops = None
            if ladder is not None and self._source.crops:
                # A variable-size file is cropped while decoding, at the crop the ladder gives each batch's
                # strength; the batch then takes the rest of the ladder.
                from cycdata.augment_ladder.ops import SIZING_OPS

                crops = [ladder.sizing_magnitude(batch.strength) for batch in planned]
                ladder = ladder.without(SIZING_OPS)
            gathered: Iterable[tuple[PlannedBatch, tuple[Tensor, ...]]] = zip(
                planned, self._source.epoch([batch.indices for batch in planned], crops))
        else:  # resident tensors: one gather per batch, when the batch is asked for
            take = self._source.take
            gathered = ((batch, take(batch.indices)) for batch in self._planned_batches())
        for batch, (images, labels, *_) in gathered:
            if ladder is not None:
                generator = torch.Generator(images.device)
                generator.manual_seed(self.seed * 1_000_003 + batch.epoch * 10_007 + batch.number)
                pixels = ladder.apply(images.float() / 255.0, batch.strength, generator)
                images = (pixels * 255.0).round_().clamp_(0, 255).to(torch.uint8)
            # The sources return each batch's indices with it (ffcv from the file's index field) and refuse an
            # order other than the planned one, so the planned indices are the batch's (and stay ours: ffcv's
            # own index tensors live in buffers it reuses).
            yield batch, [images, labels]

    # --- the batch just yielded -----------------------------------------------------------------

    @property
    def batch(self) -> PlannedBatch | None:
        """The batch just yielded as the sampler planned it: indices, labeled count, strength."""
        return self._batch

    @property
    def batch_indices(self) -> Tensor:
        """Dataset indices of the batch just yielded (int64, CPU), in the batch's order."""
        return torch.empty(0, dtype=torch.long) if self._batch is None else self._batch.indices

    @property
    def labeled_count(self) -> int:
        """How many of the batch's samples are labeled (all of them outside semi-supervised mode)."""
        return 0 if self._batch is None else self._batch.labeled

    @property
    def batch_strength(self) -> float:
        """The augmentation strength of the batch just yielded (0 without an ``augment.strength`` knob)."""
        return 0.0 if self._batch is None else self._batch.strength

    # --- losses ---------------------------------------------------------------------------------

    def record_loss(self, losses: Tensor, indices: Tensor | None = None) -> None:
        """Record per-sample losses of the batch most recently yielded (its labeled part in SSL mode), or of
        the samples ``indices`` names.

        Pass ``indices`` (the ``batch_indices`` read when that batch was yielded) whenever the batch being
        trained may not be the one most recently yielded: a framework that fetches ahead (a transformers
        Trainer takes a whole gradient-accumulation window first), a prefetching wrapper.
        No host synchronisation: the losses stay on their device until the next epoch is planned.
        """
        if indices is not None:
            self._record_at(losses, indices)
            return
        batch = self._batch
        # The usual call, one loss per sample of the batch just yielded, checked with attribute reads only
        # (this runs every step); anything else takes the checks below.
        if batch is not None and batch is not self._recorded and isinstance(losses, Tensor) and losses.ndim == 1 \
                and losses.shape[0] == batch.indices.shape[0]:
            # The loader's index tensors are its own and never modified: no defensive copy.
            self.ledger.record(batch.indices, losses, copy_indices=False)
            self._recorded = batch
            return
        if not isinstance(losses, Tensor) or losses.ndim != 1:
            shape = f"a {losses.ndim}-d tensor" if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"record_loss needs one loss per sample, a 1-d tensor; got {shape}. Compute the loss "
                             "with reduction='none' (e.g. F.cross_entropy(logits, y, reduction='none')), record it, "
                             "then take .mean() for backward")
        if self._batch is None:
            raise ValueError("record_loss was called before any batch was yielded; call it after each forward pass")
        if self._batch is self._recorded:
            # A second record of one batch would count its losses twice (two EMA steps): an error, not a silent
            # last-wins, as it is almost always a loop that records in two places.
            raise ValueError(f"record_loss was already called for this batch (epoch {self._batch.epoch}, batch "
                             f"{self._batch.number}); record each batch's losses once, after its forward pass")
        count = len(losses)
        if count not in (len(self.batch_indices), self.labeled_count):
            raise ValueError(f"record_loss got {count} losses for a batch of {len(self.batch_indices)} samples "
                             f"({self.labeled_count} labeled); pass one loss per sample (reduction='none')")
        # The loader's index tensors are its own and never modified: no defensive copy.
        self.ledger.record(self.batch_indices[:count], losses, copy_indices=False)
        self._recorded = self._batch

    def _record_at(self, losses: Tensor, indices: Tensor) -> None:
        if not isinstance(indices, Tensor) or indices.ndim != 1 or indices.dtype != torch.long:
            raise ValueError("record_loss(indices=) takes the batch's 1-d int64 index tensor (loader.batch_indices "
                             f"read when the batch was yielded); got {_describe(indices)}")
        if not isinstance(losses, Tensor) or losses.shape != indices.shape:
            raise ValueError(f"record_loss got {_describe(losses)} for {len(indices)} indices; pass one loss per "
                             "index (reduction='none')")
        self.ledger.record(indices.cpu(), losses, copy_indices=True)  # the ledger checks the range when it applies

    @property
    def batch_weights(self) -> Tensor | None:
        """Sample weights of the current batch's samples: the self-paced ones of a soft weighting, or pruning's
        inverse keep probabilities (None when every sample weighs 1). Multiply each sample's loss by its
        weight and divide the sum by the batch size."""
        if self._batch is None or not self.batch_sampler.selecting:
            return None
        weights = self.batch_sampler.epoch_plan(self._batch.epoch).weights
        # Semi-supervised: the labeled part only (the unlabeled samples are never selected).
        return None if weights is None else weights[self.batch_indices[: self.labeled_count]]

    @property
    def knobs(self) -> dict[str, float | int]:
        """What the loader does in the described epoch, by dotted name (for logs); fixes its plan."""
        self._follow_distributed_sampler()
        if self._uses_seed:
            _ = self.seed
        epoch = self._described_epoch()
        values = self.batch_sampler.knobs(epoch)
        knobs: dict[str, float | int] = {"data.batch_size": values.batch_size}
        if values.strength is not None:
            knobs["augment.strength"] = values.strength
        if self.semi_supervised:
            sampler = self.batch_sampler
            knobs.update({"semi_supervised.ratio": values.ratio or 0.0,
                          "semi_supervised.coverage": sampler.unlabeled.coverage,
                          "semi_supervised.passes": sampler.unlabeled.passes})
        plan = self._plan_epoch(epoch)
        if plan is not None and self.batch_sampler.selecting:
            knobs.update({"self_paced.kept": plan.kept, "self_paced.threshold": plan.threshold,
                          "self_paced.unseen": plan.unseen, "self_paced.refreshed": plan.refreshed,
                          "self_paced.nonfinite": self.ledger.nonfinite_count})
        return knobs

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue, mid-epoch included (torchdata's StatefulDataLoader protocol).

        Between epochs the ledger's pending records are applied first (a collective under
        torch.distributed), so every rank saves the same ledger.
        """
        mid_epoch = self._mid_epoch()
        if not mid_epoch:
            self.ledger.synchronize()
        state: dict[str, Any] = {"version": 2, "seed": self.seed if self._uses_seed else self._seed,
                                 "ledger": self.ledger.state_dict()}
        if mid_epoch:
            state.update(epoch=self.epoch, consumed=self._consumed)
            if self.semi_supervised:
                state["sampler"] = self.batch_sampler.epoch_start_state
            if self.batch_sampler.selecting or not self.semi_supervised:
                state["plan"] = dataclasses.asdict(self.batch_sampler.epoch_plan(self.epoch))
        else:
            state.update(epoch=self._next_epoch(), consumed=0)
            if self.semi_supervised:
                state["sampler"] = self.batch_sampler.state_dict()
        return state

    def _next_epoch(self) -> int:
        if self._requested is not None:
            return self._requested
        return self.epoch + 1 if self._begun else self.epoch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`: the next iteration continues where the saved loader stood."""
        if not isinstance(state, dict) or state.get("version") not in (1, 2):
            raise ValueError("not a CyclicalLoader state (version 1 or 2); pass a dict from "
                             "CyclicalLoader.state_dict()")
        missing = [key for key in _required_state_keys(state, self.semi_supervised) if key not in state]
        if missing:
            raise ValueError(f"CyclicalLoader state lacks {', '.join(missing)}; pass the whole dict "
                             "CyclicalLoader.state_dict() returned (a checkpoint's data state)")
        self.ledger.load_state_dict(state["ledger"])
        if state.get("seed") is not None:
            self._seed = int(state["seed"])
            self._set_sampler_seed()
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if self.semi_supervised:
            self.batch_sampler.load_state_dict(state["sampler"], skip_batches=consumed)
            if "plan" in state and self.batch_sampler.selecting:
                self.batch_sampler.restore_plan(EpochPlan(**state["plan"]))
        elif "plan" in state:
            self.batch_sampler.restore_plan(EpochPlan(**state["plan"]), skip_batches=consumed)
        self.epoch, self._requested, self._begun, self._in_epoch = epoch, epoch, False, False
        self._resume_consumed = consumed
