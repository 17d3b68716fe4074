"""Damaged or edited .beton files are refused before training: the content checksum written at conversion,
the description's own checksum, and old (unchecksummed) conversions accepted with a warning."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from cycdata.loaders.datasets import load_dataset
from cycdata.loaders.ffcv_loader import (
    BetonDataset,
    BetonError,
    UnverifiedBetonWarning,
    beton_paths,
    check_beton,
    convert,
)

RECONVERT = "re-run cycdata convert"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("integrity")
    convert("synthetic:300", folder / "raw.beton", progress=False)
    convert("digits", folder / "jpeg.beton", jpeg_quality=90, progress=False)
    return {"raw": folder / "raw.beton", "jpeg": folder / "jpeg.beton"}


def _copy(source: Path, target: Path) -> Path:
    for key, path in beton_paths(source).items():
        beton_paths(target)[key].write_bytes(path.read_bytes())
    return target


def _garble(path: Path, count: int, seed: int = 0) -> None:
    """Overwrite ``count`` bytes in the middle of the data region (header and allocation table intact)."""
    data = bytearray(path.read_bytes())
    table = int(np.frombuffer(bytes(data[16:24]), dtype="<u8")[0])  # the allocation table's offset
    start = table // 2
    noise = np.random.default_rng(seed).integers(0, 256, count, dtype=np.uint8).tobytes()
    data[start:start + count] = bytes(a ^ (b | 1) for a, b in zip(data[start:start + count], noise))  # all differ
    path.write_bytes(bytes(data))


def _train_cli(folder: Path, beton: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cycdata.train.cli", "train", f"data.dataset=beton:{beton}", "data.placement=ffcv",
         "model=test_resnet", "epochs=2", "runtime.progress=false", "--out", str(folder / "run")],
        capture_output=True, text=True, cwd=folder, timeout=300)


def _assert_refused(result: subprocess.CompletedProcess[str], folder: Path, *names: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(name in result.stderr for name in names), result.stderr
    assert not (folder / "run").exists()  # refused before the run folder is made


def test_four_kib_flipped_in_a_raw_beton_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(converted["raw"], tmp_path / "r.beton")
    train_file = beton_paths(copy)["train"]
    _garble(train_file, 4096)
    check_beton(train_file)  # the structure is intact: only the content checksum sees the damage
    with pytest.raises(BetonError, match=rf"r\.train\.beton is damaged.*{RECONVERT}"):
        BetonDataset(copy, "train")
    BetonDataset(copy, "test")  # the other split is untouched and still opens
    _assert_refused(_train_cli(tmp_path, copy), tmp_path, "r.train.beton", RECONVERT)


def test_two_kb_garbled_in_a_jpeg_beton_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(converted["jpeg"], tmp_path / "j.beton")
    _garble(beton_paths(copy)["test"], 2000, seed=1)
    with pytest.raises(BetonError, match=rf"j\.test\.beton is damaged.*{RECONVERT}"):
        load_dataset(f"beton:{copy}")


def test_an_edited_description_is_refused(converted: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(converted["raw"], tmp_path / "e.beton")
    info_file = beton_paths(copy)["info"]
    description = json.loads(info_file.read_text())
    description["num_classes"] = 11  # plausible, and would silently build the wrong head
    info_file.write_text(json.dumps(description))
    with pytest.raises(BetonError, match=rf"e\.json was edited or damaged.*{RECONVERT}"):
        BetonDataset(copy)
    _assert_refused(_train_cli(tmp_path, copy), tmp_path, "e.json", RECONVERT)
    info_file.write_bytes(b"\xff\xfe\x00binary")  # not JSON, not UTF-8: one line, not a traceback
    _assert_refused(_train_cli(tmp_path, copy), tmp_path, "e.json", RECONVERT)


def test_a_description_reformatted_without_changes_is_accepted(converted: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(converted["raw"], tmp_path / "f.beton")
    info_file = beton_paths(copy)["info"]
    info_file.write_text(json.dumps(json.loads(info_file.read_text()), sort_keys=True))  # other order and spacing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(BetonDataset(copy)) == 300


def test_an_old_conversion_without_checksums_loads_with_a_warning(converted: dict[str, Path], tmp_path: Path) -> None:
    copy = _copy(converted["raw"], tmp_path / "o.beton")
    info_file = beton_paths(copy)["info"]
    description = json.loads(info_file.read_text())
    del description["checksum"], description["chunk_bytes"]
    for split in description["splits"].values():
        del split["sha256"]
    info_file.write_text(json.dumps(description))
    with pytest.warns(UnverifiedBetonWarning, match=rf"o\.json has no checksum.*{RECONVERT}"):
        data = BetonDataset(copy)
    assert len(data) == 300
    description["num_classes"] = "ten"  # unchecksummed, so its fields are checked one by one
    info_file.write_text(json.dumps(description))
    with pytest.warns(UnverifiedBetonWarning), pytest.raises(BetonError, match=r"num_classes.*positive integers"):
        BetonDataset(copy)
