"""Output paths: names that become folders, what may be removed, and writability checked before work.

Three rules (DESIGN.md rule 15, issue 15 items 2 and 9):

* A name that becomes a path (a suite's variant or dataset folder) is one plain path component:
  ``SAFE_NAME``, so ``../victim``, ``/abs`` or ``a/b`` never leave the output folder.
* Nothing outside the output folder is removed, and inside it only a run folder that holds nothing but
  what a run writes (``remove_run_folder``).
* An output folder (or a file's folder) is checked writable, with at least ``min_free_bytes()`` free,
  before any work starts (``check_output``); a disk that fills up later is reported in one line
  (``disk_full_line``) instead of a traceback.

Example:
    >>> check_name("variant", "cwd-1e-3")
    'cwd-1e-3'
    >>> check_name("variant", "../victim")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cycdata.config.ConfigError: variant: '../victim' becomes a folder name: use letters, digits and ...
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path

from cycdata.config import ConfigError

__all__ = ["MIN_FREE_ENV", "SAFE_NAME", "check_name", "check_output", "dataset_folder", "disk_full_line",
           "min_free_bytes", "remove_run_folder"]

# One path component: no separator, no leading dot (so neither "." nor ".." nor hidden names), bounded length.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=-]{0,99}")
MIN_FREE_ENV = "CYCDATA_MIN_FREE_MIB"
# Two checkpoints of the default recipe (resnet10t: weights and SGD momentum, ~20 MB each) plus logs and one
# temporary checkpoint during the atomic write: 64 MiB is "roughly sufficient" for a run, and cheap to have.
DEFAULT_MIN_FREE_MIB = 64
MIB = 2**20

# What a run folder holds (train/trainer.py, train/metrics.py, train/checkpoint.py): the only names
# ``remove_run_folder`` accepts as proof that a folder is a run's own.
RUN_FILES = frozenset({"config.yaml", "metrics.csv", "metrics.png", "knobs.png", "last.pt", "best.pt", "tensorboard"})
RUN_TEMPORARY = re.compile(r"\.[A-Za-z0-9._-]+\.tmp|(last|best)\.pt\.[A-Za-z0-9]+")  # atomic writes, sidecars


def check_name(key: str, name: object) -> str:
    """``name`` if it is one safe path component, else a one-line :class:`ConfigError` naming ``key``."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ConfigError(key, f"{name!r} becomes a folder name: use letters, digits and . _ : + = - "
                          "(starting with a letter or digit), no / or ..")
    return name


def dataset_folder(spec: str) -> str:
    """The folder name of a dataset spec: the spec itself when safe (``mnist5k``, ``synthetic:500``), else its
    characters outside ``SAFE_NAME`` replaced by ``_`` (``cifar10:/data/c10`` -> ``cifar10:_data_c10``).

    Example:
        >>> dataset_folder("folder:../../images")
        'folder:.._.._images'
    """
    folder = re.sub(r"[^A-Za-z0-9._:+=-]", "_", spec)
    return check_name("datasets", folder if folder[:1].isalnum() else f"d{folder}")


def min_free_bytes() -> int:
    """The free space an output needs before work starts: ``$CYCDATA_MIN_FREE_MIB`` MiB (default 64)."""
    raw = os.environ.get(MIN_FREE_ENV)
    if raw is None:
        return DEFAULT_MIN_FREE_MIB * MIB
    try:
        mib = float(raw)
    except ValueError:
        mib = -1.0
    if not mib >= 0:  # also refuses nan
        raise ConfigError(MIN_FREE_ENV, f"got {raw!r}; give a number of MiB >= 0 (default {DEFAULT_MIN_FREE_MIB})")
    return int(mib * MIB)


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder that ``mkdir(parents=True)`` would write in)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(flag: str, path: str | Path, *, folder: bool = True) -> None:
    """Refuse, before any work, an output that cannot be written or has too little free space.

    ``path`` is an output folder (``folder=True``) or a file whose folder is checked. Nothing is left
    behind: the write probe is a temporary file removed at once, and missing folders are not created.
    """
    path = Path(path)
    target = path if folder else path.parent
    if path.exists() and path.is_dir() != folder:
        kind = "a file, not a folder" if folder else "a folder, not a file"
        raise ConfigError(flag, f"{path} is {kind}; choose another {flag}")
    base = _nearest_existing(target)
    if not base.is_dir():
        raise ConfigError(flag, f"{base} is a file, so {target} cannot be made a folder; choose another {flag}")
    try:
        # A real write, not os.access: root passes access() on a read-only mount or a full quota.
        descriptor, probe = tempfile.mkstemp(prefix=".cycdata-write-check-", dir=base)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(flag, f"cannot write in {base} ({error.strerror}); choose another {flag}") from None
    free, needed = shutil.disk_usage(base).free, min_free_bytes()
    if free < needed:
        raise ConfigError(flag, f"only {free / MIB:.1f} MiB free on {base}, at least {needed / MIB:.0f} MiB needed "
                          f"({MIN_FREE_ENV}); free space or choose another {flag}")


def _is_run_file(entry: Path) -> bool:
    if entry.is_symlink():
        return False
    if entry.name == "tensorboard":
        return entry.is_dir()
    return entry.is_file() and (entry.name in RUN_FILES or RUN_TEMPORARY.fullmatch(entry.name) is not None)


def remove_run_folder(root: str | Path, folder: str | Path) -> None:
    """Remove ``folder``, a run killed before its first checkpoint, only if it is provably a run's own.

    Proof: it is a real folder (not a link) strictly inside ``root``, holding nothing but run files
    (``RUN_FILES``, the checkpoints' temporary files). Anything else is refused with one line.
    """
    root_path, folder_path = Path(root).resolve(), Path(folder)
    resolved = folder_path.resolve()
    if folder_path.is_symlink() or root_path not in resolved.parents:
        raise ConfigError("--out", f"{folder_path} is not a folder inside {root_path}; refusing to remove it")
    strangers = sorted(entry.name for entry in resolved.iterdir() if not _is_run_file(entry))
    if strangers:
        raise ConfigError("--out", f"{resolved} holds files a run does not write ({', '.join(strangers[:5])}); "
                          "refusing to remove it: move them away or choose another --out")
    shutil.rmtree(resolved)


def _space_error(error: BaseException) -> BaseException | None:
    """The out-of-space error in ``error``'s chain: an OSError ENOSPC/EDQUOT, or torch's wrapped message."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        # torch.save reports a failed write as RuntimeError("[enforce fail at inline_container.cc] ... ").
        if isinstance(current, RuntimeError) and "No space left on device" in str(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def disk_full_line(error: BaseException, out: str | Path | None) -> str | None:
    """One line for an error caused by a full disk (``None`` for any other error).

    Example:
        >>> disk_full_line(OSError(errno.ENOSPC, "No space left on device", "/runs/a/last.pt"), "/runs/a")
        'no space left on device for /runs/a/last.pt: free space or choose another --out'
    """
    found = _space_error(error)
    if found is None:
        return None
    filename = getattr(found, "filename", None)
    where = filename if filename else (out if out is not None else "the output folder")
    return f"no space left on device for {where}: free space or choose another --out"
