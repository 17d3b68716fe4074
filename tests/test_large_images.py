"""The large-image data path: folders of real image files at 224 px, the random-resized crop, ffcv crops.

The images are the embedded MNIST digits, upscaled to 256..320 px with varying aspect ratios and written by
the tests as JPEG and PNG files in class folders (``train/`` and ``val/``), as an ImageNet folder is laid out.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycdata.augment_ladder.ops import OPS, RRC_SCALE, crop_boxes
from cycdata.loaders.datasets import ImageFileDataset, load_dataset
from cycdata.loaders.torch_loader import CyclicalLoader

SIZE = 224


def write_folder(root: Path, train: int = 60, val: int = 20) -> Path:
    """``root/{train,val}/<digit>/<n>.{jpg,png}``: real digits at 256..320 px, aspect ratios from 4:5 to 5:4."""
    data = load_dataset("mnist5k")
    rng = np.random.default_rng(0)
    for split, part, count in (("train", data.train, train), ("val", data.test, val)):
        for n in range(count):
            image, label = part[n * len(part) // count]  # spread over the (label-sorted) split: every class
            width, height = (int(v) for v in rng.integers(256, 321, size=2))
            gray = Image.fromarray(image[0].numpy()).resize((width, height), Image.Resampling.BILINEAR)
            rgb = Image.merge("RGB", (gray, gray.point(lambda v: 255 - v), gray.point(lambda v: v // 2)))
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            rgb.save(folder / (f"{n}.png" if n % 4 == 0 else f"{n}.jpg"), quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def splits(folder: Path):
    return load_dataset(f"folder:{folder}", image_size=SIZE)


def torchvision_eval(path: str) -> torch.Tensor:
    """timm's evaluation transform, by torchvision: Resize(floor(224 / 0.875)) + CenterCrop(224) on PIL."""
    from torchvision.transforms import v2

    with Image.open(path) as opened:
        image = opened.convert("RGB")
    transform = v2.Compose([v2.Resize(int(SIZE / 0.875)), v2.CenterCrop(SIZE), v2.PILToTensor()])
    return transform(image)


def test_items_are_the_evaluation_transform(splits) -> None:
    assert splits.image_size == SIZE and len(splits.train) == 60 and len(splits.test) == 20
    for data in (splits.train, splits.test):
        for index in (0, 1, 5):  # a PNG and JPEGs
            image, _ = data[index]
            assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.uint8
            assert torch.equal(image, torchvision_eval(data.samples[index][0]))


def test_crop_at_magnitude_zero_is_the_evaluation_transform_bit_for_bit(splits) -> None:
    data = splits.train
    for index in range(0, 60, 7):
        crop, label = data.resized_crop(index, 0.0, torch.Generator().manual_seed(index))
        image, same_label = data[index]
        assert torch.equal(crop, image) and label == same_label


@pytest.mark.parametrize("shape", [(300, 260), (40, 400), (500, 30), (224, 224), (90, 100)])
def test_crops_are_always_the_image_size(tmp_path: Path, shape: tuple[int, int]) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)).save(path)
    data = ImageFileDataset([(str(path), 0)], classes=["a"], image_size=SIZE)
    generator = torch.Generator().manual_seed(0)
    for magnitude in (0.0, 0.01, 0.3, 0.7, 1.0):
        for _ in range(5):
            assert data.resized_crop(0, magnitude, generator)[0].shape == (3, SIZE, SIZE)


def box_areas(magnitude: float, count: int = 4000) -> np.ndarray:
    """Area fractions of ``count`` crops of a 300 x 400 image drawn at ``magnitude`` (evaluation reference)."""
    params = OPS["resized_crop"].draw(torch.full((count,), magnitude), torch.Generator().manual_seed(0))
    reference = SIZE * 300 / int(SIZE / 0.875)  # the evaluation crop's side in the image's pixels
    _, _, height, width = crop_boxes(300, 400, params["spread"], params["area"], params["aspect"],
                                     params["offset_x"], params["offset_y"], reference=(reference, reference))
    return (height * width / (300 * 400)).numpy()


def test_scale_range_grows_with_magnitude() -> None:
    spans = []
    for magnitude in (0.0, 0.25, 0.5, 1.0):
        areas = box_areas(magnitude)
        spans.append(areas.max() - areas.min())
    assert spans[0] == pytest.approx(0.0, abs=1e-6) and spans[0] < spans[1] < spans[2] < spans[3]
    # At m = 1 the smallest crops reach timm's smallest scale.
    assert box_areas(1.0).min() == pytest.approx(RRC_SCALE[0], abs=0.01)


def test_ratio_range_is_timms_at_full_magnitude() -> None:
    params = OPS["resized_crop"].draw(torch.ones(4000), torch.Generator().manual_seed(1))
    _, _, height, width = crop_boxes(1000, 1000, params["spread"], params["area"], params["aspect"],
                                     params["offset_x"], params["offset_y"])
    ratio = (width / height).numpy()
    inside = (height < 1000) & (width < 1000)  # clamped boxes lose their ratio
    assert ratio[inside.numpy()].min() == pytest.approx(3 / 4, abs=0.01)
    assert ratio[inside.numpy()].max() == pytest.approx(4 / 3, abs=0.02)


def test_parameters_are_drawn_per_sample(splits) -> None:
    # On a batch: one image repeated, each copy cropped differently; magnitude 0 samples stay as they are.
    image = splits.train[0][0].float().div(255)
    batch = image.expand(6, -1, -1, -1).contiguous()
    out = OPS["resized_crop"](batch, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), torch.Generator().manual_seed(0))
    assert all(not torch.equal(out[i], out[j]) for i in range(4) for j in range(i + 1, 4))
    assert torch.equal(out[4], batch[4]) and torch.equal(out[5], batch[5])
    # On files: two draws from one generator crop one file differently.
    generator = torch.Generator().manual_seed(3)
    first, second = (splits.train.resized_crop(2, 1.0, generator)[0] for _ in range(2))
    assert not torch.equal(first, second)


def test_workers_crop_the_full_image_at_the_planned_strength(splits) -> None:
    """Strength travels with the indices to persistent workers: 0 gives the evaluation images, 1 crops."""
    data = splits.train
    images = {}
    for strength in (0.0, 1.0):
        loader = CyclicalLoader(data, epochs=2, batch_size=20, ladder="imagenet", strength=strength, seed=0,
                                placement="workers", num_workers=2, persistent_workers=True)
        batches = [(batch[0], loader.batch_indices) for batch in loader]
        assert all(images_.shape[1:] == (3, SIZE, SIZE) for images_, _ in batches)
        images[strength] = batches
    for images_, indices in images[0.0]:
        assert torch.equal(images_, torch.stack([data[int(i)][0] for i in indices]))
    changed = [not torch.equal(images_, torch.stack([data[int(i)][0] for i in indices]))
               for images_, indices in images[1.0]]
    assert all(changed)


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)


def check_run(run: Path) -> None:
    assert (run / "last.pt").is_file()
    with (run / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(float(row["test_accuracy"]) >= 0 for row in rows)


TRAIN = ("data.image_size=224", "model=test_resnet", "epochs=2", "data.batch_size=20", "data.num_workers=2",
         "augment.ladder=none", "runtime.progress=false")


@pytest.mark.slow
def test_a_224_px_folder_trains_through_workers(folder: Path, tmp_path: Path) -> None:
    result = cli(tmp_path, "train", f"data.dataset=folder:{folder}", "data.placement=workers", *TRAIN, "--out", "run")
    assert result.returncode == 0, result.stderr
    check_run(tmp_path / "run")


@pytest.mark.slow
def test_a_224_px_folder_converts_and_trains_through_ffcv(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("ffcv")
    converted = cli(tmp_path, "convert", f"folder:{folder}", "f.beton", "--jpeg", "90", "--max-resolution", "256",
                    "--quiet")
    assert converted.returncode == 0, converted.stderr
    result = cli(tmp_path, "train", "data.dataset=beton:f.beton", "data.placement=ffcv", *TRAIN, "--out", "run")
    assert result.returncode == 0, result.stderr
    check_run(tmp_path / "run")
    # The file holds whole images (longer side at most 256), read back at any size; under a ladder the training
    # split is cropped while decoding at the batch's strength, 0 being the centre crop. In a process of its own:
    # ffcv's compiled decoders leave numba finalizer noise behind in the process that built several of them.
    checked = subprocess.run([sys.executable, "-c", FFCV_CHECK, str(tmp_path / "f.beton")], capture_output=True,
                             text=True, timeout=600)
    assert checked.returncode == 0 and checked.stdout.split() == ["ok"], checked.stderr[-2000:]


FFCV_CHECK = """
import sys, torch
from cycdata.loaders.ffcv_loader import BetonDataset
from cycdata.loaders.torch_loader import CyclicalLoader
test = BetonDataset(sys.argv[1], "test", image_size=96)
assert test.info.variable_size and test.decoded().images.shape == (20, 3, 96, 96)
train = BetonDataset(sys.argv[1], "train", image_size=224)
centre = train.decoded().images
for strength in (0.0, 1.0):
    loader = CyclicalLoader(train, epochs=2, batch_size=30, ladder="imagenet", strength=strength, seed=0,
                            placement="ffcv", num_workers=2)
    for images, _ in loader:
        assert images.shape[1:] == (3, 224, 224)
        assert torch.equal(images, centre[loader.batch_indices]) == (strength == 0.0)
print("ok")
"""
