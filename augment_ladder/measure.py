"""How strong is each rung, measured: pixel change, SSIM drop and a reference model's accuracy drop.

A ladder is written weakest rung first, but the order is a guess until it is measured. Per rung, the same test
images are augmented and compared with the originals in two ways:

* **image-based**: the mean absolute pixel change and the SSIM drop (``1 - mean SSIM``). Cheap, model-free, but
  blind to what matters for the task (a 2-pixel shift changes many pixels and no label).
* **model-based**: the accuracy of a reference model trained *without* augmentation on the augmented images, and
  its drop from the clean accuracy. This is the "affinity" of Gontijo-Lopes et al. 2020 ("Tradeoffs in data
  augmentation: an empirical study"), read as strength: the more the augmented images leave the clean
  distribution the model learned, the larger the drop.

:meth:`LadderMeasurement.out_of_order` names the rungs measured weaker than the rung before;
:meth:`LadderMeasurement.order` and :func:`reorder` turn the measurement into a ladder sorted by measured strength;
:func:`grid_png` shows every rung on the same images, for a person to judge.

A rung that mixes batches (``mix: {kind: cutmix, ...}``) is measured with its mixing: partners come from the
measured images, and since the own image always keeps at least half of the pixels, the own label stays the right
answer for the accuracy.

Example:
    >>> from torch import nn
    >>> from cycdata.augment_ladder.ladder import load_ladder
    >>> from cycdata.loaders.datasets import load_dataset
    >>> data = load_dataset("synthetic:50")
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    >>> ladder = load_ladder("default")
    >>> result = measure_ladder(ladder, data, model=model, samples=10)
    >>> len(result.rungs) == len(ladder.rungs), result.rungs[0].pixel_change, result.rungs[0].accuracy_drop
    (True, 0.0, 0.0)
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cycdata.augment_ladder.ladder import Ladder, LadderError, Rung
from cycdata.augment_ladder.ops import mix_batch
from cycdata.samplers import epoch_generator

if TYPE_CHECKING:
    # Annotation only: augment_ladder sits below loaders (DESIGN floor plan), so it never imports it at run time;
    # any object with DatasetSplits' attributes will do.
    from cycdata.loaders.datasets import DatasetSplits

__all__ = ["ORDER_TOLERANCE", "STRENGTH_KEYS", "LadderMeasurement", "RungStrength", "grid_png", "measure_ladder",
           "pixel_change", "reorder", "ssim", "train_reference_model"]

# Measured strengths closer than this are treated as equal when checking the order: with 1,000 test images one
# image is 0.001 of accuracy, so a difference of one or two images is noise, not evidence for reordering.
ORDER_TOLERANCE = 0.002
# The measured quantities that grow with strength (``accuracy`` shrinks with it, so it is not one of them).
STRENGTH_KEYS = ("pixel_change", "ssim_drop", "accuracy_drop")

# SSIM constants of Wang et al. 2004 for images in [0, 1] (dynamic range L = 1).
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2

# Reference training: plain SGD + Nesterov with a per-step cosine decay to 0, the setting that takes timm's
# test_resnet past 95% on mnist5k in 3 epochs (about 4 s on 2 CPU cores).
_REFERENCE_BATCH = 128
_REFERENCE_LR = 0.1
_REFERENCE_MOMENTUM = 0.9
_REFERENCE_WEIGHT_DECAY = 5e-4
# Images are augmented and classified in chunks, bounding the temporaries on large test sets (CIFAR: 10,000).
_CHUNK = 1000
# Separate random streams (cycdata.samplers.epoch_generator), so that the shuffle, the test subset and the
# augmentation draws never depend on one another.
_SHUFFLE_STREAM = 1
_SUBSET_STREAM = 2
_AUGMENT_STREAM = 3


# --------------------------------------------------------------------------------------------
# Image-based strength
# --------------------------------------------------------------------------------------------


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"expected two float images [B, C, H, W] of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def pixel_change(original: Tensor, augmented: Tensor) -> float:
    """Mean absolute pixel difference of two image batches in [0, 1]: ``mean |augmented - original|``.

    Args:
        original: Float images ``[B, C, H, W]`` in [0, 1].
        augmented: The same images after augmentation, same shape.

    Returns:
        A number in [0, 1]; 0 means unchanged.

    Example:
        >>> black = torch.zeros(1, 1, 2, 2)
        >>> pixel_change(black, torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]))
        0.5
    """
    _check_pair(original, augmented)
    return float((augmented.float() - original.float()).abs().mean())


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (weights / weights.sum()).to(device=like.device, dtype=like.dtype)


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Per-image structural similarity (Wang et al. 2004) of two batches in [0, 1], averaged over channels.

    ``SSIM = (2·μa·μb + C1)(2·σab + C2) / ((μa² + μb² + C1)(σa² + σb² + C2))`` with local statistics from an
    11x11 Gaussian window (sigma 1.5), ``C1 = 0.01²``, ``C2 = 0.03²``, over the valid region (no padding), as in the
    reference implementation. Images smaller than 11 pixels use a window as large as the image.

    Args:
        a: Float images ``[B, C, H, W]`` in [0, 1].
        b: Float images, same shape.

    Returns:
        Float tensor ``[B]``: 1 for identical images, lower the less alike they are.

    Example:
        >>> images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> ssim(images, images).tolist()
        [1.0, 1.0]
        >>> bool(ssim(images, 1 - images).max() < 0)
        True
    """
    _check_pair(a, b)
    a = a.float()
    b = b.float()
    channels = a.shape[1]
    size = min(_SSIM_WINDOW, a.shape[-2], a.shape[-1])
    window = _gaussian_window(size, _SSIM_SIGMA, a)
    # The 2-D Gaussian is separable: a row pass then a column pass, one group per channel.
    rows = window.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = window.view(1, 1, size, 1).expand(channels, 1, size, 1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)

    mean_a, mean_b = blur(a), blur(b)
    var_a = blur(a * a) - mean_a**2
    var_b = blur(b * b) - mean_b**2
    cov = blur(a * b) - mean_a * mean_b
    numerator = (2 * mean_a * mean_b + _SSIM_C1) * (2 * cov + _SSIM_C2)
    denominator = (mean_a**2 + mean_b**2 + _SSIM_C1) * (var_a + var_b + _SSIM_C2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RungStrength:
    """The measured strength of one rung, averaged over the test images (and repeats).

    Attributes:
        rung: The rung's index in the ladder as written.
        pixel_change: Mean absolute pixel change, images in [0, 1].
        ssim_drop: ``1 - mean SSIM`` against the originals.
        accuracy: The reference model's accuracy on the augmented images.
        accuracy_drop: Clean accuracy minus ``accuracy`` (negative when the rung helps the model).
        ops: A short description of the rung's ops, for tables.

    Example:
        >>> RungStrength(1, 0.05, 0.2, 0.9, 0.05).accuracy_drop
        0.05
    """

    rung: int
    pixel_change: float
    ssim_drop: float
    accuracy: float
    accuracy_drop: float
    ops: str = ""


def _check_key(key: str) -> str:
    if key not in STRENGTH_KEYS:
        raise ValueError(f"strength key must be one of {', '.join(STRENGTH_KEYS)}, got {key!r}")
    return key


@dataclass(frozen=True)
class LadderMeasurement:
    """Every rung's measured strength, in the ladder's order.

    Attributes:
        ladder: The ladder's name.
        dataset: The dataset's name.
        clean_accuracy: The reference model's accuracy on the un-augmented test images that were measured.
        rungs: One :class:`RungStrength` per rung, ladder order.

    Example:
        >>> m = LadderMeasurement("mine", "mnist5k", 0.95, (RungStrength(0, 0.0, 0.0, 0.95, 0.0),
        ...                                                 RungStrength(1, 0.2, 0.5, 0.6, 0.35),
        ...                                                 RungStrength(2, 0.1, 0.3, 0.9, 0.05)))
        >>> m.out_of_order(), m.order()
        ([2], [0, 2, 1])
    """

    ladder: str
    dataset: str
    clean_accuracy: float
    rungs: tuple[RungStrength, ...]

    def strengths(self, key: str = "accuracy_drop") -> list[float]:
        """The measured strength of every rung, ladder order, by ``key`` (one of :data:`STRENGTH_KEYS`).

        Example:
            >>> LadderMeasurement("l", "d", 1.0, (RungStrength(0, 0.0, 0.0, 1.0, 0.0),)).strengths("ssim_drop")
            [0.0]
        """
        return [float(getattr(rung, _check_key(key))) for rung in self.rungs]

    def out_of_order(self, key: str = "accuracy_drop", tolerance: float = ORDER_TOLERANCE) -> list[int]:
        """The rungs measured weaker than the rung just before them, by more than ``tolerance``.

        Only neighbours are compared: that is the claim a ladder makes (each rung at least as strong as the
        previous one). ``tolerance`` (default :data:`ORDER_TOLERANCE` = 0.002, two images in 1,000) absorbs the
        sampling noise of the measurement; it is in the units of ``key``.

        Example:
            >>> m = LadderMeasurement("l", "d", 0.9, tuple(RungStrength(i, 0.0, 0.0, 0.9 - v, v)
            ...                       for i, v in enumerate([0.0, 0.1, 0.099, 0.3, 0.2])))
            >>> m.out_of_order()
            [4]
        """
        values = self.strengths(key)
        return [index for index in range(1, len(values)) if values[index] < values[index - 1] - tolerance]

    def order(self, key: str = "accuracy_drop", tolerance: float = ORDER_TOLERANCE) -> list[int]:
        """Rung indices sorted by measured strength, weakest first.

        A stable insertion sort in which a rung moves before another only when it is weaker by more than
        ``tolerance``, so the order is the ladder's own exactly when :meth:`out_of_order` is empty, and rungs
        within the noise keep their written order. A first rung whose pixel change is exactly 0 (the identity on
        every measured image) stays first: a rung that happens to raise the accuracy is not weaker than no
        augmentation at all.

        Example:
            >>> m = LadderMeasurement("l", "d", 0.9, tuple(RungStrength(i, float(i > 0), 0.0, 0.9 - v, v)
            ...                       for i, v in enumerate([0.0, -0.01, 0.3, 0.1])))
            >>> m.order(), m.order("pixel_change")
            ([0, 1, 3, 2], [0, 1, 2, 3])
        """
        values = self.strengths(key)
        pinned = [0] if self.rungs and self.rungs[0].pixel_change == 0.0 else []
        placed: list[int] = []
        for index in range(len(pinned), len(values)):
            position = len(placed)
            while position > 0 and values[placed[position - 1]] > values[index] + tolerance:
                position -= 1
            placed.insert(position, index)
        return pinned + placed

    def table(self) -> str:
        """A readable table: one row per rung with pixel change, SSIM drop, accuracy and accuracy drop.

        Example:
            >>> m = LadderMeasurement("mine", "mnist5k", 0.95, (RungStrength(0, 0.0, 0.0, 0.95, 0.0, "identity"),))
            >>> print(m.table())  # doctest: +NORMALIZE_WHITESPACE
            ladder mine on mnist5k: clean accuracy 95.0%
            rung  pixel change  SSIM drop  accuracy  accuracy drop  ops
               0        0.0000     0.0000     95.0%          +0.0%  identity
        """
        lines = [f"ladder {self.ladder} on {self.dataset}: clean accuracy {self.clean_accuracy:.1%}",
                 "rung  pixel change  SSIM drop  accuracy  accuracy drop  ops"]
        for rung in self.rungs:
            lines.append(f"{rung.rung:>4}  {rung.pixel_change:>12.4f}  {rung.ssim_drop:>9.4f}  {rung.accuracy:>8.1%}"
                         f"  {rung.accuracy_drop:>+13.1%}  {rung.ops}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The measurement as one JSON object, plus the out-of-order rungs and the measured order (accuracy drop).

        Example:
            >>> m = LadderMeasurement("mine", "mnist5k", 0.95, (RungStrength(0, 0.0, 0.0, 0.95, 0.0),))
            >>> json.loads(m.to_json())["rungs"][0]["accuracy"], json.loads(m.to_json())["order"]
            (0.95, [0])
        """
        payload = asdict(self)
        payload["rungs"] = [asdict(rung) for rung in self.rungs]
        payload["order_key"] = "accuracy_drop"
        payload["out_of_order"] = self.out_of_order()
        payload["order"] = self.order()
        return json.dumps(payload)


# --------------------------------------------------------------------------------------------
# The reference model and the measurement loop
# --------------------------------------------------------------------------------------------


def _split_tensors(split: object, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """uint8 images ``[N, C, H, W]`` and int64 labels of a split (or of ``indices`` in it)."""
    images = getattr(split, "images", None)
    labels = getattr(split, "labels", None)
    if isinstance(images, Tensor) and isinstance(labels, Tensor):
        return (images, labels) if indices is None else (images[indices], labels[indices])
    # Lazily decoded splits (folder:PATH) have no image tensor: decode the items needed, once.
    order = range(len(split)) if indices is None else indices.tolist()  # type: ignore[arg-type]
    items = [split[i] for i in order]  # type: ignore[index]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items], dtype=torch.int64)


def _normalize(images: Tensor, dataset: DatasetSplits) -> Tensor:
    """Float images in [0, 1] -> ``(x - mean) / std`` per channel, what the reference model is trained on."""
    mean = torch.tensor(dataset.mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(dataset.std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_reference_model(dataset: DatasetSplits, *, model: str = "test_resnet", epochs: int = 3, seed: int = 0,
                          device: torch.device | str | None = None) -> nn.Module:
    """Train a timm model on the train split without any augmentation: the judge of :func:`measure_ladder`.

    SGD with Nesterov momentum 0.9, learning rate 0.1 decayed to 0 by a per-step cosine, weight decay 5e-4,
    batch 128, inputs normalized with the dataset's mean and std. The same seed gives the same weights on CPU
    (initialization under a forked, seeded global RNG, which is restored afterwards; shuffling from a seeded
    generator). On mnist5k the default reaches about 96% test accuracy in about 4 s on 2 CPU cores.

    Args:
        dataset: The splits; only ``train`` is used.
        model: A timm model name.
        epochs: Passes over the train split.
        seed: Seed of the initialization and the shuffle.
        device: Where to train (default: CUDA when available, else CPU).

    Returns:
        The trained model, in eval mode, on ``device``; it expects normalized images.

    Raises:
        ValueError: an unknown timm model name or ``epochs < 1``.

    Example:
        >>> from cycdata.loaders.datasets import load_dataset
        >>> try:  # training takes seconds, so the example shows the up-front check only
        ...     train_reference_model(load_dataset("synthetic:20"), model="resnet_unknown")
        ... except ValueError as error:
        ...     print(error)
        unknown timm model 'resnet_unknown'; see timm.list_models() for names
    """
    import timm  # imported here: timm takes a second to import and only training needs it

    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; see timm.list_models() for names")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    where = _resolve_device(device)
    images, labels = _split_tensors(dataset.train)
    images, labels = images.to(where), labels.to(where)
    batches_per_epoch = math.ceil(len(labels) / _REFERENCE_BATCH)
    total_steps = epochs * batches_per_epoch
    with torch.random.fork_rng(devices=[where] if where.type == "cuda" else []):
        torch.manual_seed(seed)
        network = timm.create_model(model, num_classes=dataset.num_classes, in_chans=dataset.in_chans).to(where)
        optimizer = torch.optim.SGD(network.parameters(), lr=_REFERENCE_LR, momentum=_REFERENCE_MOMENTUM,
                                    nesterov=True, weight_decay=_REFERENCE_WEIGHT_DECAY)
        network.train()
        step = 0
        for epoch in range(epochs):
            permutation = torch.randperm(len(labels), generator=epoch_generator(seed, epoch, _SHUFFLE_STREAM))
            for start in range(0, len(labels), _REFERENCE_BATCH):
                batch = permutation[start:start + _REFERENCE_BATCH].to(where)
                if len(batch) < 2:  # batch norm cannot train on a single sample
                    continue
                for group in optimizer.param_groups:
                    group["lr"] = _REFERENCE_LR * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                logits = network(_normalize(images[batch].float() / 255, dataset))
                loss = F.cross_entropy(logits, labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
    return network.eval()


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _describe(rung: Rung) -> str:
    """A short description of a rung's ops, e.g. ``crop 0.4, cutout 0.5 + 2 of 8 ops at 0.8``.

    Example:
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> [_describe(rung) for rung in load_ladder("flips").rungs]
        ['identity', 'hflip 1']
    """
    if rung.is_identity:
        return "identity"
    parts = [f"{step.op} {step.magnitude:g}" + (f" (p {step.probability:g})" if step.probability < 1 else "")
             for step in rung.steps]
    text = ", ".join(parts)
    if rung.randaugment is not None and rung.randaugment.n > 0:
        random = rung.randaugment
        text += f"{' + ' if text else ''}{random.n} of {len(random.ops())} ops at {random.magnitude:g}"
    mix = _mix_of(rung)
    if mix is not None:
        text += f"{' + ' if text else ''}{mix.kind} {mix.magnitude:g}"
    return text


def _mix_of(rung: Rung) -> Any:
    """The rung's batch mixing, or None (also for ladders from before rungs could mix)."""
    mix = getattr(rung, "mix", None)
    return mix if mix is not None and mix.magnitude > 0 else None


def _apply_rung(rung: Rung, images: Tensor, labels: Tensor, num_classes: int,
                generator: torch.Generator) -> Tensor:
    """The rung's per-sample ops, then its batch mixing (which :meth:`Rung.apply` leaves to the batch path)."""
    augmented = rung.apply(images, generator)
    mix = _mix_of(rung)
    if mix is not None:
        augmented, _ = mix_batch(augmented, labels, mix.kind, mix.magnitude, generator, num_classes=num_classes)
    return augmented


def measure_ladder(ladder: Ladder, dataset: DatasetSplits, *, model: nn.Module | None = None, samples: int = 1000,
                   repeats: int = 1, seed: int = 0) -> LadderMeasurement:
    """Measure every rung's strength on ``samples`` test images, image-based and model-based.

    The test images are a seeded random subset (test splits are often sorted by class). Every rung is applied to
    the same images with the same seeded generator (common random numbers: neighbouring rungs that share ops also
    share their draws, so their difference is less noisy). The reference model sees normalized images, in eval
    mode, without gradients; its train/eval mode is restored afterwards.

    Args:
        ladder: The ladder to measure.
        dataset: The splits; ``test`` is used (``train`` too when a reference model must be trained).
        model: A classifier of normalized images (default: :func:`train_reference_model` with this seed).
        samples: Test images to use (all of them when fewer).
        repeats: Independent augmentation draws per image, averaged.
        seed: Seed of the subset, the augmentation draws and the default reference model.

    Returns:
        The measurement, one :class:`RungStrength` per rung.

    Example:
        >>> from torch import nn
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> from cycdata.loaders.datasets import load_dataset
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
        >>> result = measure_ladder(load_ladder("flips"), load_dataset("synthetic:50"), model=model, samples=8)
        >>> result.rungs[1].pixel_change > 0, result.rungs[1].ops
        (True, 'hflip 1')
    """
    for name, value in (("samples", samples), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if len(dataset.test) == 0:
        raise ValueError("the dataset's test split is empty; there is nothing to measure on")
    if model is None:
        model = train_reference_model(dataset, seed=seed)
    device = _model_device(model)
    count = min(samples, len(dataset.test))
    subset = torch.randperm(len(dataset.test), generator=epoch_generator(seed, 0, _SUBSET_STREAM))[:count]
    images, labels = _split_tensors(dataset.test, subset.sort().values)
    originals = images.to(device).float() / 255
    labels = labels.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clean = _correct(model, originals, labels, dataset) / count
            rungs = tuple(_measure_rung(index, rung, model, originals, labels, dataset, repeats, seed, clean)
                          for index, rung in enumerate(ladder.rungs))
    finally:
        model.train(was_training)
    return LadderMeasurement(ladder=ladder.name, dataset=dataset.name, clean_accuracy=clean, rungs=rungs)


def _correct(model: nn.Module, images: Tensor, labels: Tensor, dataset: DatasetSplits) -> float:
    """How many of the images the model classifies correctly (in chunks)."""
    hits = 0
    for start in range(0, len(labels), _CHUNK):
        logits = model(_normalize(images[start:start + _CHUNK], dataset))
        hits += int((logits.argmax(dim=1) == labels[start:start + _CHUNK]).sum())
    return float(hits)


def _measure_rung(index: int, rung: Rung, model: nn.Module, originals: Tensor, labels: Tensor,
                  dataset: DatasetSplits, repeats: int, seed: int, clean: float) -> RungStrength:
    change = similarity = hits = 0.0
    for repeat in range(repeats):
        generator = epoch_generator(seed, repeat, _AUGMENT_STREAM)
        for start in range(0, len(labels), _CHUNK):
            chunk = originals[start:start + _CHUNK]
            augmented = _apply_rung(rung, chunk, labels[start:start + _CHUNK], dataset.num_classes, generator)
            # Sums, not means, so unequal chunks weigh by their size.
            change += pixel_change(chunk, augmented) * len(chunk)
            similarity += float(ssim(chunk, augmented).sum())
            hits += _correct(model, augmented, labels[start:start + _CHUNK], dataset)
    total = len(labels) * repeats
    accuracy = hits / total
    return RungStrength(rung=index, pixel_change=change / total, ssim_drop=1.0 - similarity / total,
                        accuracy=accuracy, accuracy_drop=clean - accuracy, ops=_describe(rung))


# --------------------------------------------------------------------------------------------
# Acting on a measurement: reorder, look
# --------------------------------------------------------------------------------------------


def reorder(ladder: Ladder, order: Sequence[int]) -> Ladder:
    """The same ladder with its rungs in ``order`` (e.g. :meth:`LadderMeasurement.order`).

    Args:
        ladder: The ladder.
        order: A permutation of the rung indices; ``order[k]`` is the rung that becomes rung ``k``.

    Raises:
        LadderError: ``order`` is not a permutation of ``0 .. len(rungs) - 1``.

    Example:
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> digits = load_ladder("digits")
        >>> reorder(digits, [0, 2, 1, 3, 4]).rungs[1] == digits.rungs[2]
        True
    """
    indices = [int(index) for index in order]
    if sorted(indices) != list(range(len(ladder.rungs))):
        raise LadderError(f"order {indices} is not a permutation of the rung indices 0..{len(ladder.rungs) - 1}")
    return Ladder(name=ladder.name, rungs=tuple(ladder.rungs[index] for index in indices))


def grid_png(ladder: Ladder, dataset: DatasetSplits, path: str | Path, *, columns: int = 8, seed: int = 0) -> Path:
    """Draw every rung on the same test images: one row per rung, ``columns`` images per row, to a PNG.

    The images are a seeded random subset of the test split; each row augments them with one rung, drawn from the
    same seeded generator, so rows differ only by the rung.

    Args:
        ladder: The ladder to show.
        dataset: The splits; ``test`` is used.
        path: The PNG file to write (overwritten).
        columns: Images per row (at most the test split's size).
        seed: Seed of the images chosen and of the augmentation draws.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> from cycdata.augment_ladder.ladder import load_ladder
        >>> from cycdata.loaders.datasets import load_dataset
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = grid_png(load_ladder("flips"), load_dataset("synthetic:20"), Path(tmp) / "g.png", columns=2)
        ...     out.read_bytes()[:4]
        b'\\x89PNG'
    """
    # The object-oriented matplotlib API with an explicit Agg canvas: no pyplot state, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an integer >= 1, got {columns!r}")
    count = min(columns, len(dataset.test))
    subset = torch.randperm(len(dataset.test), generator=epoch_generator(seed, 0, _SUBSET_STREAM))[:count]
    images, labels = _split_tensors(dataset.test, subset)
    originals = images.float() / 255
    rows = len(ladder.rungs)
    figure = Figure(figsize=(2.2 + 1.0 * count, 0.6 + 1.0 * rows), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, count, squeeze=False)
    for row, rung in enumerate(ladder.rungs):
        generator = epoch_generator(seed, 0, _AUGMENT_STREAM)
        augmented = _apply_rung(rung, originals, labels, dataset.num_classes, generator).clamp(0, 1)
        for column in range(count):
            axis = axes[row][column]
            image = augmented[column]
            if image.shape[0] == 1:
                axis.imshow(image[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            else:
                axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        # One line per part (ops, random ops, mixing), wrapped to fit the left margin.
        parts = _describe(rung).split(" + ")
        lines = [textwrap.fill(("+ " if index else "") + part, width=30) for index, part in enumerate(parts)]
        # The strength that selects this rung alone (a strength between two rungs mixes them per sample).
        place = f" (strength {row / (rows - 1):.2g})" if rows > 1 else ""
        label = "\n".join([f"rung {row}{place}", *lines])
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    figure.suptitle(f"augmentation ladder '{ladder.name}': one row per rung, weakest (strength 0) at the top; "
                    f"the same {count} test images in every row", fontsize=10)
    figure.subplots_adjust(left=2.0 / (2.2 + count), right=0.98, top=1 - 0.45 / (0.6 + rows), bottom=0.02,
                           wspace=0.05, hspace=0.08)
    out = Path(path)
    figure.savefig(out)
    return out
