"""Output paths (issue 15 items 2 and 9): names that become folders stay inside --out, nothing else is removed,
--out is checked writable and roomy before work, and a disk that fills up mid-run is one line, exit 2."""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cycdata.config import ConfigError
from cycdata.train.checkpoint import load_checkpoint
from cycdata.train.cli import main
from cycdata.train.experiment import Suite, run_suite
from cycdata.train.paths import check_output, dataset_folder, disk_full_line, remove_run_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=test_resnet", "data.train_limit=200", "epochs=2", "cyclical_factor=1", "runtime.progress=false"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env=env)


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def in_private_tmpfs(mount: Path, size: str, script: str, *, read_only: bool = False) -> None:
    """Run ``script`` (sh) with a private tmpfs of ``size`` mounted at ``mount`` (a real small or read-only disk)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a private tmpfs")
    options = f"size={size}" + (",ro" if read_only else "")
    mount.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mount}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine allows no private mounts: {probe.stderr.strip()}")
    subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mount} && {script}"],
                   check=True, timeout=600, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# Item 2: names that become paths, and what the runner may remove
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../victim", "/tmp/victim", "a/b", "..", ".hidden", "", "a\\b", 3])
def test_variant_names_that_are_not_one_plain_folder_are_refused(name: object) -> None:
    with pytest.raises(ConfigError, match="becomes a folder name"):
        Suite.from_mapping({"variants": {name: {}}})
    with pytest.raises(ConfigError, match="becomes a folder name"):  # a Suite built directly is checked too
        Suite(variants={name: {}}).runs(seeds=1)  # type: ignore[dict-item]


def test_dataset_specs_become_one_folder_each_inside_the_suite() -> None:
    assert dataset_folder("mnist5k") == "mnist5k" and dataset_folder("synthetic:300") == "synthetic:300"
    assert "/" not in dataset_folder("folder:../../etc") and dataset_folder("folder:../../etc") != ".."
    suite = Suite.from_mapping({"datasets": ["synthetic:300", "digits"], "variants": {"a": {}}})
    assert [run.name for run in suite.runs(seeds=1)] == ["synthetic:300/a/seed-0", "digits/a/seed-0"]
    with pytest.raises(ConfigError, match="same folder twice"):
        Suite.from_mapping({"datasets": ["folder:/data/x", "folder:/data_x"], "variants": {"a": {}}})


def test_cli_experiment_with_a_variant_outside_out_removes_and_writes_nothing(tmp_path: Path) -> None:
    victim = tmp_path / "victim" / "seed-0"
    victim.mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    suite = tmp_path / "evil.yaml"
    suite.write_text("seeds: 1\nbase: {model: test_resnet, epochs: 2, data.train_limit: 100}\n"
                     "variants: {'../victim': {}}\n")
    result = run_cli("experiment", str(suite), "--out", str(tmp_path / "out"))
    assert_one_line_refusal(result, "'../victim' becomes a folder name")
    assert (victim / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.yaml", "victim"]  # no --out, no run written


def test_remove_run_folder_removes_only_a_run_folder_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "suite"
    own = root / "a" / "seed-0"
    (own / "tensorboard").mkdir(parents=True)
    for name in ("config.yaml", "metrics.csv", ".last.pt.x1y2.tmp"):
        (own / name).write_text("run")
    remove_run_folder(root, own)
    assert not own.exists() and (root / "a").is_dir()

    foreign = root / "b" / "seed-0"
    foreign.mkdir(parents=True)
    (foreign / "config.yaml").write_text("run")
    (foreign / "thesis.tex").write_text("years of work")
    with pytest.raises(ConfigError, match=r"files a run does not write \(thesis.tex\)"):
        remove_run_folder(root, foreign)
    assert (foreign / "thesis.tex").is_file()

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = root / "link"
    link.symlink_to(outside, target_is_directory=True)
    for folder in (outside, root / ".." / "elsewhere", link, root):
        with pytest.raises(ConfigError, match="not a folder inside"):
            remove_run_folder(root, folder)
    assert outside.is_dir() and link.is_symlink()


def test_run_suite_refuses_to_clear_a_run_folder_holding_a_stranger(tmp_path: Path) -> None:
    suite = Suite.from_mapping({"seeds": 1, "base": {"model": "test_resnet", "epochs": 2, "data.train_limit": 100,
                                                     "runtime.progress": False}, "variants": {"a": {}}})
    folder = tmp_path / "a" / "seed-0"
    folder.mkdir(parents=True)
    (folder / "notes.md").write_text("mine")
    with pytest.raises(ConfigError, match="refusing to remove it"):
        run_suite(suite, tmp_path, log=lambda line: None)
    assert (folder / "notes.md").read_text() == "mine" and sorted(p.name for p in folder.iterdir()) == ["notes.md"]


# ---------------------------------------------------------------------------------------------
# Item 9: --out checked before work; a full disk mid-run is one line
# ---------------------------------------------------------------------------------------------


def commands_writing_under(base: Path) -> list[list[str]]:
    """Every command that writes, each told to write under ``base``."""
    return [
        ["train", *TINY, "--out", str(base / "run")],
        ["experiment", "smoke", "--out", str(base / "suite")],
        ["range-test", "temperature", *TINY, "--steps", "10", "--out", str(base / "range")],
        ["convert", "digits", str(base / "digits.beton")],
        ["ladder", "show", "flips", "--dataset", "digits", "--out", str(base / "grid.png")],
        ["plan", "epochs=3", "--plot", str(base / "plan.png")],
    ]


@pytest.mark.parametrize("index", range(6), ids=["train", "experiment", "range-test", "convert", "ladder", "plan"])
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path: Path, index: int,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = main(commands_writing_under(blocker)[index])  # the CLI's own entry point, in this process
    out, err = capsys.readouterr()
    assert_one_line_refusal(subprocess.CompletedProcess([], status, out, err), "a-file is a file")
    assert "epoch" not in out and "swept" not in out  # refused before the work, not after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "not a folder"


def test_check_output_writes_nothing_and_names_the_flag(tmp_path: Path) -> None:
    check_output("--out", tmp_path / "new" / "run")
    assert list(tmp_path.iterdir()) == []  # the probe is removed and no folder is created
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match=r"--plot: .*taken is a folder, not a file"):
        check_output("--plot", tmp_path / "taken", folder=False)


def test_read_only_and_nearly_full_disks_are_refused_before_work(tmp_path: Path) -> None:
    mount = tmp_path / "disk"
    report = tmp_path / "report"
    for size, read_only in (("16m", True), ("1m", False)):
        script = (f"{sys.executable} -m cycdata.train.cli train {' '.join(TINY)} --out {mount}/run "
                  f"> {report}.out 2> {report}.err; echo $? > {report}.rc; ls -A {mount} > {report}.ls")
        in_private_tmpfs(mount, size, script, read_only=read_only)
        lines = Path(f"{report}.err").read_text().strip().splitlines()
        assert Path(f"{report}.rc").read_text().strip() == "2" and len(lines) == 1, lines
        expected = "cannot write in" if read_only else "MiB free"
        assert expected in lines[0] and "--out" in lines[0], lines[0]
        assert Path(f"{report}.out").read_text() == "" and Path(f"{report}.ls").read_text() == ""


def test_disk_full_line_reads_real_out_of_space_errors() -> None:
    with pytest.raises(OSError) as plain:
        with open("/dev/full", "wb", buffering=0) as handle:  # the kernel's always-full device: a real ENOSPC
            handle.write(b"x" * 100_000)
    assert plain.value.errno == errno.ENOSPC
    assert disk_full_line(plain.value, "/runs/a") == "no space left on device for /runs/a: free space or choose " \
                                                      "another --out"
    with pytest.raises((OSError, RuntimeError)) as saved:
        with open("/dev/full", "wb", buffering=0) as handle:
            torch.save({"weights": torch.zeros(100_000)}, handle)
    assert disk_full_line(saved.value, "/runs/a") is not None
    with pytest.raises(RuntimeError) as chained:  # torch's zip writer re-raises the OSError as its own error
        try:
            with open("/dev/full", "wb", buffering=0) as handle:
                handle.write(b"x")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0") from None
    assert chained.value.__context__ is not None and disk_full_line(chained.value, None) is not None
    assert disk_full_line(OSError(errno.EACCES, "Permission denied"), "/runs/a") is None
    assert disk_full_line(RuntimeError("shape mismatch"), "/runs/a") is None


@pytest.mark.slow
def test_a_disk_that_fills_up_during_a_checkpoint_is_one_line_and_keeps_the_old_checkpoint(tmp_path: Path) -> None:
    """8 MiB hold epoch 1 (two 3 MB checkpoints, logs), not epoch 2's temporary last.pt: its write fails."""
    mount, copy = tmp_path / "disk", tmp_path / "copy"
    copy.mkdir()
    script = (f"CYCDATA_MIN_FREE_MIB=0 {sys.executable} -m cycdata.train.cli train {' '.join(TINY)} "
              f"--out {mount}/run > {copy}/out 2> {copy}/err; echo $? > {copy}/rc; cp -r {mount}/run {copy}/run")
    in_private_tmpfs(mount, "8m", script)
    lines = (copy / "err").read_text().strip().splitlines()
    assert (copy / "rc").read_text().strip() == "2" and len(lines) == 1, lines
    assert lines[0] == f"cycdata train: no space left on device for {mount}/run: free space or choose another --out"
    state = load_checkpoint(copy / "run" / "last.pt")
    assert state["epoch"] == 1  # the checkpoint of epoch 1 survived the failed write of epoch 2
    assert not [p for p in (copy / "run").iterdir() if p.name.endswith(".tmp")]
