"""cycdata.augment_ladder: augmentation ops with a magnitude in [0, 1], rungs and ladders, measured strength.

Example:
    >>> from cycdata.augment_ladder import OPS, load_ladder
    >>> "rotate" in OPS, len(load_ladder("digits").rungs)
    (True, 5)
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use, so importing the package stays cheap.
_EXPORTS = {
    "OPS": "cycdata.augment_ladder.ops",
    "Op": "cycdata.augment_ladder.ops",
    "mix_batch": "cycdata.augment_ladder.ops",
    "Ladder": "cycdata.augment_ladder.ladder",
    "LadderError": "cycdata.augment_ladder.ladder",
    "load_ladder": "cycdata.augment_ladder.ladder",
    "parse_ladder": "cycdata.augment_ladder.ladder",
    "LadderTransform": "cycdata.augment_ladder.backends",
    "measure_ladder": "cycdata.augment_ladder.measure",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cycdata.augment_ladder' has no attribute {name!r}")
