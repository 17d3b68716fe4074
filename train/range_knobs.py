"""What the range test can sweep, as data: each knob's default range, scale and rule for its ends.

Kept apart from :mod:`cycdata.train.range_test` (which needs torch) so that the command line can list
the knobs without importing torch.

Example:
    >>> KNOB_SPECS["optim.lr"].scale, STEP_RULES[0]
    ('log', 'classic')
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["KNOB_SPECS", "STEP_RULES", "KnobSpec"]


@dataclass(frozen=True)
class KnobSpec:
    """How one knob is swept: default range, scale and the rule family for its ends."""

    low: float
    high: float
    scale: str  # "log" or "linear"
    rule: str  # "step" (loss falls then diverges), "regularizer", or "batch"
    integer: bool = False


KNOB_SPECS: dict[str, KnobSpec] = {
    "optim.lr": KnobSpec(1e-4, 1.0, "log", "step"),
    "optim.momentum": KnobSpec(0.5, 0.99, "linear", "step"),
    "grad_clip": KnobSpec(0.05, 20.0, "log", "step"),
    "optim.weight_decay": KnobSpec(1e-6, 1e-1, "log", "regularizer"),
    "temperature": KnobSpec(0.25, 4.0, "log", "regularizer"),
    "augment.strength": KnobSpec(0.0, 1.0, "linear", "regularizer"),
    "data.batch_size": KnobSpec(16, 512, "log", "batch", integer=True),
}

STEP_RULES = ("classic", "steepest")  # how a step-size knob's easy end is read off the curve
