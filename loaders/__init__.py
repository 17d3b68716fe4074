"""cycdata.loaders: datasets and loaders that carry the data-side knobs.

Example:
    >>> from cycdata.loaders import CyclicalLoader, load_dataset
    >>> CyclicalLoader.__name__, callable(load_dataset)
    ('CyclicalLoader', True)
"""

from __future__ import annotations

import importlib
from typing import Any

# Resolved on first use, so `import cycdata.loaders` stays cheap for the command line.
_EXPORTS = {
    "CyclicalLoader": "cycdata.loaders.torch_loader",
    "BatchLoader": "cycdata.loaders.torch_loader",
    "AugmentedDataset": "cycdata.loaders.torch_loader",
    "load_dataset": "cycdata.loaders.datasets",
    "DatasetSplits": "cycdata.loaders.datasets",
    "DatasetError": "cycdata.loaders.datasets",
    "TensorImageDataset": "cycdata.loaders.datasets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cycdata.loaders' has no attribute {name!r}")
