"""cycdata.train: the optimizer side of the cycle (hooks, losses), the trainer and the command line.

Example:
    >>> from cycdata.train import CyclicalHooks, cyclical_focal_loss
    >>> CyclicalHooks.__name__, callable(cyclical_focal_loss)
    ('CyclicalHooks', True)
"""

from __future__ import annotations

from cycdata._lazy import lazy_exports

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

__getattr__ = lazy_exports("cycdata.train", _EXPORTS)
