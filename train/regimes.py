"""The data regimes of a run, drawn from the training split only: a validation split, fewer labels, class
imbalance and label noise.

Applied in this order by :func:`prepare_splits` (the test split is never touched):

1. ``data.val_split``: a stratified share of the training split is held out as the validation split, on
   which every choice is made (``best.pt``, tuned constants, the range test's readings);
2. ``data.train_limit``: a class-balanced subset of what remains;
3. ``data.imbalance``: a long-tailed cut, class ``c`` keeping ``n_c = n_max · ratio^(−c/(K−1))`` samples;
4. ``data.label_noise``: symmetric noise, exactly ``round(η·N)`` training labels changed to another class
   drawn uniformly. The validation split gets the same rate (independently drawn): it is a share of the
   same noisy training data, as it would be in practice; with symmetric noise below ``(K−1)/K`` the noisy
   validation accuracy ranks models as the clean one does.

Every draw comes from ``data.draw_seed`` (null: the run's seed, so each seed redraws the subset, the noise
and the split). The default 0 keeps a run's subset the same across seeds, as before these options.

Example:
    >>> labels = torch.arange(10).repeat(10)                       # 10 classes x 10 samples
    >>> held, kept = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    >>> len(held), len(kept), torch.bincount(labels[held]).tolist() == [2] * 10
    (20, 80, True)
    >>> long_tailed_counts([100] * 5, ratio=16.0)
    [100, 50, 25, 12, 6]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from cycdata.config import ConfigError, RunConfig
from cycdata.loaders.datasets import DatasetSplits, ImageFileDataset, TensorImageDataset

__all__ = ["draw_generator", "long_tailed_counts", "noisy_labels", "prepare_splits", "stratified_split",
           "take_samples"]


def draw_generator(config: RunConfig, stream: int) -> torch.Generator:
    """The seeded generator of one draw (``stream``: 0 the subset, 1 the split, 2 imbalance, 3 noise, 4 the
    validation split's noise). Stream 0 is the seed itself: ``draw_seed: 0`` keeps the subset of earlier versions."""
    seed = config.seed if config.data.draw_seed is None else config.data.draw_seed
    return torch.Generator().manual_seed(seed * 7919 + stream if stream else seed)


def stratified_split(labels: Tensor, share: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices ``(held_out, kept)``: ``round(share · n_c)`` of each class's ``n_c`` samples held out (at least
    one where a class has two or more), both sorted."""
    held, kept = [], []
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(len(members) - 1, max(1, round(share * len(members)))) if len(members) > 1 else 0
        held.append(members[:count])
        kept.append(members[count:])
    return torch.cat(held).sort().values, torch.cat(kept).sort().values


def long_tailed_counts(per_class: Sequence[int], ratio: float) -> list[int]:
    """Samples kept per class for an imbalance ``ratio`` (largest : smallest), at least one per class.

    Class ``c`` of ``K`` keeps ``n_max · ratio^(−c/(K−1))`` (rounded down; Cao et al. 2019's long tail),
    capped by what it has.
    """
    classes = len(per_class)
    n_max = max(per_class)
    return [max(1, min(have, math.floor(n_max * ratio ** (-c / max(1, classes - 1)) + 1e-9)))
            for c, have in enumerate(per_class)]


def noisy_labels(labels: Tensor, rate: float, num_classes: int, generator: torch.Generator) -> Tensor:
    """``labels`` with exactly ``round(rate · N)`` of them changed, each to another class drawn uniformly.

    Example:
        >>> clean = torch.zeros(10, dtype=torch.int64)
        >>> noisy = noisy_labels(clean, 0.3, 4, torch.Generator().manual_seed(0))
        >>> int((noisy != clean).sum()), bool((noisy < 4).all())
        (3, True)
    """
    flips = round(rate * len(labels))
    which = torch.randperm(len(labels), generator=generator)[:flips]
    # An offset in 1..K-1 added modulo K: uniform over the other classes, never the true one.
    offsets = torch.randint(1, num_classes, (flips,), generator=generator)
    noisy = labels.clone()
    noisy[which] = (labels[which] + offsets) % num_classes
    return noisy


def take_samples(dataset: object, indices: Tensor, labels: Tensor | None = None, key: str = "data") -> object:
    """The samples of ``dataset`` at ``indices`` (with ``labels`` instead of theirs), of the same kind."""
    if isinstance(dataset, ImageFileDataset):
        chosen = dataset.subset(indices.tolist())
        if labels is not None:
            chosen = ImageFileDataset([(path, int(label)) for (path, _), label in zip(chosen.samples, labels)],
                                      chosen.classes, chosen.image_size, crop_pct=chosen.crop_pct)
        return chosen
    images = getattr(dataset, "images", None)
    if not isinstance(images, Tensor):
        raise ConfigError(key, f"needs an in-memory dataset or image files; {type(dataset).__name__} is neither")
    return TensorImageDataset(images[indices], dataset.labels[indices] if labels is None else labels,  # type: ignore[attr-defined]
                              getattr(dataset, "classes", None))


def _labels(dataset: object, key: str) -> Tensor:
    labels = getattr(dataset, "labels", None)
    if not isinstance(labels, Tensor):
        raise ConfigError(key, f"needs a dataset with in-memory labels; {type(dataset).__name__} has none")
    return labels


def prepare_splits(data: DatasetSplits, config: RunConfig) -> DatasetSplits:
    """``data`` with the run's validation split held out and its training regime applied (see the module)."""
    from cycdata.train.builders import limit_train

    options = config.data
    if options.val_split > 0:
        labels = _labels(data.train, "data.val_split")
        held, kept = stratified_split(labels, options.val_split, draw_generator(config, 1))
        data = replace(data, train=take_samples(data.train, kept, key="data.val_split"),
                       val=take_samples(data.train, held, key="data.val_split"))
    data = limit_train(data, options.train_limit, draw_generator(config, 0))
    if options.imbalance > 1:
        labels = _labels(data.train, "data.imbalance")
        per_class = torch.bincount(labels, minlength=data.num_classes).tolist()
        generator = draw_generator(config, 2)
        chosen = []
        for cls, count in enumerate(long_tailed_counts(per_class, options.imbalance)):
            members = (labels == cls).nonzero().flatten()
            chosen.append(members[torch.randperm(len(members), generator=generator)[:count]])
        data = replace(data, train=take_samples(data.train, torch.cat(chosen).sort().values, key="data.imbalance"))
    if options.label_noise > 0:
        for split, stream in (("train", 3), ("val", 4)):
            dataset = getattr(data, split)
            if dataset is None:
                continue
            labels = _labels(dataset, "data.label_noise")
            noisy = noisy_labels(labels, options.label_noise, data.num_classes, draw_generator(config, stream))
            data = replace(data, **{split: take_samples(dataset, torch.arange(len(labels)), noisy,
                                                        key="data.label_noise")})
    return data
