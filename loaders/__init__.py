"""cycdata.loaders: datasets and loaders that carry the data-side knobs.

Example:
    >>> from cycdata.loaders import CyclicalLoader, load_dataset
    >>> CyclicalLoader.__name__, callable(load_dataset)
    ('CyclicalLoader', True)
"""

from __future__ import annotations

from cycdata._lazy import lazy_exports

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

__getattr__ = lazy_exports("cycdata.loaders", _EXPORTS)
