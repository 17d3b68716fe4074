"""Files a user passes in stay data (issue 15 items 1 and 10): a malicious pickle never runs, on every entry
point of the CLI (--init, --resume, distill.teacher=MODEL:FILE, data.dataset=cifar10:DIR); plain state dicts,
version-1 checkpoints and real-format CIFAR pickles still load; damaged CIFAR batches and a truncated PNG in an
ImageFolder end in one line, not a traceback."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader

from cycdata.loaders.datasets import DatasetError, ImageFileDataset, load_dataset
from cycdata.train.checkpoint import (
    CheckpointError,
    UnsafeFileError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from cycdata.train.weights import load_weights

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=test_resnet", "runtime.progress=false", "data.num_workers=0", "data.dataset=synthetic:64", "epochs=2"]


class Exploit:
    """Unpickling this runs ``touch MARKER``: what an attacker's checkpoint or batch file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def assert_refused_in_one_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def malicious_weights(folder: Path, marker: Path, name: str = "evil.pt") -> Path:
    """A torch file whose state dict holds one tensor and one object that runs a command when unpickled."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    torch.save({"model": {"fc.weight": torch.zeros(2, 2), "payload": Exploit(marker)}, "epoch": 1}, path)
    return path


def write_cifar10(root: Path, protocol: int, replace: dict[str, object] | None = None) -> Path:
    """A tiny CIFAR-10 in the release's layout (dicts of lists and uint8 arrays), pickled with ``protocol``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files: dict[str, object] = {
        f"data_batch_{i}": {"batch_label": f"batch {i}", "labels": [i % 10, (i + 1) % 10],
                            "data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "filenames": ["a.png", "b.png"]}
        for i in range(1, 6)
    }
    files["test_batch"] = {"batch_label": "test", "labels": [3, 4], "data": rng.integers(0, 256, (2, 3072),
                                                                                         dtype=np.uint8)}
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 2}
    files.update(replace or {})
    for name, content in files.items():
        with open(folder / name, "wb") as handle:
            pickle.dump(content, handle, protocol=protocol)
    return root


# --------------------------------------------------------------------------------------------- malicious files


def test_malicious_init_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = malicious_weights(tmp_path, marker)
    result = run_cli("train", *TINY, "--init", str(weights), "--out", str(tmp_path / "run"))
    assert not marker.exists()
    assert_refused_in_one_line(result, "posix.system", str(weights))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_malicious_resume_checkpoint_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    malicious_weights(run, marker, "last.pt")
    result = run_cli("train", "--resume", str(run))
    assert not marker.exists()
    assert_refused_in_one_line(result, "posix.system")


def test_malicious_teacher_file_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = malicious_weights(tmp_path, marker)
    result = run_cli("train", *TINY, f"distill.teacher=test_resnet:{weights}", "--out", str(tmp_path / "run"))
    assert not marker.exists()
    assert_refused_in_one_line(result, "posix.system")


def test_malicious_cifar_batch_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    root = write_cifar10(tmp_path / "cifar", protocol=2, replace={"data_batch_3": {"data": Exploit(marker)}})
    result = run_cli("train", "model=test_resnet", "runtime.progress=false", f"data.dataset=cifar10:{root}",
                     "--out", str(tmp_path / "run"))
    assert not marker.exists()
    assert_refused_in_one_line(result, "posix.system", "data_batch_3")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_malicious_files_refused_by_the_api(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    weights = malicious_weights(tmp_path, marker)
    with pytest.raises(UnsafeFileError, match=r"posix\.system"):
        load_checkpoint(weights)
    with pytest.raises(UnsafeFileError, match=r"posix\.system"):
        load_weights(timm.create_model("test_resnet", num_classes=2), weights)
    # A numpy array is allowed, but only as data: an object array whose item is an exploit is still refused.
    sneaky = tmp_path / "sneaky.pt"
    torch.save({"model": {}, "rng": [{"numpy": np.array([Exploit(marker)], dtype=object)}]}, sneaky)
    with pytest.raises(UnsafeFileError):
        load_checkpoint(sneaky)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- safe files still load


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module"])
def test_plain_state_dicts_still_load_as_init_weights(tmp_path: Path, wrap: str) -> None:
    source = timm.create_model("test_resnet", num_classes=10)
    state = source.state_dict()
    saved = {"plain": state, "state_dict": {"state_dict": state, "epoch": 3, "arch": "test_resnet"},
             "module": {f"module.{key}": value for key, value in state.items()}}[wrap]
    torch.save(saved, tmp_path / "w.pth")
    target = timm.create_model("test_resnet", num_classes=10)
    report = load_weights(target, tmp_path / "w.pth")
    assert report.loaded == len(state)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), state.values()))


def test_version_1_checkpoint_with_numpy_rng_still_loads(tmp_path: Path) -> None:
    """The format before this change stored numpy's RNG as an array: read safely, and its RNG restores."""
    np.random.seed(7)
    expected = np.random.random(3)
    np.random.seed(7)
    legacy_rng = {**capture_rng_state(), "numpy": np.random.get_state()}
    path = tmp_path / "last.pt"
    torch.save({"version": 1, "model": {"w": torch.ones(2)}, "epoch": 1, "rng": [legacy_rng]}, path)
    state = load_checkpoint(path)
    np.random.seed(0)
    restore_rng_state(state["rng"][0])
    assert np.array_equal(np.random.random(3), expected)


def test_rng_state_round_trips_through_weights_only(tmp_path: Path) -> None:
    rng = capture_rng_state()
    save_checkpoint({"rng": [rng]}, tmp_path / "c.pt")
    expected = (np.random.random(4), torch.rand(3), __import__("random").random())
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"][0])
    again = (np.random.random(4), torch.rand(3), __import__("random").random())
    assert np.array_equal(expected[0], again[0]) and torch.equal(expected[1], again[1]) and expected[2] == again[2]


@pytest.mark.parametrize("protocol", [2, 5])
def test_real_format_cifar_pickles_load_with_the_restricted_unpickler(tmp_path: Path, protocol: int) -> None:
    splits = load_dataset(f"cifar10:{write_cifar10(tmp_path, protocol)}")
    assert (len(splits.train), len(splits.test), splits.num_classes) == (10, 2, 10)
    assert splits.train[0][0].dtype == torch.uint8


# --------------------------------------------------------------------------------------------- damaged data


def test_damaged_cifar_batches_are_one_line_errors(tmp_path: Path) -> None:
    root = write_cifar10(tmp_path / "clean", protocol=2)
    clean = (root / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    rng = np.random.default_rng(1)
    refused = 0
    for trial in range(25):
        damaged = bytearray(clean)
        if trial % 3 == 0:
            damaged = damaged[: int(rng.integers(1, len(clean)))]  # truncated
        else:
            start = int(rng.integers(0, len(clean) - 8))
            damaged[start : start + 8] = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(bytes(damaged))
        try:
            load_dataset(f"cifar10:{root}")
        except DatasetError as error:  # any other exception type fails the test
            assert "\n" not in str(error) and "data_batch_1" in str(error)
            refused += 1
    # Bytes flipped inside the pixel payload leave a valid pickle: loading it is then correct behaviour.
    assert refused >= 8
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x02}q\x00(X\x04\x00\x00\x00data")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(f"cifar10:{root}")
    result = run_cli("train", "model=test_resnet", "runtime.progress=false", f"data.dataset=cifar10:{root}",
                     "--out", str(tmp_path / "run"))
    assert_refused_in_one_line(result, "data_batch_1", "re-download")


def image_folder_with_a_truncated_png(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(5):
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{index}.png")
    broken = root / "a" / "3.png"
    broken.write_bytes(broken.read_bytes()[:300])
    return broken


def test_truncated_png_in_worker_processes_is_one_line(tmp_path: Path) -> None:
    broken = image_folder_with_a_truncated_png(tmp_path / "images")
    dataset = ImageFileDataset([(str(broken), 0)], classes=["a"], image_size=16)
    with pytest.raises(DatasetError) as caught:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))  # the error comes back from a worker
    assert "\n" not in str(caught.value) and str(broken) in str(caught.value)


def test_truncated_png_in_an_image_folder_stops_the_cli_in_one_line(tmp_path: Path) -> None:
    broken = image_folder_with_a_truncated_png(tmp_path / "images")
    # epochs=3: a run long enough for its cycle, so the error is the only line.
    result = run_cli("train", "model=test_resnet", "runtime.progress=false", "epochs=3", "data.batch_size=4",
                     f"data.dataset=folder:{tmp_path / 'images'}", "--out", str(tmp_path / "run"))
    assert_refused_in_one_line(result, str(broken), "cannot decode")


def test_checkpoint_errors_are_checkpoint_errors(tmp_path: Path) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="truncated or not a cycdata checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
