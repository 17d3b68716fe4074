"""Behaviour tests for cycdata.loaders.datasets: specs, fixed splits, on-disk formats, errors. No downloads."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycdata.loaders.datasets import (
    DatasetError,
    DatasetSplits,
    ImageFileDataset,
    TensorImageDataset,
    load_dataset,
)


def _row_hashes(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in images]


def _class_counts(dataset: TensorImageDataset, num_classes: int) -> list[int]:
    return torch.bincount(dataset.labels, minlength=num_classes).tolist()


# --------------------------------------------------------------------------------------------- mnist5k


def test_mnist5k_shapes_dtypes_and_classes() -> None:
    splits = load_dataset("mnist5k")
    assert isinstance(splits, DatasetSplits)
    assert (splits.name, splits.num_classes, splits.in_chans, splits.image_size) == ("mnist5k", 10, 1, 32)
    train, test = splits.train, splits.test
    assert isinstance(train, TensorImageDataset) and isinstance(test, TensorImageDataset)
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape == (4000, 1, 32, 32) and test.images.shape == (1000, 1, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert _class_counts(train, 10) == [400] * 10
    assert _class_counts(test, 10) == [100] * 10
    # Real MNIST ink reaches (nearly) full intensity: pixels are 0..255, not 0..1.
    assert int(train.images.max()) > 200 and int(train.images.min()) == 0
    # The 2-pixel zero padding around every 28x28 digit.
    for images in (train.images, test.images):
        assert images[:, :, :2, :].eq(0).all() and images[:, :, -2:, :].eq(0).all()
        assert images[:, :, :, :2].eq(0).all() and images[:, :, :, -2:].eq(0).all()
        assert images[:, :, 2:-2, 2:-2].flatten(1).amax(1).gt(0).all()  # every digit has ink inside
    image, label = train[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8 and isinstance(label, int)
    assert len(splits.mean) == len(splits.std) == 1
    assert 0.05 < splits.mean[0] < 0.25 and 0.2 < splits.std[0] < 0.45  # MNIST-like statistics


def test_mnist5k_split_is_fixed_and_disjoint() -> None:
    first, second = load_dataset("mnist5k"), load_dataset("mnist5k")
    torch.manual_seed(123)  # the split must not follow the global seed
    third = load_dataset("mnist5k")
    for other in (second, third):
        for split in ("train", "test"):
            mine, theirs = getattr(first, split), getattr(other, split)
            assert torch.equal(mine.images, theirs.images) and torch.equal(mine.labels, theirs.labels)
    train_hashes, test_hashes = set(_row_hashes(first.train.images)), set(_row_hashes(first.test.images))
    assert len(train_hashes) == 4000 and len(test_hashes) == 1000  # no duplicated rows either
    assert train_hashes.isdisjoint(test_hashes)


def test_mnist5k_returns_fresh_tensors_each_call() -> None:
    first = load_dataset("mnist5k")
    first.train.images.zero_()  # a caller mutating its copy must not corrupt the per-process cache
    assert int(load_dataset("mnist5k").train.images.max()) > 200


def test_mnist5k_image_size_resizes_once() -> None:
    splits = load_dataset("mnist5k", image_size=16)
    assert splits.image_size == 16
    assert splits.train.images.shape == (4000, 1, 16, 16) and splits.test.images.shape == (1000, 1, 16, 16)
    assert splits.train.images.dtype == torch.uint8


# --------------------------------------------------------------------------------------------- digits


def test_digits_shapes_and_split() -> None:
    splits = load_dataset("digits")
    assert (splits.name, splits.num_classes, splits.in_chans, splits.image_size) == ("digits", 10, 1, 32)
    assert len(splits.train) + len(splits.test) == 1797
    assert abs(len(splits.test) / 1797 - 0.2) < 0.01
    assert splits.train.images.shape[1:] == (1, 32, 32) and splits.train.images.dtype == torch.uint8
    assert int(splits.train.images.max()) == 255  # 16 scaled to 255
    assert min(_class_counts(splits.test, 10)) >= 30  # stratified: every class in test
    assert torch.equal(splits.test.images, load_dataset("digits").test.images)


def test_digits_custom_image_size() -> None:
    assert load_dataset("digits", image_size=24).train[0][0].shape == (1, 24, 24)


# --------------------------------------------------------------------------------------------- synthetic


def test_synthetic_sizes_and_determinism() -> None:
    a, b = load_dataset("synthetic:200"), load_dataset("synthetic:200")
    assert (len(a.train), len(a.test), a.num_classes, a.in_chans, a.image_size) == (200, 40, 10, 3, 32)
    assert a.train.images.shape == (200, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.train.labels, b.train.labels)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert _class_counts(a.train, 10) == [20] * 10  # balanced
    assert len(load_dataset("synthetic:7").test) == 10  # max(N // 5, 10)
    assert load_dataset("synthetic:20", image_size=16).train[0][0].shape == (3, 16, 16)
    assert all(0.0 < m < 1.0 for m in a.mean) and all(0.0 < s < 0.5 for s in a.std)


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    splits = load_dataset("synthetic:500")
    train_x, test_x = splits.train.images.flatten(1).float(), splits.test.images.flatten(1).float()
    class_means = torch.stack([train_x[splits.train.labels == c].mean(0) for c in range(10)])
    predictions = torch.cdist(test_x, class_means).argmin(1)
    accuracy = (predictions == splits.test.labels).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1


def test_synthetic_sizes_follow_the_spec() -> None:
    splits = load_dataset("synthetic:50000")
    assert len(splits.train) == 50000 and len(splits.test) == 10000


@pytest.mark.parametrize("spec", ["synthetic:0", "synthetic:-3", "synthetic:abc", "synthetic:"])
def test_synthetic_bad_count(spec: str) -> None:
    with pytest.raises(DatasetError, match="positive image count"):
        load_dataset(spec)


# --------------------------------------------------------------------------------------------- cifar


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle)


def _fake_cifar10(root: Path, per_batch: int = 2, test_count: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Write a tiny CIFAR-10 in torchvision's pickle layout; return (train data [N, 3072], test data)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train_parts = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        _write_pickle(folder / f"data_batch_{i}", {"batch_label": f"batch {i}", "data": data, "labels": labels})
        train_parts.append(data)
    test = rng.integers(0, 256, (test_count, 3072), dtype=np.uint8)
    _write_pickle(folder / "test_batch", {"batch_label": "test", "data": test, "labels": [0, 1, 9][:test_count]})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": per_batch})
    return np.concatenate(train_parts), test


@pytest.mark.parametrize("inner", [False, True], ids=["parent-folder", "inner-folder"])
def test_fake_cifar10_loads_from_both_path_forms(tmp_path: Path, inner: bool) -> None:
    train_data, test_data = _fake_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" if inner else tmp_path
    splits = load_dataset(f"cifar10:{path}")
    assert (splits.name, splits.num_classes, splits.in_chans, splits.image_size) == ("cifar10", 10, 3, 32)
    assert (len(splits.train), len(splits.test)) == (10, 3)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.shape == (10, 3, 32, 32)
    # Rows are stored channel-major (1024 R, then G, then B), so they reshape straight to CHW.
    assert np.array_equal(splits.train.images.numpy(), train_data.reshape(-1, 3, 32, 32))
    assert np.array_equal(splits.test.images.numpy(), test_data.reshape(-1, 3, 32, 32))
    assert splits.test.labels.tolist() == [0, 1, 9]
    assert splits.train.classes is not None and splits.train.classes[0] == "airplane"
    expected_mean = train_data.reshape(-1, 3, 1024).transpose(1, 0, 2).reshape(3, -1).mean(1) / 255
    assert np.allclose(splits.mean, expected_mean)


def test_fake_cifar100_loads(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.arange(4 * 3072, dtype=np.int64).astype(np.uint8).reshape(4, 3072)
    _write_pickle(folder / "train", {"data": data, "fine_labels": [0, 5, 99, 7], "coarse_labels": [0, 1, 2, 3]})
    _write_pickle(folder / "test", {"data": data[:2], "fine_labels": [3, 4], "coarse_labels": [0, 0]})
    _write_pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": []})
    splits = load_dataset(f"cifar100:{tmp_path}", image_size=16)
    assert (splits.num_classes, len(splits.train), len(splits.test)) == (100, 4, 2)
    assert splits.train.labels.tolist() == [0, 5, 99, 7]
    assert splits.train[2][0].shape == (3, 16, 16)


def test_missing_cifar_folder_says_what_and_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(f"cifar10:{tmp_path}")
    message = str(info.value)
    assert "cifar-10-batches-py" in message and "never downloads" in message
    assert "download=True" in message and "\n" not in message
    with pytest.raises(DatasetError, match="cifar-100-python"):
        load_dataset(f"cifar100:{tmp_path / 'nowhere'}")


def test_incomplete_cifar_folder_names_missing_files(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="lacks data_batch_3"):
        load_dataset(f"cifar10:{tmp_path}")


def test_corrupt_cifar_batch_is_a_dataset_error(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset(f"cifar10:{tmp_path}")


# --------------------------------------------------------------------------------------------- folder


def _write_png(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).convert(mode).save(path)


_COLORS = {"cat": (250, 10, 10), "ant": (10, 250, 10), "dog": (10, 10, 250)}


def _image_tree(root: Path, per_class: int) -> None:
    for name, color in _COLORS.items():
        for i in range(per_class):
            # Mixed sizes, aspect ratios and modes: all must come out as 3 x S x S.
            size = (40 + 7 * i, 24 + 3 * i)
            _write_png(root / name / f"{i}.png", size, color, mode="L" if i == 1 else "RGB")


def test_folder_single_tree_split(tmp_path: Path) -> None:
    _image_tree(tmp_path, per_class=5)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    splits = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert (splits.name, splits.num_classes, splits.in_chans, splits.image_size) == ("folder", 3, 3, 16)
    assert isinstance(splits.train, ImageFileDataset)
    assert splits.train.classes == ("ant", "cat", "dog")  # sorted, ImageFolder convention
    assert (len(splits.train), len(splits.test)) == (12, 3)
    assert sorted(splits.test.labels.tolist()) == [0, 1, 2]  # stratified: one of each class
    train_paths = {path for path, _ in splits.train.samples}
    assert train_paths.isdisjoint(path for path, _ in splits.test.samples)
    for dataset in (splits.train, splits.test):
        for (path, _), (image, label) in zip(dataset.samples, dataset, strict=True):
            assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and isinstance(label, int)
            assert Path(path).parent.name == dataset.classes[label]
            if Path(path).name == "1.png":  # the grayscale file comes back as RGB with R == G == B
                assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
            else:  # colour survives decoding
                assert image[:, 8, 8].tolist() == list(_COLORS[dataset.classes[label]])
    assert load_dataset(f"folder:{tmp_path}", image_size=16).test.samples == splits.test.samples  # fixed split
    assert load_dataset(f"folder:{tmp_path}").train[0][0].shape == (3, 64, 64)  # default size


@pytest.mark.parametrize("eval_name", ["val", "test"])
def test_folder_train_val_layout(tmp_path: Path, eval_name: str) -> None:
    _image_tree(tmp_path / "train", per_class=3)
    _write_png(tmp_path / eval_name / "dog" / "x.png", (20, 50), _COLORS["dog"])
    _write_png(tmp_path / eval_name / "ant" / "y.jpg", (33, 33), _COLORS["ant"])
    splits = load_dataset(f"folder:{tmp_path}", image_size=12)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (9, 2, 3)
    assert splits.test.classes == ("ant", "cat", "dog")  # labels follow the train classes even though cat is absent
    assert splits.test.labels.tolist() == [0, 2]
    image, label = splits.test[1]
    assert image.shape == (3, 12, 12) and label == 2
    assert image[2].float().mean() > 200 and image[0].float().mean() < 50  # the blue dog


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "noimages" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match="cat"):
        load_dataset(f"folder:{tmp_path / 'noimages'}")
    _image_tree(tmp_path / "trainonly" / "train", per_class=2)
    with pytest.raises(DatasetError, match="no val/ or test/"):
        load_dataset(f"folder:{tmp_path / 'trainonly'}")
    _write_png(tmp_path / "trainonly" / "val" / "zebra" / "z.png", (8, 8), (0, 0, 0))
    with pytest.raises(DatasetError, match="zebra"):
        load_dataset(f"folder:{tmp_path / 'trainonly'}")


# --------------------------------------------------------------------------------------------- specs and errors


def test_a_missing_beton_says_how_to_write_it() -> None:
    with pytest.raises(DatasetError, match="cycdata convert") as info:
        load_dataset("beton:/data/cifar.beton")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["imagenet", "mnist", "cifar-10:/x", "", "MNIST5K"])
def test_unknown_spec_lists_allowed_forms(spec: str) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(spec)
    message = str(info.value)
    for form in ("mnist5k", "digits", "cifar10:PATH", "cifar100:PATH", "folder:PATH", "beton:PATH", "synthetic:N"):
        assert form in message


@pytest.mark.parametrize("spec", ["mnist5k:/x", "digits:3", "cifar10:", "folder:  "])
def test_malformed_arguments(spec: str) -> None:
    with pytest.raises(DatasetError):
        load_dataset(spec)


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_image_size(size: object) -> None:
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("synthetic:10", image_size=size)  # type: ignore[arg-type]


def test_dataset_error_is_a_value_error() -> None:
    assert issubclass(DatasetError, ValueError)


def test_tensor_image_dataset_validates_inputs() -> None:
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DatasetError, match="uint8"):
        TensorImageDataset(images.float(), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(DatasetError, match="int64"):
        TensorImageDataset(images, torch.zeros(3, dtype=torch.int32))
    with pytest.raises(DatasetError, match="same length"):
        TensorImageDataset(images, torch.zeros(2, dtype=torch.int64))
    dataset = TensorImageDataset(images, torch.tensor([2, 0, 1]))
    assert len(dataset) == 3 and dataset[-1][1] == 1
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    batch_images, batch_labels = next(iter(loader))
    assert batch_images.shape == (2, 1, 4, 4) and batch_labels.tolist() == [2, 0]
