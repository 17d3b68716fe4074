"""Atomic, versioned, checksummed checkpoints: write to a temporary file in the same folder, then rename;
and a run's save and resume on top of them (``last.pt`` every epoch, ``best.pt`` when test accuracy improves).

A reader therefore sees either the old file or the new one, never half of one, even when the run is killed
while saving. Checkpoints are untrusted input (a user may pass any file as ``--resume``/``--init``): they are
read with ``torch.load(weights_only=True)``, so they hold only tensors and plain Python data (the RNG states
included), and they carry a sha256 of their content, so damaged bytes are refused instead of trained on.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = save_checkpoint({"epoch": 3}, folder / "last.pt")
    >>> load_checkpoint(folder / "last.pt")["epoch"]
    3
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import random
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cycdata.config import ConfigError, RunConfig, apply_settings, config_to_dict, parse_config, read_yaml

if TYPE_CHECKING:
    from cycdata.loaders.torch_loader import CyclicalLoader
    from cycdata.train.builders import Runtime

__all__ = [
    "CHECKPOINT_VERSION",
    "SAFE_TO_EDIT_ON_RESUME",
    "CheckpointError",
    "RunState",
    "UnsafeFileError",
    "capture_rng_state",
    "load_checkpoint",
    "load_untrusted",
    "one_line",
    "remove_stale_temporaries",
    "restore_rng_state",
    "restore_run",
    "resume",
    "save_checkpoint",
    "save_run",
    "state_digest",
    "verify_checksum",
]

# Version 2: plain-data RNG states (weights_only loads them) and a content checksum. Version 1 files
# (numpy RNG arrays, no checksum) are still read, safely: numpy's array reconstruction is allowed for them.
CHECKPOINT_VERSION = 2
_READABLE_VERSIONS = (1, CHECKPOINT_VERSION)
_CHECKSUM_KEY = "checksum"

# What a version-1 checkpoint needs beyond weights_only's defaults: numpy arrays rebuild from a dtype and a
# byte string; no other code can be reached through them (their items pass the same restricted unpickler).
_RECONSTRUCT = np.arange(1).__reduce__()[0]
_NUMPY_ARRAY_GLOBALS: list[Any] = [
    np.ndarray, np.dtype, _RECONSTRUCT,
    (_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),  # its name in files numpy 1.x wrote
    *(type(np.dtype(kind)) for kind in "?bBhHiIlLqQefd"),  # the numeric dtypes' classes
]

# The temporary names save_checkpoint gives run checkpoints (tempfile.mkstemp: 8 random name characters).
_TEMPORARY_NAME = re.compile(r"\.(last|best)\.pt\.[A-Za-z0-9_]{8}\.tmp")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, truncated, damaged, foreign or of another version)."""


class UnsafeFileError(CheckpointError):
    """A torch file that holds Python objects besides tensors and plain data: refused, never unpickled."""


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def state_digest(state: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes, and every plain value.

    Computed over the loaded objects (not the file), so it does not depend on how torch lays out the zip.

    Example:
        >>> zeros, ones = state_digest({"w": torch.zeros(2)}), state_digest({"w": torch.ones(2)})
        >>> zeros == state_digest({"w": torch.zeros(2)}), zeros == ones
        (True, False)
    """
    digest = hashlib.sha256()
    _feed_digest(digest, state)
    return digest.hexdigest()


def _feed_digest(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {tensor.dtype} {tuple(value.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)  # the raw bytes, whatever the dtype
    elif isinstance(value, np.ndarray):
        digest.update(f"array {value.dtype} {value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed_digest(digest, key)
            _feed_digest(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed_digest(digest, item)
    else:  # numbers, strings, None: repr is exact for floats
        digest.update(f"{type(value).__name__} {value!r};".encode())


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` (plus the format version and a checksum) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": CHECKPOINT_VERSION, **state}
    body[_CHECKSUM_KEY] = state_digest(body)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            torch.save(body, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def load_untrusted(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` a file a user gave without running code: tensors and plain data only.

    Raises :class:`CheckpointError` (one line) for a file that holds other Python objects, naming them,
    and for a truncated or foreign file.
    """
    try:
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names a refused object as "GLOBAL module.name" (a function) or "got <class 'module.name'>" (a
        # type); any other unpickling error is a damaged or foreign file.
        found = re.findall(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(error))
        names = sorted({function or kind for function, kind in found})
        if not names:
            raise CheckpointError(f"cannot read {path} (truncated or not a torch file)") from None
        raise UnsafeFileError(
            f"{path} holds Python objects besides tensors ({', '.join(names)}); cycdata never runs code from a "
            "file it is given: use a cycdata checkpoint, a plain state dict of tensors or a .safetensors file"
        ) from None
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read {path} (truncated or not a torch file): {one_line(error)}") from None


def verify_checksum(state: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a version-2 checkpoint whose content does not match the checksum it was saved with."""
    if state.get("version") == 1:
        return  # written before checksums; its tensors are checked for finiteness by the run check
    saved = state.get(_CHECKSUM_KEY)
    content = {key: value for key, value in state.items() if key != _CHECKSUM_KEY}
    if not isinstance(saved, str) or state_digest(content) != saved:
        raise CheckpointError(
            f"{path} is damaged (its content does not match the checksum saved with it); resume from an intact "
            "copy, or start the run again"
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; clear errors for unusable files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = load_untrusted(path, map_location)
    except UnsafeFileError:
        raise
    except CheckpointError:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or not a cycdata checkpoint)") from None
    if not isinstance(state, dict) or state.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(f"{path} is not a cycdata checkpoint of version {CHECKPOINT_VERSION}")
    verify_checksum(state, path)
    return state


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes a kill interrupted (cycdata's own names, this folder only)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [entry for entry in folder.iterdir()
             if _TEMPORARY_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink()]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


def one_line(error: BaseException) -> str:
    """An exception's message on one line (torch's are often several), shortened."""
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (Python, NumPy, torch CPU and CUDA) for exact resume, as plain data and tensors."""
    _, key, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # numpy's MT19937 state as a tensor and numbers: weights_only loads it without numpy's unpickling.
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs to a :func:`capture_rng_state` (or a version-1 checkpoint's numpy tuple)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, Mapping):
        key = numpy_state["key"].numpy().astype(np.uint32)
        numpy_state = ("MT19937", key, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["gauss"])
    np.random.set_state(numpy_state)
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
    optimizer_steps: int = 0  # optimizer steps taken so far (the model EMA's warmup counts them)

    def record(self, row: dict[str, Any], optimizer_steps: int = 0) -> bool:
        """Count the finished epoch ``row`` in; returns whether its accuracy is the best so far."""
        accuracy = best_metric(row)
        improved = accuracy > self.best_accuracy
        self.best_accuracy = max(self.best_accuracy, accuracy)
        self.epoch = row["epoch"] + 1
        self.optimizer_steps = optimizer_steps
        self.history.append(row)
        return improved


def best_metric(row: Mapping[str, Any]) -> float:
    """What best.pt is chosen by: the validation accuracy when the run holds out a validation split
    (``data.val_split``), else the test accuracy (timm's train.py: its eval set); the model EMA's when the run
    keeps one, as timm does.

    Example:
        >>> best_metric({"val_accuracy": 0.9, "test_accuracy": 0.95}), best_metric({"test_accuracy": 0.95})
        (0.9, 0.95)
    """
    split = "val" if "val_accuracy" in row else "test"
    return float(row.get(f"ema_{split}_accuracy", row[f"{split}_accuracy"]))


# The keys a run checkpoint holds, with the types the resume code relies on.
_RUN_KEYS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "epoch": int, "best_accuracy": (int, float), "history": list,
    "rng": list, "config": dict,
}

# config.yaml keys an edit may change on --resume: they only decide what is printed (the progress bar and
# how often its loss refreshes), never a number the run computes. Any other edit is refused.
SAFE_TO_EDIT_ON_RESUME = ("runtime.progress", "runtime.log_every", "runtime.log_steps")


def check_run_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Refuse a checkpoint that lacks what a resume needs or whose weights are not finite (one line)."""
    for name, kind in _RUN_KEYS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise CheckpointError(f"{path} is not a cycdata run checkpoint: {name!r} is missing or not a "
                                  f"{getattr(kind, '__name__', 'number')}; resume from a last.pt cycdata train wrote")
    epoch, history = state["epoch"], state["history"]
    rows_ok = all(isinstance(row, dict) and isinstance(row.get("val_accuracy", row.get("test_accuracy")), (int, float))
                  for row in history)
    if epoch < 1 or len(history) != epoch or not rows_ok:
        raise CheckpointError(f"{path} is inconsistent: epoch {epoch} with {len(history)} metrics rows; resume from "
                              "a last.pt written by cycdata train")
    broken = [name for name, tensor in state["model"].items()
              if not isinstance(tensor, torch.Tensor) or (tensor.is_floating_point() and not tensor.isfinite().all())]
    if broken:
        raise CheckpointError(f"{path} holds non-finite or non-tensor weights ({', '.join(broken[:3])}); resume from "
                              "an intact copy, or start the run again")


def restore_run(
    state: dict[str, Any] | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: CyclicalLoader,
    rank: int,
    ema: nn.Module | None = None,
) -> RunState:
    """Load a checkpoint ``state`` (None: a fresh run) into the model, optimizer, loader and this rank's RNG.

    Call it on the unwrapped model, before DistributedDataParallel broadcasts rank 0's weights.
    """
    if state is None:
        return RunState()
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        if state.get("data_state"):
            loader.load_state_dict(state["data_state"])  # the ledger, sampler position and RNG
        if ema is not None:
            if "model_ema" not in state:
                raise KeyError("model_ema: the checkpoint has no EMA weights")
            ema.load_state_dict(state["model_ema"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
        raise CheckpointError(f"the checkpoint does not fit this run ({one_line(error)}); resume it with the "
                              "config it was saved with") from None
    return RunState(state["epoch"], state["best_accuracy"], state["history"], int(state.get("optimizer_steps", 0)))


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
    ema: nn.Module | None = None,
) -> None:
    """Atomic best.pt of ``run`` when the epoch ``improved`` the test accuracy, then atomic last.pt.

    best.pt goes first: a kill between the two leaves last.pt at the epoch before, whose re-run improves
    again and rewrites best.pt, so best.pt is never left behind the best accuracy last.pt records.
    Every rank calls it: the checkpoint holds the RNG states of all of them; rank 0 writes it.
    """
    rng = [capture_rng_state()]
    if runtime.distributed:
        gathered: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(gathered, rng[0])
        rng = gathered
    if runtime.is_main:
        remove_stale_temporaries(folder)
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": run.epoch,
            "best_accuracy": run.best_accuracy,
            "history": run.history,
            "rng": rng,
            "config": config_to_dict(config),
            "data_state": data_state,
            "optimizer_steps": run.optimizer_steps,
        }
        if ema is not None:
            state["model_ema"] = ema.state_dict()
        if improved:
            save_checkpoint(state, folder / "best.pt")
        save_checkpoint(state, folder / "last.pt")
    if runtime.distributed:
        dist.barrier()


def resume(run_dir: str | Path, stop_after: int | None = None) -> dict[str, Any]:
    """Continue a killed or stopped run from ``run_dir/last.pt`` under the config stored in it.

    ``config.yaml`` is only a copy: missing, it is rewritten; edited, the resume is refused with the keys
    that changed (except :data:`SAFE_TO_EDIT_ON_RESUME`, which are applied).
    """
    from cycdata.train.trainer import train  # the trainer builds on this module

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume {run_dir}: no such run folder; give the folder a cycdata train run wrote")
    state = load_checkpoint(run_dir / "last.pt")
    check_run_checkpoint(state, run_dir / "last.pt")
    config = _config_for_resume(state["config"], run_dir / "config.yaml")
    remove_stale_temporaries(run_dir)
    state["best_accuracy"] = _best_accuracy_on_disk(run_dir / "best.pt", state["history"])
    if state["epoch"] >= config.epochs:
        return state["history"][-1]
    return train(config, run_dir, resume_from=state, stop_after=stop_after)


def _config_for_resume(stored: dict[str, Any], config_file: Path) -> RunConfig:
    """The checkpoint's config, with the safe edits of ``config_file`` applied; other edits refused."""
    try:
        config = parse_config(stored)
    except ConfigError as error:
        raise CheckpointError(f"the config stored in {config_file.parent / 'last.pt'} is invalid ({error})") from None
    if not config_file.exists():
        return config  # the trainer writes it again from the checkpoint's config
    try:
        raw = read_yaml(config_file)
        if not isinstance(raw, Mapping):  # empty, or a bare value: not the file the trainer wrote
            raise ConfigError("config", f"holds {type(raw).__name__}, not a mapping of keys")
        edited = parse_config(raw)
    except (ConfigError, ValueError) as error:  # ValueError: a binary file is no UTF-8 text
        raise ConfigError("config", f"{config_file} cannot be read as a config ({one_line(error)}); the run's "
                          "config is in last.pt: delete config.yaml to resume with it") from None
    before, after = _dotted(config_to_dict(config)), _dotted(config_to_dict(edited))
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    refused = [key for key in changed if key not in SAFE_TO_EDIT_ON_RESUME]
    if refused:
        listed = ", ".join(f"{key} ({before.get(key)!r} -> {after.get(key)!r})" for key in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError("config", f"{config_file} was edited after the run started: {listed}{more}; a resumed run "
                          "keeps the config stored in last.pt (only runtime.progress, log_every and log_steps may "
                          "change): undo the edit, or start a new run with --out")
    if not changed:
        return config
    return parse_config(apply_settings(stored, {key: after[key] for key in changed}))


def _dotted(raw: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{"optim.lr": 0.1, ...}``."""
    flat: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, Mapping):
            flat.update(_dotted(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _best_accuracy_on_disk(best_file: Path, history: list[dict[str, Any]]) -> float:
    """The test accuracy of the epoch that ``best_file`` really holds, if that epoch is in ``history``.

    This is the bar a later epoch must beat to replace best.pt. A best.pt that is missing, damaged, or from
    an epoch this history does not hold (a killed process wrote it before its last.pt) holds nothing to
    keep: -inf, so the next epoch writes it again.
    """
    try:
        best = load_checkpoint(best_file)
        check_run_checkpoint(best, best_file)
    except CheckpointError:
        return -math.inf
    held = best["epoch"] - 1  # a checkpoint's epoch is the next one to run
    if held < len(history) and _same_row(history[held], best["history"][held]):
        return best_metric(history[held])
    return -math.inf


def _same_row(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two metrics rows are the same epoch of the same process (its timings included); NaN equals NaN."""
    return a.keys() == b.keys() and all(a[key] == b[key] or (a[key] != a[key] and b[key] != b[key]) for key in a)
