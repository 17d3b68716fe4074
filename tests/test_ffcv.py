"""FFCV files and the fast paths: conversion round trips, every cyclical knob through ffcv and through
device-resident tensors (the same batches as the reference path), DDP disjointness, bad files, no ffcv."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from cycdata.config import ConfigError, load_config
from cycdata.loaders.datasets import DatasetError, ImageFileDataset, load_dataset
from cycdata.loaders.device_loader import DeviceSource, resident_tensors
from cycdata.loaders.ffcv_loader import (
    BetonDataset,
    BetonError,
    FFCVMissingError,
    beton_paths,
    check_beton,
    convert,
)
from cycdata.loaders.torch_loader import CyclicalLoader, choose_placement
from cycdata.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
N = 600


@pytest.fixture(scope="module")
def betons(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("betons")
    convert("synthetic:600", folder / "s.beton", progress=False)
    convert("mnist5k", folder / "m.beton", progress=False)
    convert("digits", folder / "d.beton", jpeg_quality=95, progress=False)
    return {"synthetic": folder / "s.beton", "mnist5k": folder / "m.beton", "digits": folder / "d.beton"}


def controlled_losses(indices: torch.Tensor) -> torch.Tensor:
    """Sample i has loss (i * 37 mod N) / N: which samples are easiest is known."""
    return ((indices * 37) % N).float() / N


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def test_raw_conversion_round_trips_both_splits_exactly(betons: dict[str, Path]) -> None:
    reference = load_dataset("mnist5k")
    splits = load_dataset(f"beton:{betons['mnist5k']}")
    assert (splits.name, splits.num_classes, splits.in_chans, splits.image_size) == ("mnist5k", 10, 1, 32)
    assert splits.mean == pytest.approx(reference.mean) and splits.std == pytest.approx(reference.std)
    for split in ("train", "test"):
        ours, theirs = getattr(splits, split), getattr(reference, split)
        assert torch.equal(ours.labels, theirs.labels)  # read from the metadata table, no decoding
        decoded = ours.decoded()
        assert torch.equal(decoded.images, theirs.images)


def test_jpeg_conversion_is_close_and_keeps_one_channel(betons: dict[str, Path]) -> None:
    reference = load_dataset("digits")
    decoded = BetonDataset(betons["digits"], "test").decoded()
    assert decoded.images.shape == reference.test.images.shape  # 1 channel again after gray RGB JPEG
    error = (decoded.images.float() - reference.test.images.float()).abs().mean().item()
    assert 0 < error < 3.0  # lossy, but close at quality 95
    assert torch.equal(decoded.labels, reference.test.labels)


def test_max_resolution_shrinks_and_existing_files_are_kept(tmp_path: Path) -> None:
    info = convert("synthetic:30", tmp_path / "x.beton", max_resolution=16, progress=False)
    assert info.image_size == 16
    assert BetonDataset(tmp_path / "x.beton")[0][0].shape == (3, 16, 16)
    before = (tmp_path / "x.train.beton").stat().st_mtime_ns
    with pytest.raises(BetonError, match=r"already exist.*--overwrite"):
        convert("synthetic:30", tmp_path / "x.beton", progress=False)
    assert (tmp_path / "x.train.beton").stat().st_mtime_ns == before
    convert("synthetic:30", tmp_path / "x.beton", overwrite=True, progress=False)
    assert BetonDataset(tmp_path / "x.beton")[0][0].shape == (3, 32, 32)
    with pytest.raises(BetonError, match=r"1..100"):
        convert("synthetic:30", tmp_path / "y.beton", jpeg_quality=0, progress=False)


@pytest.mark.slow  # 32 s; test_trainer_on_a_beton_matches_the_in_memory_run trains on a beton by default
def test_cli_convert_then_train_on_the_beton(tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    result = cli("convert", "synthetic:200", "c.beton", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "c.train.beton: 200 images" in result.stdout and "cycdata train data.dataset=beton:c.beton" in result.stdout
    again = cli("convert", "synthetic:200", "c.beton")
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.splitlines()) == 1
    trained = cli("train", "data.dataset=beton:c.beton", "data.placement=ffcv", "epochs=2", "model=test_resnet",
                  "runtime.progress=false", "--out", "run")
    assert trained.returncode == 0, trained.stderr
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and float(rows[-1]["train_samples"]) == 200


# --------------------------------------------------------------------------------------------
# Bad files and no ffcv
# --------------------------------------------------------------------------------------------


def _copy(source: Path, target: Path) -> Path:
    for key, path in beton_paths(source).items():
        beton_paths(target)[key].write_bytes(path.read_bytes())
    return target


def test_truncated_file_is_a_clear_error_not_a_crash(betons: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(betons["synthetic"], tmp_path / "t.beton")
    train_file = beton_paths(copy)["train"]
    train_file.write_bytes(train_file.read_bytes()[: train_file.stat().st_size // 3])
    with pytest.raises(BetonError, match=r"truncated or was replaced"):
        BetonDataset(copy)
    with pytest.raises(DatasetError, match=r"truncated"):
        load_dataset(f"beton:{copy}")
    # Without the size check of the .json, the structural check still catches it.
    with pytest.raises(BetonError, match=r"truncated or damaged"):
        check_beton(train_file)


def test_foreign_and_damaged_files_are_clear_errors(betons: dict[str, Path], tmp_path: Path) -> None:
    foreign = tmp_path / "f.train.beton"
    foreign.write_bytes(os.urandom(5000))
    with pytest.raises(BetonError, match=r"not an ffcv 1.0 file"):
        check_beton(foreign)
    copy = _copy(betons["synthetic"], tmp_path / "g.beton")
    data = bytearray(beton_paths(copy)["train"].read_bytes())
    data[16:24] = np.uint64(len(data) * 4).tobytes()  # the allocation-table pointer, past the end
    beton_paths(copy)["train"].write_bytes(bytes(data))
    with pytest.raises(BetonError, match=r"truncated or damaged"):
        check_beton(beton_paths(copy)["train"])
    beton_paths(copy)["info"].unlink()
    with pytest.raises(BetonError, match=r"g.json is missing"):
        BetonDataset(copy)


def test_a_beton_without_an_index_field_is_refused(tmp_path: Path) -> None:
    from ffcv.fields import IntField, NDArrayField
    from ffcv.writer import DatasetWriter

    class Items:
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return np.zeros((1, 4, 4), dtype=np.uint8), i % 2

    path = tmp_path / "plain.train.beton"
    writer = DatasetWriter(str(path), {"image": NDArrayField(np.dtype("uint8"), (1, 4, 4)), "label": IntField()},
                           num_workers=1)
    writer.from_indexed_dataset(Items())
    with pytest.raises(BetonError, match=r"missing \['index'\].*cycdata convert"):
        check_beton(path)


def test_without_ffcv_a_beton_says_what_to_install(betons: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # import ffcv now raises ImportError
    with pytest.raises(FFCVMissingError, match=r"pip install --no-deps ffcv==1.0.2"):
        CyclicalLoader(str(betons["synthetic"]), epochs=2)
    with pytest.raises(FFCVMissingError, match=r"libturbojpeg0-dev"):
        load_dataset(f"beton:{betons['synthetic']}")


def test_cli_without_ffcv_exits_2_with_one_line(betons: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "ffcv.py").write_text("raise ImportError('No module named ffcv')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "convert", "digits", str(tmp_path / "z.beton")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "pip install --no-deps ffcv==1.0.2" in result.stderr


# --------------------------------------------------------------------------------------------
# Every knob through ffcv and through device-resident tensors: the same batches as the reference
# --------------------------------------------------------------------------------------------


KNOBS = {
    "batch size": {"batch_size": {"easy": 96, "hard": 32}},
    "keep": {"batch_size": {"easy": 80, "hard": 48}, "keep": {"easy": 0.4, "hard": 1.0}, "refresh_fraction": 0.0},
    "ssl": {"batch_size": 16, "labeled": torch.arange(0, N, 10), "unlabeled_ratio": {"easy": 0.0, "hard": 3.0}},
}


def _run(loader: CyclicalLoader, epochs: int) -> list[list[tuple[list[int], torch.Tensor, torch.Tensor]]]:
    record = []
    for _ in range(epochs):
        batches = []
        for images, labels in loader:
            indices = loader.batch_indices
            loader.record_loss(controlled_losses(indices[: loader.labeled_count]))
            batches.append((indices.tolist(), images.clone(), labels.clone()))
        record.append(batches)
    return record


@pytest.mark.parametrize("knob", sorted(KNOBS))
def test_ffcv_and_device_paths_yield_the_reference_batches(betons: dict[str, Path], knob: str) -> None:
    reference_data = load_dataset("synthetic:600").train
    options = {"epochs": 5, "seed": 4, **KNOBS[knob]}
    reference = _run(CyclicalLoader(reference_data, placement="workers", **options), 5)
    on_ffcv = _run(CyclicalLoader(str(betons["synthetic"]), placement="ffcv", num_workers=2, **options), 5)
    on_device = _run(CyclicalLoader(str(betons["synthetic"]), placement="device", **options), 5)
    for ours in (on_ffcv, on_device):
        assert [[b[0] for b in epoch] for epoch in ours] == [[b[0] for b in epoch] for epoch in reference]
        for epoch_ours, epoch_ref in zip(ours, reference):
            for (indices, images, labels), (_, ref_images, ref_labels) in zip(epoch_ours, epoch_ref):
                assert torch.equal(images, ref_images) and torch.equal(labels, ref_labels)
                assert torch.equal(images, reference_data.images[indices])  # indices round-trip
    sizes = [sorted({len(b[0]) for b in epoch}) for epoch in on_ffcv]
    totals = [sum(len(b[0]) for b in epoch) for epoch in on_ffcv]
    if knob == "batch size":  # the batch size changes between epochs without a new loader
        assert [max(s) for s in sizes] == [96, 64, 32, 64, 96]
    if knob == "keep":  # 240 -> 420 -> 600 -> 420 -> 240 samples: growing lists are not truncated
        assert totals == [240, 420, 600, 420, 240]
    if knob == "ssl":  # batches of 16 labeled + a cyclical share of unlabeled samples, cut from ffcv's chunks
        assert totals[0] < totals[2] and totals[4] < totals[2]


def test_ffcv_batches_are_copies_not_ring_buffers(betons: dict[str, Path]) -> None:
    loader = CyclicalLoader(str(betons["synthetic"]), epochs=2, batch_size=50, placement="ffcv")
    kept = [(images, loader.batch_indices.clone()) for images, _ in loader]
    data = load_dataset("synthetic:600").train
    assert all(torch.equal(images, data.images[indices]) for images, indices in kept)


def test_ladder_on_ffcv_batches_follows_the_strength_without_recompiling(betons: dict[str, Path]) -> None:
    loader = CyclicalLoader(str(betons["synthetic"]), epochs=3, batch_size=200, placement="ffcv", ladder="default")
    data = load_dataset("synthetic:600").train
    changed = []
    for _ in range(3):
        differences = []
        for images, _ in loader:
            differences.append((images.float() - data.images[loader.batch_indices].float()).abs().mean().item())
        changed.append(sum(differences) / len(differences))
    compiled = loader._source._loader.code
    assert changed[0] == 0.0 and changed[2] == 0.0 and changed[1] > 5.0  # strength 0 -> 1 -> 0
    assert loader._source._loader.code is compiled


def test_ffcv_mid_epoch_state_resumes_the_same_batches(betons: dict[str, Path]) -> None:
    def make() -> CyclicalLoader:
        return CyclicalLoader(str(betons["synthetic"]), epochs=3, batch_size={"easy": 90, "hard": 40},
                              keep={"easy": 0.5, "hard": 1.0}, placement="ffcv", seed=2)

    expected = [[b[0] for b in epoch] for epoch in _run(make(), 3)]
    interrupted = make()
    first = _run(interrupted, 1)
    for step, _ in enumerate(interrupted):
        interrupted.record_loss(controlled_losses(interrupted.batch_indices))
        if step == 1:
            state = interrupted.state_dict()
            break
    resumed = make()
    resumed.load_state_dict(state)
    rest = _run(resumed, 2)
    assert [b[0] for b in first[0]] == expected[0]
    assert expected[1][:2] + [b[0] for b in rest[0]] == expected[1]
    assert [b[0] for b in rest[1]] == expected[2]


def _ddp_worker(rank: int, folder: str, beton: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    loader = CyclicalLoader(beton, epochs=3, batch_size={"easy": 60, "hard": 20}, keep={"easy": 0.5, "hard": 1.0},
                            placement="ffcv", seed=1, refresh_fraction=0.0, num_workers=1)
    record = _run(loader, 3)
    torch.save([[b[0] for b in epoch] for epoch in record], f"{folder}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_two_gloo_ranks_read_disjoint_samples_through_ffcv(betons: dict[str, Path], tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(str(tmp_path), str(betons["synthetic"])), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for epoch_a, epoch_b in zip(a, b):
        seen_a = {i for batch in epoch_a for i in batch}
        seen_b = {i for batch in epoch_b for i in batch}
        assert len(epoch_a) == len(epoch_b)  # same number of steps on every rank
        assert not seen_a & seen_b
    assert {i for batch in a[1] + b[1] for i in batch} == set(range(N))  # the hard epoch covers everything
    assert sum(len(batch) for batch in a[0] + b[0]) == N // 2  # the easy epochs keep the same half on both ranks


# --------------------------------------------------------------------------------------------
# Placement
# --------------------------------------------------------------------------------------------


def test_auto_placement_and_refusals(betons: dict[str, Path], tmp_path: Path) -> None:
    beton = BetonDataset(betons["synthetic"])
    memory = load_dataset("synthetic:50").train
    assert choose_placement(beton, "auto", "cpu", {}) == "device"  # 1.8 MB fits in host memory
    assert choose_placement(memory, "auto", "cpu", {}) == "device"
    assert choose_placement(memory, "auto", "cpu", {"num_workers": 2}) == "workers"
    with pytest.raises(ValueError, match=r"cycdata convert"):
        choose_placement(memory, "ffcv", "cpu", {})
    with pytest.raises(ValueError, match=r"not by DataLoader workers"):
        choose_placement(beton, "workers", "cpu", {})
    with pytest.raises(ValueError, match=r"one of auto, device, workers, ffcv"):
        choose_placement(memory, "gpu", "cpu", {})
    with pytest.raises(ConfigError, match=r"data.placement.*must be one of"):
        load_config(None, ["data.placement=gpu"])


def test_device_path_decodes_a_lazy_dataset_once(tmp_path: Path) -> None:
    from PIL import Image

    samples = []
    for label in range(2):
        for number in range(3):
            path = tmp_path / f"{label}_{number}.png"
            Image.fromarray(np.full((8, 8, 3), 40 * number + label, dtype=np.uint8)).save(path)
            samples.append((str(path), label))
    lazy = ImageFileDataset(samples, ["a", "b"], image_size=8)
    images, labels = resident_tensors(lazy, "cpu")
    assert images.shape == (6, 3, 8, 8) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    batches = list(DeviceSource(lazy).epoch([[5, 0], [2]]))
    assert [b[2].tolist() for b in batches] == [[5, 0], [2]] and torch.equal(batches[0][0][0], lazy[5][0])


def test_trainer_on_a_beton_matches_the_in_memory_run(betons: dict[str, Path], tmp_path: Path) -> None:
    common = ["epochs=2", "model=test_resnet", "runtime.progress=false", "data.batch_size={easy: 256, hard: 128}",
              "self_paced.keep={easy: 0.5, hard: 1.0}", "augment.ladder=digits"]
    rows = {}
    for name, dataset, placement in (("memory", "mnist5k", "auto"), ("ffcv", f"beton:{betons['mnist5k']}", "ffcv")):
        train(load_config(None, [*common, f"data.dataset={dataset}", f"data.placement={placement}"]), tmp_path / name)
        with (tmp_path / name / "metrics.csv").open() as handle:
            rows[name] = list(csv.DictReader(handle))
    for key in ("data.batch_size", "self_paced.kept", "augment.strength", "train_loss", "test_accuracy"):
        assert [r[key] for r in rows["ffcv"]] == [r[key] for r in rows["memory"]], key
    assert json.loads(beton_paths(betons["mnist5k"])["info"].read_text())["name"] == "mnist5k"


@pytest.mark.slow  # 24 s; the semi-supervised example trains by default
def test_trainer_semi_supervised_on_a_beton(betons: dict[str, Path], tmp_path: Path) -> None:
    config = load_config(None, ["epochs=2", "model=test_resnet", "runtime.progress=false", "data.batch_size=32",
                                f"data.dataset=beton:{betons['mnist5k']}", "data.placement=ffcv",
                                "semi_supervised={labeled: 100, ratio: {easy: 1, hard: 3}}"])
    row = train(config, tmp_path)
    assert row["train_samples"] == 4000  # labeled samples: as many steps as a supervised epoch, 32 labeled each
    assert row["unlabeled_samples"] > 0 and 0 <= row["pseudo_label_rate"] <= 1
