"""Acceptance of issue 15's kill loop: ``kill -9`` a ``cycdata train`` process at ten points or more (during start-up,
mid-epoch, after an epoch's metrics but before its checkpoint, and during checkpoint writes, one of them the
best.pt write of the run's best epoch), ``--resume`` after each, and the run still ends with the uninterrupted
run's exact weights, metrics and best model, and no temporary files left behind."""

from __future__ import annotations

import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cycdata.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6
ARGS = [f"epochs={EPOCHS}", "model=test_resnet", "runtime.progress=false", "data.num_workers=0",
        "data.dataset=synthetic:128", "data.batch_size=32"]
# One thread per process: the same arithmetic in every process, and less contention on a small machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
KILLS = 10
PROCESS_TIMEOUT = 240.0


def start(run: Path) -> subprocess.Popen[bytes]:
    """``cycdata train --resume RUN`` when a checkpoint exists, else a fresh run into RUN."""
    if (run / "last.pt").exists():
        command = ["train", "--resume", str(run)]
    else:
        shutil.rmtree(run, ignore_errors=True)  # killed before its first checkpoint: nothing to keep
        command = ["train", *ARGS, "--out", str(run)]
    return subprocess.Popen([sys.executable, "-m", "cycdata.train.cli", *command], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@dataclass
class Trigger:
    """When to kill: ``kind`` once ``replacements`` epochs were checkpointed by this process."""

    kind: str  # startup | mid-epoch | epoch-end | write | best-write
    replacements: int = 0
    delay: float = 0.0


def _stamp(path: Path) -> tuple[int, int] | None:
    """Inode and mtime: os.replace gives a new inode, write_text a new mtime."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_mtime_ns


class FolderWatch:
    """Counts, for one process, how often last.pt, metrics.csv and config.yaml changed; sees temporaries."""

    def __init__(self, run: Path) -> None:
        self.run = run
        self.stamps = {name: _stamp(run / name) for name in ("last.pt", "metrics.csv", "config.yaml")}
        self.changes = dict.fromkeys(self.stamps, 0)

    def poll(self) -> None:
        for name, before in self.stamps.items():
            now = _stamp(self.run / name)
            if now != before:
                self.stamps[name], self.changes[name] = now, self.changes[name] + 1

    def writing(self, *names: str) -> bool:
        """Whether a checkpoint temporary of one of ``names`` exists now (a write in progress)."""
        try:
            present = os.listdir(self.run)
        except FileNotFoundError:
            return False
        return any(entry.startswith(f".{name}.") and entry.endswith(".tmp") for entry in present for name in names)


def kill_at(process: subprocess.Popen[bytes], run: Path, trigger: Trigger) -> str:
    """Poll the run folder about every millisecond; SIGKILL the process when ``trigger`` fires.

    Returns what happened: the trigger's kind, or "finished" when the process ended first.
    """
    started, watch, armed_at = time.monotonic(), FolderWatch(run), None
    while process.poll() is None:
        now = time.monotonic()
        assert now - started < PROCESS_TIMEOUT, "a training process hung"
        watch.poll()
        ready = watch.changes["last.pt"] >= trigger.replacements
        if trigger.kind == "startup":
            fire = now - started >= trigger.delay
        elif trigger.kind == "mid-epoch":
            # This process trains once it rewrote config.yaml; the kill comes a random moment after that.
            if armed_at is None and ready and watch.changes["config.yaml"]:
                armed_at = now
            fire = armed_at is not None and now - armed_at >= trigger.delay
        elif trigger.kind == "epoch-end":  # the epoch's metrics are written, its checkpoint is not yet
            fire = watch.changes["metrics.csv"] > trigger.replacements
        elif trigger.kind == "write":
            fire = ready and watch.writing("last.pt", "best.pt")
        else:
            fire = trigger.kind == "best-write" and watch.writing("best.pt")
        if fire:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return trigger.kind
        time.sleep(0.001)
    assert process.returncode == 0, process.stderr.read().decode() if process.stderr else ""
    return "finished"


def checkpointed_epochs(run: Path) -> int:
    return load_checkpoint(run / "last.pt")["epoch"] if (run / "last.pt").exists() else 0


def read_metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def best_epoch_of(rows: list[dict[str, str]]) -> int:
    """The epoch best.pt ends at: the last one whose test accuracy beat every earlier one."""
    best, holder = -1.0, 0
    for row in rows:
        if float(row["test_accuracy"]) > best:
            best, holder = float(row["test_accuracy"]), int(row["epoch"])
    return holder


def next_trigger(kill: int, done: int, best_epoch: int, best_killed: bool, rng: random.Random) -> Trigger:
    """Kill points in turn; before the best epoch each kill lets one more epoch through, so the chain gets there."""
    if not best_killed and done == best_epoch:
        return Trigger("best-write")
    kind = ("startup", "mid-epoch", "write", "epoch-end")[kill % 4]
    room = done + 2 <= EPOCHS and (best_killed or done + 1 <= best_epoch)  # a later trigger still comes
    progress = room and (not best_killed or kill % 2 == 1)
    return Trigger(kind, replacements=int(progress), delay=rng.uniform(0.0, 4.0 if kind == "startup" else 0.3))


@pytest.mark.slow
def test_kill_9_loop_resumes_to_the_uninterrupted_run(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert kill_at(start(reference), reference, Trigger("never")) == "finished"
    best_epoch = best_epoch_of(read_metrics(reference))

    run, rng, happened = tmp_path / "run", random.Random(15), []
    while len(happened) < KILLS or "best-write" not in happened:
        done = checkpointed_epochs(run)
        assert done < EPOCHS, f"the run finished after only these kills: {happened}"
        trigger = next_trigger(len(happened), done, best_epoch, "best-write" in happened, rng)
        happened.append(kill_at(start(run), run, trigger))
    finish = start(run)
    assert kill_at(finish, run, Trigger("never")) == "finished"

    assert happened.count("finished") == 0, happened
    assert {"startup", "mid-epoch", "epoch-end", "write", "best-write"} <= set(happened), happened
    a, b = load_checkpoint(reference / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == EPOCHS
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [r["test_accuracy"] for r in read_metrics(reference)] == [r["test_accuracy"] for r in read_metrics(run)]
    best_a, best_b = load_checkpoint(reference / "best.pt"), load_checkpoint(run / "best.pt")
    assert best_a["epoch"] == best_b["epoch"] == best_epoch + 1
    for name, tensor in best_a["model"].items():
        assert torch.equal(tensor, best_b["model"][name]), name
    assert not FolderWatch(run).writing("last.pt", "best.pt")  # no orphaned checkpoint temporaries
