"""cycdata.augment_ladder: augmentation ops with a magnitude in [0, 1], rungs and ladders, measured strength.

Example:
    >>> from cycdata.augment_ladder import OPS, load_ladder
    >>> "rotate" in OPS, len(load_ladder("digits").rungs)
    (True, 5)
"""

from __future__ import annotations

from cycdata._lazy import lazy_exports

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

__getattr__ = lazy_exports("cycdata.augment_ladder", _EXPORTS)
