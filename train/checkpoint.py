"""Atomic, versioned checkpoints: write to a temporary file in the same folder, then rename; and a
run's save and resume on top of them (``last.pt`` every epoch, ``best.pt`` when test accuracy improves).

A reader therefore sees either the old file or the new one, never half of one, even when the
run is killed while saving.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_checkpoint({"epoch": 3}, folder / "last.pt")
    >>> load_checkpoint(folder / "last.pt")["epoch"]
    3
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cycdata.config import RunConfig, config_to_dict, parse_config, read_yaml

if TYPE_CHECKING:
    from cycdata.loaders.torch_loader import CyclicalLoader
    from cycdata.train.builders import Runtime

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "RunState",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "restore_run",
    "resume",
    "save_checkpoint",
    "save_run",
]

CHECKPOINT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, foreign or of another version)."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (plus the format version) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save({"version": CHECKPOINT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; clear errors for unusable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated or not a cycdata checkpoint): {error}"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a cycdata checkpoint of version {CHECKPOINT_VERSION}")
    return state


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) for exact resume."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# A run's checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """Where a run stands between epochs, besides its weights, optimizer and loader."""

    epoch: int = 0  # the next epoch to run
    best_accuracy: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per finished epoch

    def record(self, row: dict[str, Any]) -> bool:
        """Count the finished epoch ``row`` in; returns whether its test accuracy is the best so far."""
        improved = row["test_accuracy"] > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, row["test_accuracy"])
        self.epoch = row["epoch"] + 1
        self.history.append(row)
        return improved


def restore_run(
    state: dict[str, Any] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: CyclicalLoader,
    rank: int,
) -> RunState:
    """Load a checkpoint ``state`` (None: a fresh run) into the model, optimizer, loader and this rank's RNG.

    Call it on the unwrapped model, before DistributedDataParallel broadcasts rank 0's weights.
    """
    if state is None:
        return RunState()
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
    if state.get("data_state"):
        loader.load_state_dict(state["data_state"])  # the ledger, sampler position and RNG
    return RunState(state["epoch"], state["best_accuracy"], state["history"])


def save_run(
    folder: Path,
    runtime: Runtime,
    run: RunState,
    *,
    improved: bool,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: RunConfig,
    data_state: dict[str, Any],
) -> None:
    """Atomic last.pt of ``run``; best.pt too when the epoch ``improved`` the test accuracy.

    Every rank calls it: the checkpoint holds the RNG states of all of them; rank 0 writes it.
    """
    rng = [capture_rng_state()]
    if runtime.distributed:
        gathered: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if runtime.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": run.epoch,
            "best_accuracy": run.best_accuracy,
            "history": run.history,
            "rng": rng,
            "config": config_to_dict(config),
            "data_state": data_state,
        }
        save_checkpoint(state, folder / "last.pt")
        if improved:
            save_checkpoint(state, folder / "best.pt")
    if runtime.distributed:
        dist.barrier()


def resume(run_dir: str | Path, stop_after: int | None = None) -> dict[str, Any]:
    """Continue a killed or stopped run from ``run_dir/last.pt`` with the run's saved config."""
    from cycdata.train.trainer import train  # the trainer builds on this module

    run_dir = Path(run_dir)
    state = load_checkpoint(run_dir / "last.pt")
    config = parse_config(read_yaml(run_dir / "config.yaml"))
    if state["epoch"] >= config.epochs:
        return state["history"][-1]
    return train(config, run_dir, resume_from=state, stop_after=stop_after)
