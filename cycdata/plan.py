"""The plan: every knob of a run, with its schedule, evaluated through the one clock.

``Plan.from_config(cfg).at(epoch)`` gives every knob's value at the start of an epoch (or part
way through it for per-step knobs). Knobs are named by their dotted config keys.

Example:
    >>> from cycdata.config import parse_config
    >>> plan = Plan.from_config(parse_config({"epochs": 10, "optim": {"weight_decay": {"easy": 1e-5, "hard": 8e-5}}}))
    >>> [round(v * 1e5, 6) for v in plan.values()["optim.weight_decay"][:3]]
    [1.0, 2.555556, 4.111111]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cycdata.clock import Clock
from cycdata.config import RunConfig, knob_range, with_epochs
from cycdata.schedules import Constant, Cosine, Cyclical, Linear, Schedule, Warmup

__all__ = ["Knob", "Plan", "ShortCycleWarning", "lr_schedule", "short_cycle_message", "warn_if_short_cycle"]

#: The LR warmup starts at this fraction of the peak LR (unless ``optim.warmup_lr`` says where).
WARMUP_START_FRACTION = 0.1


@dataclass(frozen=True)
class Knob:
    """One planned knob.

    Attributes:
        name: dotted config key, e.g. ``optim.weight_decay``.
        schedule: the schedule of ``t``.
        timeline: ``"cycle"`` (cycle progress, the cyclical knobs) or ``"run"`` (run fraction, the LR).
        integer: round values to integers (batch sizes).
        ends: ``(easy, hard)`` for plots, None when the knob has no such ends.
    """

    name: str
    schedule: Schedule
    timeline: Literal["cycle", "run"] = "cycle"
    integer: bool = False
    ends: tuple[float, float] | None = None
    warmup_until: float = 0.0  # run fraction over which a cycle knob ramps up (a cyclical LR)
    warmup_start: float | None = None  # the value the ramp starts from; None: a tenth of the knob's value

    def value(self, clock: Clock, epoch: int, fraction: float = 0.0) -> float | int:
        if self.timeline == "run":
            t = clock.run_fraction(epoch, fraction)
        else:
            t = clock.progress(epoch, fraction)
        value = self.schedule(t)
        if self.warmup_until > 0:
            done = clock.run_fraction(epoch, fraction) / self.warmup_until
            if done < 1.0:
                start = WARMUP_START_FRACTION * value if self.warmup_start is None else self.warmup_start
                value = start + (value - start) * done
        return round(value) if self.integer else value


def lr_schedule(config: RunConfig) -> Schedule:
    """The learning rate as a schedule of the run fraction: warmup, then cosine/linear/constant.

    Only for a constant ``optim.lr`` (its peak); a cyclical LR is a cycle knob (see :func:`lr_knob`).

    Example:
        >>> from cycdata.config import parse_config
        >>> lr = lr_schedule(parse_config({"epochs": 10, "optim": {"lr": 0.1, "warmup_epochs": 0}}))
        >>> lr(0.0), round(lr(0.5), 6), lr(1.0)
        (0.1, 0.05, 0.0)
        >>> warm = lr_schedule(parse_config({"epochs": 10, "optim": {"lr": 0.1, "warmup_lr": 1e-5}}))
        >>> warm(0.0), round(warm(0.05), 6), round(warm(0.1), 6)  # from 1e-5 up to the cosine at epoch 1
        (1e-05, 0.048781, 0.097553)
    """
    optim = config.optim
    peak = float(optim.lr(0.0))
    base: Schedule
    if optim.sched == "cosine":
        base = Cosine(peak, optim.min_lr)
    elif optim.sched == "linear":
        base = Linear(peak, optim.min_lr)
    else:
        base = Constant(peak)
    until = optim.warmup_epochs / config.epochs
    start = WARMUP_START_FRACTION * peak if optim.warmup_lr is None else optim.warmup_lr
    return Warmup(base, until=until, start_value=start) if until > 0 else base


def lr_knob(config: RunConfig) -> Knob:
    """``optim.lr``: the run-long schedule for a number; for ``{easy, hard}`` a cycle knob (small at the easy
    ends, large at the hard peak) whose first ``warmup_epochs`` ramp up from a tenth of it."""
    if isinstance(config.optim.lr, Constant):
        return Knob("optim.lr", lr_schedule(config), timeline="run")
    return Knob("optim.lr", config.optim.lr, ends=knob_range(config.optim.lr),
                warmup_until=config.optim.warmup_epochs / config.epochs, warmup_start=config.optim.warmup_lr)


@dataclass(frozen=True)
class Plan:
    """The knobs of a run and the clock that drives them."""

    clock: Clock
    knobs: tuple[Knob, ...]
    lr_coupling_power: float = 0.0  # LR × (batch size / first epoch's batch size) ** power
    noise_scale: bool = False  # LR × (B/B₀)·((1 − m)/(1 − m₀)): constant SGD noise scale LR·N/(B(1 − m))
    momentum: float = 0.9  # the constant momentum (when optim.momentum is not a knob)
    # Whether the LR is the user's own: from_config sets it when the parsed config gave optim.lr; False means the
    # default recipe's, which CyclicalHooks(set_lr=None) leaves out of the optimizer. A plan built knob by knob: True.
    lr_given: bool = True

    @classmethod
    def from_config(cls, config: RunConfig, epochs: int | None = None) -> Plan:
        """Plan every knob that ``config`` turns on (``epochs`` overrides ``config.epochs``)."""
        if epochs is not None and epochs != config.epochs:
            config = with_epochs(config, epochs)  # validated like a config's epochs (bounds, warmup within the run)
        clock = Clock(config.epochs, unit=config.schedule_unit, normalization=config.normalization,  # type: ignore[arg-type]
                      start=config.cycle.start, end=config.cycle.end)
        power = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[config.data.lr_coupling]
        return cls(clock=clock, knobs=tuple(_knobs_of(config)), lr_coupling_power=power,
                   noise_scale=config.couple == "noise_scale", momentum=float(config.optim.momentum(0.0)),
                   lr_given="optim.lr" in config.given_keys)

    @property
    def epochs(self) -> int:
        return self.clock.epochs

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(knob.name for knob in self.knobs)

    def knob(self, name: str) -> Knob:
        for knob in self.knobs:
            if knob.name == name:
                return knob
        raise KeyError(f"no knob {name!r} in this plan; it has: {', '.join(self.names)}")

    def at(self, epoch: int, fraction: float = 0.0) -> dict[str, float | int]:
        """Every knob's value at ``epoch`` after ``fraction`` of its samples.

        With an LR coupling, ``optim.lr`` is scaled by the batch size's ratio to epoch 0's
        (``linear``: Goyal et al. 2017; ``sqrt``: Krizhevsky 2014), per epoch like the batch size.
        """
        values = {knob.name: knob.value(self.clock, epoch, fraction) for knob in self.knobs}
        if self.lr_coupling_power:
            values["optim.lr"] = float(values["optim.lr"]) * self._batch_ratio(epoch) ** self.lr_coupling_power
        if self.noise_scale:
            values["optim.lr"] = float(values["optim.lr"]) * self.noise_scale_factor(epoch, fraction)
        return values

    def _batch_ratio(self, epoch: int) -> float:
        """The epoch's batch size over epoch 0's (batch sizes change per epoch only)."""
        batch = self.knob("data.batch_size")
        return batch.value(self.clock, epoch) / batch.value(self.clock, 0)

    def _momentum(self, epoch: int, fraction: float = 0.0) -> float:
        if "optim.momentum" in self.names:
            return float(self.knob("optim.momentum").value(self.clock, epoch, fraction))
        return self.momentum

    def noise_scale_factor(self, epoch: int, fraction: float = 0.0) -> float:
        """``(B/B₀)·((1 − m)/(1 − m₀))``: the LR factor that holds LR·N/(B·(1 − m)) at its start (SPEC.md §8).

        Example:
            >>> from cycdata.config import parse_config
            >>> plan = Plan.from_config(parse_config({"epochs": 3, "couple": "noise_scale",
            ...                                      "data": {"batch_size": {"easy": 256, "hard": 64}}}))
            >>> [plan.noise_scale_factor(e) for e in range(3)]
            [1.0, 0.25, 1.0]
        """
        return self._batch_ratio(epoch) * (1.0 - self._momentum(epoch, fraction)) / (1.0 - self._momentum(0))

    def noise_scale_value(self, epoch: int, dataset_size: int, fraction: float = 0.0) -> float:
        """The SGD noise scale ``g = LR·N/(B·(1 − m))`` at ``epoch`` (Smith & Le 2018; SPEC.md §8)."""
        values = self.at(epoch, fraction)
        return float(values["optim.lr"]) * dataset_size / (
            float(values["data.batch_size"]) * (1.0 - self._momentum(epoch, fraction)))

    def values(self) -> dict[str, list[float | int]]:
        """Every knob's per-epoch values (at each epoch's start)."""
        rows = [self.at(epoch) for epoch in range(self.epochs)]
        return {name: [row[name] for row in rows] for name in self.names}

    def progress(self) -> list[float]:
        """Each epoch's position in the cycle (t at its start)."""
        return [self.clock.progress(epoch) for epoch in range(self.epochs)]

    def to_json(self) -> str:
        """``{"epochs": N, "cycle": {"start", "end", "t": [...]}, "knobs": {name: [v_0, ..., v_{N-1}]}}``."""
        cycle = {"start": self.clock.start, "end": self.clock.end, "t": self.progress()}
        return json.dumps({"epochs": self.epochs, "cycle": cycle, "knobs": self.values()})

    def table(self) -> str:
        """A readable per-epoch table of every knob (and the cycle position t of each epoch's start), epochs
        numbered from 1 as the training console numbers them."""
        values = self.values()
        progress = self.progress()
        headers = ["epoch", "t", *self.names]
        rows = [[str(epoch + 1), f"{progress[epoch]:.3f}", *(_format(values[name][epoch]) for name in self.names)]
                for epoch in range(self.epochs)]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines = []
        if self.clock.windowed:
            lines.append(f"this run covers t = {self.clock.start:g} .. {self.clock.end:g} of the easy→hard→easy cycle")
        lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        return "\n".join(lines)

    def hard_reach(self, knob: Knob) -> float:
        """How far ``knob`` gets from its easy end toward its hard end over the run: 1.0 reaches the hard end,
        0.0 never leaves the easy end (at the points where it is evaluated: epoch starts, or steps).

        Example:
            >>> from cycdata.config import parse_config
            >>> short = Plan.from_config(parse_config({"epochs": 2, "temperature": {"easy": 0.5, "hard": 2}}))
            >>> longer = Plan.from_config(parse_config({"epochs": 4, "temperature": {"easy": 0.5, "hard": 2}}))
            >>> short.hard_reach(short.knob("temperature")), round(longer.hard_reach(longer.knob("temperature")), 4)
            (0.0, 0.6667)
        """
        if knob.ends is None or knob.ends[0] == knob.ends[1] or knob.timeline != "cycle":
            return 1.0
        easy, hard = knob.ends
        # Per-step knobs move inside epochs: a few points per epoch stand for its steps.
        fractions = (0.0,) if self.clock.unit == "epoch" else tuple(i / 16 for i in range(16))
        shares = [(knob.schedule(self.clock.progress(epoch, fraction)) - easy) / (hard - easy)
                  for epoch in range(self.epochs) for fraction in fractions]
        return max(0.0, min(1.0, max(shares)))

    def short_of_hard(self, least: float = 0.75) -> dict[str, float]:
        """The cyclical knobs that stay short of ``least`` of the way to their hard end, with their reach."""
        return {knob.name: reach for knob in self.knobs if (reach := self.hard_reach(knob)) < least}

    def plot(self, path: str | Path) -> Path:
        """Draw one titled panel per knob against epochs (the cycle position t on a top axis) to a PNG."""
        from cycdata.figures import plan_figure, save_figure

        return save_figure(plan_figure(self), path)


class ShortCycleWarning(UserWarning):
    """The run is too short for its cycle: some cyclical knob never gets near its hard end."""


def short_cycle_message(config: RunConfig) -> str | None:
    """What to say when ``config``'s run stays short of its cycle's hard end (None when it does not).

    With the reference's clock an epoch's knobs are set at its start, ``t = e/(E − 1)``; two epochs at
    ``cyclical_factor: 2`` are t = 0 and 1, both at the easy end, so the run never trains hard.

    Example:
        >>> from cycdata.config import parse_config
        >>> print(short_cycle_message(parse_config({"epochs": 2, "temperature": {"easy": 0.5, "hard": 2}})))
        ... # doctest: +ELLIPSIS +NORMALIZE_WHITESPACE
        the run is too short for its cycle: over 2 epochs optim.weight_decay, temperature, ... never leave
        their easy end; epochs=3 reaches the hard end (or schedule_unit=step moves the knobs every step)
        >>> short_cycle_message(parse_config({"epochs": 3})) is None
        True
    """
    short = Plan.from_config(config).short_of_hard()
    if not short:
        return None
    reach = max(short.values())
    if len(short) == 1:
        verb = "never leaves its easy end" if reach == 0 else f"gets at most {reach:.0%} of the way to its hard end"
    else:
        verb = "never leave their easy end" if reach == 0 else f"get at most {reach:.0%} of the way to their hard end"
    enough = next((epochs for epochs in range(config.epochs + 1, config.epochs + 200)
                   if not Plan.from_config(config, epochs).short_of_hard(least=0.999)), None)
    fix = f"epochs={enough} reaches the hard end" if enough is not None else "more epochs reach the hard end"
    step = " (or schedule_unit=step moves the knobs every step)" if config.schedule_unit == "epoch" else ""
    return f"the run is too short for its cycle: over {config.epochs} epochs {', '.join(short)} {verb}; {fix}{step}"


def warn_if_short_cycle(config: RunConfig) -> None:
    """Warn (:class:`ShortCycleWarning`) when the run is too short to reach its cycle's hard end."""
    import warnings

    message = short_cycle_message(config)
    if message is not None:
        warnings.warn(message, ShortCycleWarning, stacklevel=2)


def _format(value: float | int) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def _knob(name: str, schedule: Schedule, **kwargs: object) -> Knob:
    return Knob(name=name, schedule=schedule, ends=knob_range(schedule), **kwargs)  # type: ignore[arg-type]


def _knobs_of(config: RunConfig) -> list[Knob]:
    knobs = [
        _knob("data.batch_size", config.data.batch_size, integer=True),
        lr_knob(config),
        _knob("optim.weight_decay", config.optim.weight_decay),
    ]
    if not isinstance(config.optim.momentum, Constant):
        knobs.append(_knob("optim.momentum", config.optim.momentum))
    if config.temperature is not None:
        knobs.append(_knob("temperature", config.temperature))
    if config.grad_clip is not None:
        knobs.append(_knob("grad_clip", config.grad_clip.threshold))
    if config.loss.name == "cyclical_focal":
        factor = config.loss.factor or config.cyclical_factor
        knobs.append(_knob("loss.xi", Cyclical(easy=1.0, hard=0.0, factor=factor)))
    if config.augment.ladder != "none":
        knobs.append(_knob("augment.strength", config.augment.strength))
    if config.self_paced is not None:
        if config.self_paced.keep is not None:
            knobs.append(_knob("self_paced.keep", config.self_paced.keep))
        else:
            assert config.self_paced.threshold is not None
            knobs.append(_knob("self_paced.threshold", config.self_paced.threshold))
    if config.semi_supervised is not None:
        knobs.append(_knob("semi_supervised.ratio", config.semi_supervised.ratio))
    if config.distill is not None:
        knobs.append(_knob("distill.temperature", config.distill.temperature))
        knobs.append(_knob("distill.weight", config.distill.weight))
    return knobs
