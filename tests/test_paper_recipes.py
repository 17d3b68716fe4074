"""The paper's recipes (examples/paper/): every one validates as `cycdata train` would, on data of its kind."""

from __future__ import annotations

import csv
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cycdata.train.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "examples" / "paper").glob("*.yaml"))


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def fake_cifar(root: Path, classes: int) -> Path:
    """A small CIFAR-10/100 in torchvision's pickle layout (random pixels, every class present)."""
    rng = np.random.default_rng(0)
    per_split = classes * 2
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for i in range(1, 6):
            data = rng.integers(0, 256, (per_split, 3072), dtype=np.uint8)
            with open(folder / f"data_batch_{i}", "wb") as handle:
                pickle.dump({"data": data, "labels": list(range(10)) * 2}, handle)
        with open(folder / "test_batch", "wb") as handle:
            pickle.dump({"data": rng.integers(0, 256, (per_split, 3072), dtype=np.uint8),
                         "labels": list(range(10)) * 2}, handle)
        with open(folder / "batches.meta", "wb") as handle:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for split in ("train", "test"):
            with open(folder / split, "wb") as handle:
                pickle.dump({"data": rng.integers(0, 256, (per_split, 3072), dtype=np.uint8),
                             "fine_labels": list(range(100)) * 2, "coarse_labels": [0] * per_split}, handle)
        with open(folder / "meta", "wb") as handle:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, handle)
    return root


def fake_imagenet(root: Path) -> Path:
    """An ImageNet-style folder: train/ and val/ class folders of JPEGs larger than 224 px."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("n01440764", "n01443537"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (260 + 10 * i, 300, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.JPEG", quality=90)
    return root


def dataset_for(recipe: Path, tmp_path: Path) -> str:
    if recipe.name.startswith("cifar100"):
        return f"cifar100:{fake_cifar(tmp_path / 'cifar100', 100)}"
    if recipe.name.startswith("cifar10"):
        return f"cifar10:{fake_cifar(tmp_path / 'cifar10', 10)}"
    return f"folder:{fake_imagenet(tmp_path / 'imagenet')}"


def test_every_row_has_a_recipe() -> None:
    names = {recipe.stem for recipe in RECIPES}
    rows = {f"{data}-{knob}" for data in ("cifar10", "cifar100", "imagenet") for knob in ("cwd", "cst", "cgc")}
    assert rows <= names, rows - names


@pytest.mark.parametrize("recipe", RECIPES, ids=[recipe.stem for recipe in RECIPES])
def test_the_recipe_passes_trains_checks_and_cycles_its_knob(recipe: Path, tmp_path: Path, capsys) -> None:
    dataset = dataset_for(recipe, tmp_path)
    overrides = [f"data.dataset={dataset}"]
    if "4k" in recipe.stem:
        overrides.append("data.train_limit=20")  # the fake CIFAR holds 100 images; the recipe's 4,000 would not fit
    # In this process (timm imported once for all recipes): `cycdata plan` is `main(["plan", ...])`.
    status = main(["plan", str(recipe), *overrides, "--json"])
    output = capsys.readouterr()
    assert status == 0, output.err
    plan = json.loads(output.out)
    assert plan["epochs"] == 200
    knob = {"cwd": "optim.weight_decay", "cst": "temperature", "cgc": "grad_clip"}[recipe.stem.rsplit("-", 1)[1]]
    values = plan["knobs"][knob]
    assert values[0] == min(values) < max(values) == values[len(values) // 2]  # easy, hard in the middle, easy
    others = {"optim.weight_decay", "temperature", "grad_clip"} - {knob}
    assert all(len(set(plan["knobs"].get(name, [0]))) == 1 for name in others)  # only the row's knob cycles


@pytest.mark.slow
def test_the_cifar10_cwd_recipe_trains_on_cifar_files(tmp_path: Path) -> None:
    dataset = f"data.dataset=cifar10:{fake_cifar(tmp_path / 'cifar10', 10)}"
    out = tmp_path / "run"
    result = cli("train", str(ROOT / "examples" / "paper" / "cifar10-cwd.yaml"), dataset, "epochs=3",
                 "optim.warmup_epochs=1", "data.num_workers=0", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["optim.weight_decay"]) for row in rows] == [1e-5, 8e-5, 1e-5]
    assert (out / "last.pt").is_file()
