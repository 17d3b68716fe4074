"""The package as a user gets it: ``python -m build`` without warnings, an sdist that holds what the tests
read, a wheel that holds every subpackage (the folders pyproject maps into ``cycdata.*``) and the suites'
YAML, the metadata's license and extras; and a run without the optional ``[tensorboard]`` extra.

The build here is ``--no-isolation`` (the running environment's setuptools, no network) and happens once
for the module; ``make dist-check`` does the isolated build, installs the wheel in a fresh venv and runs
the sdist's tests from its root.
"""

from __future__ import annotations

import email
import os
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import pytest

from cycdata.train.metrics import RunLogger

ROOT = Path(__file__).resolve().parents[1]

#: Source folder -> where its files go in the wheel (pyproject's package-dir; the DESIGN's one namespace).
PACKAGE_FOLDERS = {
    "cycdata": "cycdata",
    "loaders": "cycdata/loaders",
    "augment_ladder": "cycdata/augment_ladder",
    "train": "cycdata/train",
    "integrations": "cycdata/integrations",
}
#: Folders the tests read (examples/full.yaml, the benchmark scripts they run) or that CI runs from the sdist.
SDIST_FOLDERS = ("tests", "examples", "benchmarks", "docs", ".ci")
#: File kinds that belong in a source tree (caches, .beton files and run folders do not).
SOURCE_SUFFIXES = {".py", ".yaml", ".md", ".png", ".sh", ".typed", ""}


def source_files(folder: Path) -> list[Path]:
    """The files of ``folder`` (recursively) a source distribution should carry, relative to ROOT."""
    return sorted(
        path.relative_to(ROOT)
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix in SOURCE_SUFFIXES
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """sdist and wheel built from this tree, with the build's combined output."""
    out = tmp_path_factory.mktemp("dist")
    # PYTHONDONTWRITEBYTECODE makes distutils warn "byte-compiling is disabled": the environment's, not ours.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "log": result.stdout + result.stderr}


def test_the_build_prints_no_warning(built: dict[str, object]) -> None:
    log = str(built["log"])
    assert "warning" not in log.lower(), log


def test_the_sdist_holds_what_the_tests_read(built: dict[str, object]) -> None:
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {str(path) for folder in SDIST_FOLDERS for path in source_files(ROOT / folder)}
    wanted |= {str(path) for folder in PACKAGE_FOLDERS for path in source_files(ROOT / folder)}
    wanted |= {"README.md", "LICENSE", "Makefile", "MANIFEST.in", "pyproject.toml"}
    assert "examples/full.yaml" in wanted and "tests/test_packaging.py" in wanted  # the walk found the tree
    assert sorted(wanted - names) == []


def test_the_wheel_holds_every_subpackage_and_the_suites(built: dict[str, object]) -> None:
    with zipfile.ZipFile(built["wheel"]) as archive:
        names = set(archive.namelist())
    wanted = {
        f"{target}/{path.relative_to(folder)}"
        for folder, target in PACKAGE_FOLDERS.items()
        for path in source_files(ROOT / folder)
    }
    assert "cycdata/train/suites/smoke.yaml" in wanted and "cycdata/py.typed" in wanted
    assert sorted(wanted - names) == []
    # Nothing installed as a top-level `loaders` or `train` (it would shadow every user's train.py).
    assert {name.split("/", 1)[0] for name in names if not name.startswith("cycdata-")} == {"cycdata"}


def test_the_wheel_metadata_names_the_license_and_keeps_optional_packages_optional(
    built: dict[str, object],
) -> None:
    with zipfile.ZipFile(built["wheel"]) as archive:
        (metadata_name,) = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
        assert any(name.endswith(".dist-info/licenses/LICENSE") for name in archive.namelist())
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    required = {line.split(";")[0].split(">")[0].split("=")[0].strip().lower() for line in requires if ";" not in line}
    assert {"torch", "torchvision", "timm", "albumentations", "numpy", "scipy", "mlxtend"} <= required
    assert "tensorboard" not in required and "ffcv" not in required
    # [ffcv] must not pull opencv-python next to albumentations' headless build (ffcv is a --no-deps step).
    assert not any(line.lower().startswith(("opencv-python ", "opencv-python>", "opencv-python;", "ffcv"))
                   for line in requires)
    assert {"tensorboard", "ffcv", "dev"} <= set(metadata.get_all("Provides-Extra"))


def test_a_run_without_tensorboard_writes_its_csv_and_plots_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a package as not importable
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = RunLogger(tmp_path)
        logger.log_epoch({"epoch": 0, "train_loss": 1.0, "train_accuracy": 0.5, "test_accuracy": 0.4,
                          "test_nll": 1.2, "test_ece": 0.1, "optim.lr": 0.1})
        logger.log_epoch({"epoch": 1, "train_loss": 0.8, "train_accuracy": 0.6, "test_accuracy": 0.5,
                          "test_nll": 1.1, "test_ece": 0.1, "optim.lr": 0.05})
        logger.close()
    messages = [str(warning.message) for warning in caught]
    assert messages == ["TensorBoard events are not written (tensorboard is not installed): "
                        "pip install 'cycdata[tensorboard]'"]
    assert {"metrics.csv", "metrics.png", "knobs.png"} <= {path.name for path in tmp_path.iterdir()}
    assert not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "metrics.csv").read_text().splitlines()) == 3  # header + two epochs
