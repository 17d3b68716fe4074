"""Schedules: pure, picklable maps from training progress ``t`` to a knob value.

Every schedule is a frozen dataclass with ``__call__(t) -> float``. It has no counter and no
``step()``: a resumed run recomputes the value from the restored progress, so a schedule can be
evaluated any number of times in any order.

The cyclical coefficient ξ (SPEC.md §1) is the heart of it::

    r = factor · t
    ξ(t) = 1 − r                       if r <= 1      (easy -> hard)
    ξ(t) = (r − 1) / (factor − 1)      otherwise      (hard -> easy)

clamped to [0, 1]. ``t = epoch / (epochs − 1)`` reproduces the reference code (the clock in
:mod:`cycdata.clock` does this conversion); :func:`xi` offers the per-epoch form directly.

Example:
    >>> from cycdata.schedules import Cyclical
    >>> wd = Cyclical(easy=1e-5, hard=8e-5, factor=2)
    >>> round(wd(0.0), 12), round(wd(0.5), 12), round(wd(1.0), 12)
    (1e-05, 8e-05, 1e-05)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = [
    "SCHEDULES",
    "SHAPES",
    "Clamp",
    "Constant",
    "Cosine",
    "Cyclical",
    "Join",
    "Linear",
    "Piecewise",
    "Quantize",
    "Schedule",
    "Warmup",
    "as_schedule",
    "cosine_xi",
    "linear_xi",
    "make_schedule",
    "register_schedule",
    "register_shape",
    "triangle_xi",
    "xi",
]

Normalization = Literal["reference", "paper"]


@runtime_checkable
class Schedule(Protocol):
    """Anything that maps progress ``t`` (0 at the start, 1 at the end) to a float."""

    def __call__(self, t: float) -> float: ...


# --------------------------------------------------------------------------------------------
# The cyclical coefficient
# --------------------------------------------------------------------------------------------


def _require_finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_factor(factor: float) -> None:
    _require_finite("factor", factor)
    if factor < 1:
        raise ValueError(
            f"cyclical factor must be >= 1 (1 = one easy->hard ramp, 2 = easy->hard->easy), got {factor!r}"
        )


def _clamp01(value: float) -> float:
    return min(1.0, max(0.0, value))


def xi(epoch: float, epochs: int, factor: float = 2.0, *, normalization: Normalization = "reference") -> float:
    """The cyclical coefficient ξ of the reference code (SPEC.md §1.1), clamped to [0, 1].

    ``ξ = 1 − f·e/(E−1)`` while ``f·e < E``; then ``(f·e/(E−1) − 1)/(f − 1)`` (or 0 when f = 1).
    ξ = 1 is the easy end, ξ = 0 the hard peak.

    Two reference bugs are fixed: ξ is clamped to [0, 1] (the reference goes negative for a
    non-integer factor in the epoch after the peak, and above 1 past the last epoch), and bad
    input raises ``ValueError`` instead of dividing by zero.

    Args:
        epoch: 0-based epoch index (may be fractional for per-step use).
        epochs: number of epochs the cycle spans, >= 2.
        factor: cyclical factor >= 1; the hard peak sits at ``(epochs − 1)/factor``.
        normalization: ``"reference"`` (divide by E − 1, the code) or ``"paper"`` (divide by E,
            the paper's printed form, SPEC.md §1.4).

    Example:
        >>> [round(xi(e, 10, 2), 6) for e in range(10)]
        [1.0, 0.777778, 0.555556, 0.333333, 0.111111, 0.111111, 0.333333, 0.555556, 0.777778, 1.0]
    """
    _require_finite("epoch", float(epoch))
    _check_factor(float(factor))
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 2:
        raise ValueError(f"epochs must be an integer >= 2, got {epochs!r}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch!r}")
    if normalization == "paper":
        return triangle_xi(epoch / epochs, factor)
    if normalization != "reference":
        raise ValueError(f"normalization must be 'reference' or 'paper', got {normalization!r}")
    r = factor * epoch / (epochs - 1)
    if factor * epoch < epochs:  # the reference's branch test compares with E, not E - 1
        return _clamp01(1.0 - r)
    if factor == 1:
        return 0.0
    return _clamp01((r - 1.0) / (factor - 1.0))


def triangle_xi(t: float, factor: float = 2.0) -> float:
    """The reference "V": ξ falls linearly to 0 at ``t = 1/factor`` and rises back to 1 at ``t = 1``.

    Equal to :func:`xi` at ``t = epoch/(epochs − 1)`` for every integer factor. For a non-integer
    factor the reference's branch test lags its formula by one epoch; there :func:`xi` returns
    the clamped 0 while this continuous form returns ``(r − 1)/(f − 1)`` (smaller than
    ``1/((E − 1)(f − 1))``).

    Example:
        >>> triangle_xi(0.0), triangle_xi(0.25, 4), triangle_xi(1.0, 4)
        (1.0, 0.0, 1.0)
    """
    r = factor * t
    if r <= 1.0 or factor == 1:
        return _clamp01(1.0 - r)
    return _clamp01((r - 1.0) / (factor - 1.0))


def cosine_xi(t: float, factor: float = 2.0) -> float:
    """A smooth cyclical shape: the triangle's two legs bent into half cosines, same peak.

    Example:
        >>> cosine_xi(0.0), cosine_xi(0.5), cosine_xi(1.0)
        (1.0, 0.0, 1.0)
    """
    linear = triangle_xi(t, factor)
    return 0.5 - 0.5 * math.cos(math.pi * linear)


def linear_xi(t: float, factor: float = 1.0) -> float:
    """A one-way ramp from easy (t = 0) to hard (t = 1), ignoring ``factor``.

    Example:
        >>> linear_xi(0.0), linear_xi(0.5), linear_xi(1.0)
        (1.0, 0.5, 0.0)
    """
    del factor
    return _clamp01(1.0 - t)


XiShape = Callable[[float, float], float]
SHAPES: dict[str, XiShape] = {
    "cyclical": triangle_xi,
    "triangle": triangle_xi,
    "cosine": cosine_xi,
    "linear": linear_xi,
}


def register_shape(name: str, shape: XiShape) -> XiShape:
    """Add a ξ shape ``(t, factor) -> ξ in [0, 1]`` so configs can name it in ``shape:``.

    Example:
        >>> _ = register_shape("square", lambda t, f: 1.0 if t < 0.25 or t > 0.75 else 0.0)
        >>> Cyclical(easy=0.0, hard=1.0, shape="square")(0.5)
        1.0
    """
    SHAPES[name] = shape
    return shape


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Constant:
    """``value(t) = value``: a knob that does not move.

    Example:
        >>> Constant(0.1)(0.7)
        0.1
    """

    value: float

    def __call__(self, t: float) -> float:
        return float(self.value)


@dataclass(frozen=True)
class Cyclical:
    """``value(t) = ξ(t)·easy + (1 − ξ(t))·hard``: easy at the start, hard at the peak.

    Args:
        easy: the value at ξ = 1 (start and end of the run).
        hard: the value at ξ = 0 (the peak at ``t = 1/factor``).
        factor: cyclical factor >= 1 (SPEC.md §1.2).
        shape: a name in :data:`SHAPES` (``cyclical`` = the reference triangle).

    Example:
        >>> temperature = Cyclical(easy=0.5, hard=2.0, factor=2)
        >>> [round(temperature(e / 9), 6) for e in range(10)]
        [0.5, 0.833333, 1.166667, 1.5, 1.833333, 1.833333, 1.5, 1.166667, 0.833333, 0.5]
    """

    easy: float
    hard: float
    factor: float = 2.0
    shape: str = "cyclical"

    def __post_init__(self) -> None:
        _require_finite("easy", float(self.easy))
        _require_finite("hard", float(self.hard))
        _check_factor(float(self.factor))
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known shapes: {', '.join(sorted(SHAPES))}")

    def xi(self, t: float) -> float:
        """The coefficient ξ(t) of this schedule's shape."""
        return SHAPES[self.shape](t, self.factor)

    def __call__(self, t: float) -> float:
        coefficient = self.xi(t)
        return coefficient * self.easy + (1.0 - coefficient) * self.hard


@dataclass(frozen=True)
class Linear:
    """``value(t) = start + (end − start)·clamp(t, 0, 1)``.

    Example:
        >>> Linear(0.0, 2.0)(0.25)
        0.5
    """

    start: float
    end: float

    def __call__(self, t: float) -> float:
        return self.start + (self.end - self.start) * _clamp01(t)


@dataclass(frozen=True)
class Cosine:
    """Cosine annealing ``end + (start − end)·(1 + cos(π·clamp(t)))/2``.

    Example:
        >>> Cosine(1.0, 0.0)(0.5)
        0.5
    """

    start: float
    end: float = 0.0

    def __call__(self, t: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * _clamp01(t)))


@dataclass(frozen=True)
class Piecewise:
    """Linear interpolation through ``points`` ``((t0, v0), (t1, v1), ...)``, flat outside.

    Example:
        >>> Piecewise(((0.0, 0.0), (0.5, 1.0), (1.0, 0.0)))(0.25)
        0.5
    """

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("Piecewise needs at least one (t, value) point")
        ts = [p[0] for p in self.points]
        if ts != sorted(ts):
            raise ValueError(f"Piecewise points must be sorted by t, got t = {ts}")

    def __call__(self, t: float) -> float:
        points = self.points
        if t <= points[0][0]:
            return float(points[0][1])
        for (t0, v0), (t1, v1) in itertools.pairwise(points):
            if t <= t1:
                return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
        return float(points[-1][1])


@dataclass(frozen=True)
class Warmup:
    """Linear warmup from ``start_value`` to ``schedule(until)`` over ``t < until``, then ``schedule``.

    Example:
        >>> lr = Warmup(Constant(0.1), until=0.2)
        >>> lr(0.0), round(lr(0.1), 6), lr(0.5)
        (0.0, 0.05, 0.1)
    """

    schedule: Schedule
    until: float
    start_value: float = 0.0

    def __call__(self, t: float) -> float:
        if self.until > 0 and t < self.until:
            target = self.schedule(self.until)
            return self.start_value + (target - self.start_value) * max(t, 0.0) / self.until
        return self.schedule(t)


@dataclass(frozen=True)
class Join:
    """Switch between schedules at ``boundaries``; each piece sees its own local progress.

    ``schedules[i]`` covers ``[boundaries[i-1], boundaries[i])`` rescaled to [0, 1].

    Example:
        >>> two_cycles = Join((Cyclical(0.0, 1.0), Cyclical(0.0, 1.0)), boundaries=(0.5,))
        >>> two_cycles(0.25), two_cycles(0.75)
        (1.0, 1.0)
    """

    schedules: tuple[Schedule, ...]
    boundaries: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.schedules) != len(self.boundaries) + 1:
            raise ValueError("Join needs exactly one boundary fewer than schedules")

    def __call__(self, t: float) -> float:
        edges = (0.0, *self.boundaries, 1.0)
        for index, schedule in enumerate(self.schedules):
            lo, hi = edges[index], edges[index + 1]
            if t < hi or index == len(self.schedules) - 1:
                return schedule((t - lo) / (hi - lo) if hi > lo else 0.0)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class Clamp:
    """Clamp a schedule's value to ``[low, high]``.

    Example:
        >>> Clamp(Linear(0.0, 10.0), low=1.0, high=5.0)(0.9)
        5.0
    """

    schedule: Schedule
    low: float = -math.inf
    high: float = math.inf

    def __call__(self, t: float) -> float:
        return min(self.high, max(self.low, self.schedule(t)))


@dataclass(frozen=True)
class Quantize:
    """Round a schedule's value to the nearest multiple of ``step`` (e.g. batch sizes of 8).

    Example:
        >>> Quantize(Linear(64.0, 256.0), step=32)(0.3)
        128.0
    """

    schedule: Schedule
    step: float = 1.0

    def __call__(self, t: float) -> float:
        return float(round(self.schedule(t) / self.step) * self.step)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": Constant,
    "cyclical": Cyclical,
    "linear": Linear,
    "cosine": Cosine,
    "piecewise": Piecewise,
}


def register_schedule(name: str) -> Callable[[type], type]:
    """Class decorator that makes a schedule constructible by name.

    Example:
        >>> @register_schedule("half")
        ... @dataclass(frozen=True)
        ... class Half:
        ...     value: float
        ...     def __call__(self, t: float) -> float:
        ...         return self.value / 2
        >>> make_schedule("half", value=3.0)(0.0)
        1.5
    """

    def decorate(cls: type) -> type:
        SCHEDULES[name] = cls
        return cls

    return decorate


def as_schedule(value: float | Mapping[str, object] | Schedule, factor: float = 2.0) -> Schedule:
    """A number, an ``{"easy": ..., "hard": ...}`` mapping (optional ``factor``, ``shape``) or a schedule.

    Example:
        >>> as_schedule(64)
        Constant(value=64.0)
        >>> as_schedule({"easy": 256, "hard": 64}, factor=4)
        Cyclical(easy=256.0, hard=64.0, factor=4.0, shape='cyclical')
    """
    if isinstance(value, bool):
        raise TypeError(f"expected a number, an {{'easy': ..., 'hard': ...}} mapping or a schedule, got {value!r}")
    if isinstance(value, (int, float)):
        return Constant(float(value))
    if isinstance(value, Mapping):
        unknown = set(value) - {"easy", "hard", "factor", "shape"}
        if unknown or not {"easy", "hard"} <= set(value):
            raise ValueError(f"a knob mapping takes easy, hard and optionally factor, shape; got keys {sorted(value)}")
        return Cyclical(easy=float(value["easy"]), hard=float(value["hard"]),  # type: ignore[arg-type]
                        factor=float(value.get("factor", factor)), shape=str(value.get("shape", "cyclical")))  # type: ignore[arg-type]
    if callable(value):
        return value
    raise TypeError(f"expected a number, an {{'easy': ..., 'hard': ...}} mapping or a schedule, got {value!r}")


def make_schedule(name: str, **kwargs: object) -> Schedule:
    """Build a registered schedule from its name and keyword arguments.

    Example:
        >>> make_schedule("cyclical", easy=1.0, hard=2.0, factor=2)(0.5)
        2.0
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(sorted(SCHEDULES))}")
    return SCHEDULES[name](**kwargs)
