"""The ladder through CyclicalLoader: the strength travels with the indices to (persistent) workers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from cycdata.clock import Clock
from cycdata.loaders.datasets import load_dataset
from cycdata.loaders.torch_loader import CyclicalLoader
from cycdata.schedules import Cyclical


class Digits(Dataset):
    """uint8 images served per sample (not an in-memory tensor dataset), with their index as the label."""

    def __init__(self) -> None:
        self.images = load_dataset("digits").train.images[:60]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], index


@pytest.mark.parametrize("backend", ["torch", "torchvision"])
def test_workers_apply_the_planned_strength_each_epoch(backend: str) -> None:
    dataset = Digits()
    epochs = 5
    loader = CyclicalLoader(dataset, epochs=epochs, batch_size=20, ladder="digits", strength={"easy": 0.0, "hard": 1.0},
                            augment_backend=backend, with_strength=True, num_workers=2, persistent_workers=True)
    clock = Clock(epochs)
    for epoch in range(epochs):
        planned = Cyclical(0.0, 1.0)(clock.progress(epoch))
        loader.set_epoch(epoch)  # as with DistributedSampler: knobs then describe the coming epoch
        assert loader.knobs["augment.strength"] == pytest.approx(planned)
        changed = 0
        for images, indices, strengths in loader:
            assert torch.allclose(strengths.float(), torch.full_like(strengths.float(), planned))  # read back
            original = dataset.images[indices]
            if planned == 0.0:
                assert torch.equal(images, original)  # strength 0 is the identity
            changed += int((images != original).flatten(1).any(1).sum())
        if planned == 1.0:
            assert changed > 30  # at full strength most samples change


def test_in_memory_batches_are_augmented_in_the_main_process() -> None:
    data = load_dataset("synthetic:64")
    loader = CyclicalLoader(data.train, epochs=3, batch_size=32, ladder="default")
    for epoch, strength in enumerate((0.0, 1.0, 0.0)):
        loader.set_epoch(epoch)
        assert loader.knobs["augment.strength"] == strength
        for images, _labels in loader:
            original = data.train.images[loader.batch_indices]
            assert images.dtype == torch.uint8
            assert torch.equal(images, original) == (strength == 0.0)


def test_strength_without_ladder_is_an_error() -> None:
    with pytest.raises(ValueError, match="strength= needs a ladder="):
        CyclicalLoader(Digits(), epochs=2, strength=0.5)
