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

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = ["BatchLoader", "IndexedDataset"]

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
