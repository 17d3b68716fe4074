"""The device-resident path: the whole training split decoded once into a uint8 tensor on the device.

Small datasets (MNIST, CIFAR, most fine-tuning sets) fit in a GPU's memory many times over; kept
there, a batch is one ``index_select`` and the augmentation ladder runs on it in place, with no
worker processes, no host decoding and no host-to-device copy per step (the airbench way). On a
CPU machine the "device" is host memory, which is also the fastest CPU path.

Example:
    >>> import torch
    >>> from cycdata.loaders.datasets import TensorImageDataset
    >>> data = TensorImageDataset(torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2),
    ...                           torch.tensor([0, 1, 0, 1]))
    >>> source = DeviceSource(data, "cpu")
    >>> [indices.tolist() for _, _, indices in source.epoch([[3, 1], [0]])]
    [[3, 1], [0]]
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["PLACEMENTS", "DeviceSource", "fits_in_memory", "resident_tensors"]

PLACEMENTS = ("auto", "device", "workers", "ffcv")
# What "fits" means: at most this share of the free device memory (host RAM on a CPU), leaving the
# rest to the model, the activations and the ladder's temporaries.
MEMORY_SHARE = 0.5


def fits_in_memory(nbytes: int, device: torch.device | str, share: float = MEMORY_SHARE) -> bool:
    """Whether ``nbytes`` fit in ``share`` of ``device``'s free memory (available host RAM for the CPU).

    Example:
        >>> fits_in_memory(1024, "cpu"), fits_in_memory(1 << 60, "cpu")
        (True, False)
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= share * free
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume only small data fits
        available = 1 << 30
    return nbytes <= share * available


def resident_tensors(dataset: Dataset, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """``(uint8 images [N, C, H, W], int64 labels [N])`` of ``dataset`` on ``device``, decoded once.

    In-memory datasets (``images``/``labels`` tensors) are moved as they are; a ``.beton`` split is
    decoded through ffcv; any other dataset of ``(uint8 [C, H, W] image, label)`` items is read item
    by item and stacked.
    """
    decoded = getattr(dataset, "decoded", None)
    if callable(decoded):
        dataset = decoded()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if not (isinstance(images, Tensor) and isinstance(labels, Tensor)):
        images, labels = _stack_items(dataset)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"the device-resident path needs uint8 [N, C, H, W] images, got {images.dtype} "
                        f"{tuple(images.shape)}; use placement='workers' for other data")
    return images.to(device), labels.long().to(device)


def _stack_items(dataset: Dataset) -> tuple[Tensor, Tensor]:
    count = len(dataset)  # type: ignore[arg-type]
    first, _ = dataset[0][:2]
    if not isinstance(first, Tensor) or first.dtype != torch.uint8 or first.dim() != 3:
        raise TypeError("the device-resident path needs items (uint8 [C, H, W] tensor, label), got "
                        f"{type(first).__name__}; use placement='workers' for other data")
    images = torch.empty(count, *first.shape, dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.long)
    for index in range(count):
        image, label = dataset[index][:2]
        if image.shape != first.shape:
            raise TypeError(f"the device-resident path needs images of one size: item {index} is "
                            f"{tuple(image.shape)}, item 0 {tuple(first.shape)}; "
                            "resize them or use placement='workers'")
        images[index], labels[index] = image, int(label)
    return images, labels


class DeviceSource:
    """Batches gathered by index from tensors that live on ``device``.

    Args:
        dataset: in-memory, ``.beton`` or any dataset of uint8 images (see :func:`resident_tensors`).
        device: where the data lives and the batches are made.
        pin_memory: pin batches for asynchronous copies (only meaningful when the device is the CPU).
    """

    def __init__(self, dataset: Dataset, device: torch.device | str = "cpu", *, pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.images, self.labels = resident_tensors(dataset, self.device)
        self.pin_memory = pin_memory and self.device.type == "cpu"
        self._on_cpu = self.device.type == "cpu"  # CPU indices then index the data as they are

    def epoch(self, batches: Iterable[Sequence[int]]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``(images, labels, indices)`` for each batch of indices; ``indices`` stay on the CPU."""
        for batch in batches:
            indices = torch.as_tensor(batch, dtype=torch.long)
            yield (*self.take(indices), indices)

    def take(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Images and labels at ``indices`` (an int64 CPU tensor): one ``index_select`` each, where the data lives.

        The loader's per-batch call: indices that are already a CPU tensor are used as they are.

        Example:
            >>> import torch
            >>> from cycdata.loaders.datasets import TensorImageDataset
            >>> source = DeviceSource(TensorImageDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.arange(3)))
            >>> images, labels = source.take(torch.tensor([2, 0]))
            >>> tuple(images.shape), labels.tolist()
            ((2, 1, 2, 2), [2, 0])
        """
        on_device = indices if self._on_cpu else indices.to(self.device, non_blocking=True)
        images, labels = self.images.index_select(0, on_device), self.labels.index_select(0, on_device)
        if self.pin_memory:
            images, labels = images.pin_memory(), labels.pin_memory()
        return images, labels
