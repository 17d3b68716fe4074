"""cycdata.train: the optimizer side of the cycle (hooks, losses), the trainer and the command line.

Example:
    >>> from cycdata.train import CyclicalHooks, cyclical_focal_loss
    >>> CyclicalHooks.__name__, callable(cyclical_focal_loss)
    ('CyclicalHooks', True)
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use, so `import cycdata.train` (the console script) stays cheap.
_EXPORTS = {
    "CyclicalHooks": "cycdata.train.hooks",
    "clip_gradients": "cycdata.train.hooks",
    "cyclical_focal_loss": "cycdata.train.losses",
    "CyclicalFocalLoss": "cycdata.train.losses",
    "soft_cross_entropy": "cycdata.train.losses",
    "train": "cycdata.train.trainer",
    "resume": "cycdata.train.trainer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cycdata.train' has no attribute {name!r}")
