"""The one clock: the only place that turns (epoch, position in the epoch) into progress ``t``.

Knob schedules see only ``t``. Two conventions matter:

* **cycle progress** ``t`` for the cyclical knobs. With the reference normalization
  ``t = epoch/(epochs − 1)``, so the last epoch lands exactly on the easy end (SPEC.md §1.1); with
  the paper's, ``t = epoch/epochs``.
* **run fraction** ``(epoch + fraction)/epochs`` in [0, 1) for the learning-rate schedule, so
  the last step does not train at the final LR for a whole epoch.

Per-epoch (the reference) holds ``t`` for a whole epoch; per-step advances it inside the epoch
by the fraction of the epoch's *samples* already seen, which stays right when the batch size,
and so the number of steps, changes from epoch to epoch.

A run may cover only a **window** ``[start, end]`` of the cycle (pre-training on the easy→hard
half, fine-tuning on the hard→easy half): the run's own progress is mapped linearly onto the
window. With the reference normalization both ends are included (the last pre-training epoch and the
first fine-tuning epoch both sit at the window boundary); with the paper's the end is excluded.

Example:
    >>> clock = Clock(epochs=10)
    >>> clock.progress(3), clock.progress(3, fraction=0.5)
    (0.3333333333333333, 0.3333333333333333)
    >>> Clock(epochs=10, unit="step").progress(3, fraction=0.5)
    0.3888888888888889
    >>> [Clock(epochs=3, start=0.5, end=1.0).progress(e) for e in range(3)]
    [0.5, 0.75, 1.0]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["Clock"]


@dataclass(frozen=True)
class Clock:
    """Maps training position to progress.

    Args:
        epochs: epochs the cycle spans (>= 2).
        unit: ``"epoch"`` (knobs change at epoch boundaries, the reference) or ``"step"``.
        normalization: ``"reference"`` (t = e/(E−1)) or ``"paper"`` (t = e/E).
        start, end: the window of the cycle this run covers, ``0 <= start < end <= 1``.
    """

    epochs: int
    unit: Literal["epoch", "step"] = "epoch"
    normalization: Literal["reference", "paper"] = "reference"
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 2:
            raise ValueError(f"epochs must be an integer >= 2, got {self.epochs!r}")
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {self.unit!r}")
        if self.normalization not in ("reference", "paper"):
            raise ValueError(f"normalization must be 'reference' or 'paper', got {self.normalization!r}")
        if not (math.isfinite(self.start) and math.isfinite(self.end) and 0.0 <= self.start < self.end <= 1.0):
            raise ValueError(f"the cycle window needs 0 <= start < end <= 1, got start={self.start}, end={self.end}")

    def _position(self, epoch: int, fraction: float) -> float:
        if epoch < 0 or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"need epoch >= 0 and 0 <= fraction <= 1, got epoch={epoch}, fraction={fraction}")
        return epoch + (fraction if self.unit == "step" else 0.0)

    def progress(self, epoch: int, fraction: float = 0.0) -> float:
        """Cycle progress ``t`` at ``epoch`` after ``fraction`` of its samples."""
        span = self.epochs - 1 if self.normalization == "reference" else self.epochs
        return self.start + (self.end - self.start) * (self._position(epoch, fraction) / span)

    @property
    def windowed(self) -> bool:
        """Whether the run covers only part of the cycle."""
        return (self.start, self.end) != (0.0, 1.0)

    def run_fraction(self, epoch: int, fraction: float = 0.0) -> float:
        """Fraction of the run done, ``(epoch + fraction)/epochs``, always per step (for the LR).

        Example:
            >>> Clock(epochs=4).run_fraction(1, 0.5)
            0.375
        """
        if epoch < 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"need epoch >= 0 and 0 <= fraction <= 1, got epoch={epoch}, fraction={fraction}")
        return (epoch + fraction) / self.epochs
