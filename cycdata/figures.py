"""Writing matplotlib figures to PNG files, shared by every plot the library draws.

matplotlib is imported on first use, with the non-interactive Agg backend, so importing cycdata stays
cheap and plotting works on machines without a display.

Example:
    >>> import tempfile, pathlib
    >>> figure, axis = pyplot().subplots()
    >>> _ = axis.plot([0, 1], [1, 0])
    >>> save_figure(figure, pathlib.Path(tempfile.mkdtemp()) / "sub" / "line.png").stat().st_size > 0
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["pyplot", "save_figure"]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay ``figure`` out, write it to ``path`` (creating its folder) and close it."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
