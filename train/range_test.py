"""The range test, generalised to every knob: sweep one knob from low to high in a short run and
suggest its easy and hard ends.

Within one run (``optim.lr``, ``optim.weight_decay``, ``optim.momentum``, ``temperature``,
``grad_clip``, ``augment.strength``) the knob moves every step, geometrically for scale knobs and
linearly for bounded ones, while everything else stays at the config's easy-end values; the training
loss is recorded every step (and smoothed: an exponential moving average with bias correction) and a
held-out accuracy every few steps, on samples cut from the training split (the test split stays
untouched). The sweep stops early when the smoothed loss diverges (above 4x its minimum, or NaN).
``data.batch_size`` cannot change inside a run: each candidate gets a short run of its own from the
same initial weights.

Rules for the suggestion (printed with it):

* **Step-size knobs** (LR, momentum, clip threshold): the LR range test (gradient clipping is off while
  the LR or the momentum is swept: it would hide the divergence). *Hard* = the value at the smoothed
  loss's minimum, just before it turns up and diverges. *Easy*, rule ``classic`` (the default) = where
  the loss starts to fall (the first value at which it has dropped by a tenth of its total drop); rule
  ``steepest`` = where the smoothed loss falls fastest against the (log-)knob. In one easy -> hard ->
  easy cycle over a run the easy end sets both the first epochs' step size and the final annealing; the
  steepest point usually lies above the start of the fall, so it starts faster and anneals less.
  docs/RESULTS.md section 4 measures both readings against the default recipe and a tuned constant.
  Both ends are read on the moving average, which lags the raw loss by about 9 steps (a factor of about
  2.3 in LR on the default 100-step, four-decade sweep): the readings sit later than on the raw curve,
  which puts the hard end where the loss has begun to turn up, just before it diverges.
* **Batch size** (small = hard): easy is the largest size within 2 points of the best held-out
  accuracy after its short run, hard the smallest such size.
* **Regularising knobs** (weight decay, temperature, augmentation strength): they do not make the
  loss fall, they trade training fit for regularisation. *Easy* = the low end of the sweep; *hard* =
  the largest value whose held-out accuracy is within 2 points of the best seen and whose smoothed
  loss has not diverged.

A within-run sweep confounds the knob with training progress (later values see a better-trained
model); that is the classic test's known bias, acceptable for choosing ranges, not exact values.

Example:
    >>> spec = KNOB_SPECS["optim.lr"]
    >>> [f"{v:.0e}" for v in sweep_values(spec.low, spec.high, 5, spec.scale)]
    ['1e-04', '1e-03', '1e-02', '1e-01', '1e+00']
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cycdata.config import ConfigError, RunConfig, apply_settings, config_to_dict, parse_config
from cycdata.schedules import Constant, Cyclical
from cycdata.train.range_knobs import KNOB_SPECS, STEP_RULES, KnobSpec

__all__ = ["KNOB_SPECS", "STEP_RULES", "KnobSpec", "RangeResult", "average_sweeps", "check_sweep", "range_test",
           "steepest_descent", "suggest_ends", "sweep_values"]


DIVERGENCE = 4.0  # stop when the smoothed loss exceeds this multiple of its minimum
SMOOTHING = 0.9  # EMA factor of the smoothed loss
ACCURACY_TOLERANCE = 0.02  # regularizers: within 2 points of the best held-out accuracy
HELD_OUT = 500  # training samples held out for the accuracy probe


def sweep_values(low: float, high: float, count: int, scale: str) -> list[float]:
    """``count`` values from ``low`` to ``high``, geometric (``log``) or evenly spaced (``linear``)."""
    if count < 2:
        raise ValueError(f"a sweep needs at least 2 values, got {count}")
    if scale == "log":
        if low <= 0 or high <= 0:
            raise ValueError(f"a log sweep needs positive ends, got {low} .. {high}")
        return [low * (high / low) ** (i / (count - 1)) for i in range(count)]
    return [low + (high - low) * i / (count - 1) for i in range(count)]


def smooth(losses: Sequence[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (fastai's LR finder smoothing).

    Example:
        >>> [round(v, 3) for v in smooth([1.0, 1.0, 4.0])]
        [1.0, 1.0, 2.107]
    """
    average, out = 0.0, []
    for step, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**step))
    return out


@dataclass
class RangeResult:
    """What a range test measured and what it suggests."""

    knob: str
    values: list[float]
    losses: list[float]
    smoothed: list[float]
    probes: list[tuple[int, float]]  # (index into values, held-out accuracy)
    easy: float
    hard: float
    rule: str
    stopped_early: bool

    def warnings(self) -> list[str]:
        """What makes the suggestion doubtful: a sweep that never found both ends."""
        spec, found = KNOB_SPECS[self.knob], []
        if spec.rule == "step" and self.easy == self.hard:
            found.append("the loss never fell over the sweep: raise --high or --steps")
        elif spec.rule != "batch" and self.values and self.hard == self.values[-1] and not self.stopped_early:
            found.append("the hard end is the last value swept: it may lie above --high; raise --high")
        return found

    def snippet(self) -> str:
        """A ready-to-paste YAML config snippet with the suggested ends (valid values: see ``_paste``)."""
        parts = self.knob.split(".")
        bounds = (min(self.values), max(self.values)) if self.values else (-math.inf, math.inf)
        ends = f"{{easy: {_paste(self.easy, *bounds)}, hard: {_paste(self.hard, *bounds)}}}"
        if len(parts) == 1:
            return f"{parts[0]}: {ends}"
        return f"{parts[0]}:\n  {parts[1]}: {ends}"

    def to_json(self) -> str:
        return json.dumps({"knob": self.knob, "values": self.values, "losses": self.losses, "smoothed": self.smoothed,
                           "probes": self.probes, "easy": self.easy, "hard": self.hard, "rule": self.rule,
                           "stopped_early": self.stopped_early}, indent=1)


def _short(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def _paste(value: float, low: float, high: float) -> str:
    """``value`` in as few significant digits (3 or more) as keep it within the swept ``low .. high``.

    Both sweep ends were checked as valid values of the knob (``check_sweep``), so a printed end inside them
    is one too; three digits alone could round momentum 0.9996 up to an invalid 1.

    Example:
        >>> _paste(0.9996, 0.5, 0.9996), _paste(0.0123456, 1e-4, 1.0)
        ('0.9996', '0.0123')
    """
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if low <= float(text) <= high:
            return text
    return repr(value)


def _check_knob_value(config: RunConfig, knob: str, flag: str, value: float) -> None:
    """Refuse a sweep end the config itself would refuse for ``knob`` (momentum >= 1, a negative LR, ...)."""
    try:
        parse_config(apply_settings(config_to_dict(config), {knob: value}))
    except ConfigError as error:
        raise ConfigError(flag, f"{error}; sweep within the knob's valid range") from None


def check_sweep(config: RunConfig, knob: str, *, low: float | None = None, high: float | None = None,
                steps: int = 100, rule: str = "classic", repeats: int = 1) -> tuple[float, float]:
    """The sweep's ends (the knob's defaults where not given), or a one-line :class:`ConfigError`.

    Both ends must be finite, positive on a log sweep, and valid values of the knob in ``config``:
    every suggestion is a swept value between them, so it is valid too (refused up front rather than
    clamped afterwards: a clamped end would not be a value the sweep measured).

    Example:
        >>> from cycdata.config import load_config
        >>> check_sweep(load_config(), "optim.momentum", high=1.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        cycdata.config.ConfigError: --high: optim.momentum: got 1.5, must be >= 0 and < 1; sweep within ...
    """
    if knob not in KNOB_SPECS:
        raise ConfigError("range-test", f"cannot sweep {knob!r}; choose one of {', '.join(KNOB_SPECS)}")
    if repeats < 1:
        raise ConfigError("range-test", f"--repeats must be at least 1, got {repeats}")
    if steps < 10:
        raise ConfigError("range-test", f"--steps must be at least 10, got {steps}")
    _check_rule(knob, rule)
    spec = KNOB_SPECS[knob]
    low = spec.low if low is None else low
    high = spec.high if high is None else high
    for flag, value in (("--low", low), ("--high", high)):
        if not math.isfinite(value):
            raise ConfigError(flag, f"got {value}; give a finite number")
        if spec.scale == "log" and value <= 0:
            raise ConfigError(flag, f"got {value:g}; {knob} is swept on a log scale, which needs positive ends: "
                              "give a number > 0")
        _check_knob_value(config, knob, flag, value)
    if not low < high:
        raise ConfigError("range-test", f"--low ({low}) must be below --high ({high})")
    return low, high


def _check_rule(knob: str, rule: str) -> None:
    if rule not in STEP_RULES:
        raise ConfigError("range-test", f"--rule {rule!r} is unknown; choose one of {', '.join(STEP_RULES)}")
    if rule != "classic" and KNOB_SPECS[knob].rule != "step":
        step_knobs = ", ".join(name for name, other in KNOB_SPECS.items() if other.rule == "step")
        raise ConfigError("range-test", f"--rule {rule} reads a step-size knob's curve ({step_knobs}); "
                          f"{knob} has one rule of its own: drop --rule")


def steepest_descent(values: Sequence[float], smoothed: Sequence[float], end: int, scale: str = "log") -> int:
    """Index where the smoothed loss falls fastest against the knob (log-knob on a log sweep), before ``end``.

    The slope is taken over a window of a twentieth of the values swept (at least one step) so that single
    noisy steps do not decide it; the index returned is the window's middle, rounded down. On the
    moving-average curve the reading lags the raw loss by about ``SMOOTHING / (1 - SMOOTHING)`` steps, as
    the minimum does (see the module docstring).

    Example:
        >>> values = [10.0**-k for k in range(6, 0, -1)]
        >>> steepest_descent(values, [2.3, 2.25, 2.1, 1.2, 0.9, 0.8], end=5)
        2
    """
    if end < 1:
        return 0
    coordinate = [math.log(v) for v in values] if scale == "log" else [float(v) for v in values]
    span = min(end, max(1, round(len(values) / 20)))

    def slope(i: int) -> float:
        return (smoothed[i + span] - smoothed[i]) / (coordinate[i + span] - coordinate[i])

    start = min(range(end - span + 1), key=slope)
    return start + span // 2


def suggest_ends(knob: str, values: Sequence[float], smoothed: Sequence[float],
                 probes: Sequence[tuple[int, float]], rule: str = "classic") -> tuple[float, float, str]:
    """The suggested (easy, hard) ends and the rule used (see the module docstring).

    ``rule`` chooses how a step-size knob's easy end is read (``classic`` or ``steepest``); the other knobs
    have one rule each.

    Example:
        >>> values = [0.001, 0.01, 0.1, 1.0, 10.0]
        >>> suggest_ends("optim.lr", values, [2.3, 2.2, 1.0, 0.5, 9.0], [])[:2]
        (0.1, 1.0)
        >>> suggest_ends("optim.lr", values, [2.3, 2.2, 1.0, 0.5, 9.0], [], rule="steepest")[:2]
        (0.01, 1.0)
    """
    _check_rule(knob, rule)
    spec = KNOB_SPECS[knob]
    if spec.rule == "step":
        lowest = min(range(len(smoothed)), key=lambda i: smoothed[i])
        hard_text = "hard: the smoothed loss's minimum, just before it turns up"
        if rule == "steepest":
            start = steepest_descent(values, smoothed, lowest, spec.scale)
            return values[start], values[lowest], f"easy: where the smoothed loss falls fastest; {hard_text}"
        drop = smoothed[0] - smoothed[lowest]
        start = next((i for i in range(lowest + 1) if smoothed[0] - smoothed[i] >= 0.1 * drop), 0)
        if start >= lowest:
            start = max(0, lowest - max(1, len(values) // 10))
        easy_text = "easy: where the smoothed loss has fallen by a tenth of its total drop"
        return values[start], values[lowest], f"{easy_text}; {hard_text}"
    if not probes:
        raise ValueError("a regularizer's ends need held-out accuracy probes")
    best = max(accuracy for _, accuracy in probes)
    floor = min(smoothed)
    tolerated = [index for index, accuracy in probes
                 if accuracy >= best - ACCURACY_TOLERANCE and smoothed[index] <= DIVERGENCE * floor]
    if spec.rule == "batch":
        rule = (f"easy: the largest batch within {100 * ACCURACY_TOLERANCE:.0f} points of the best held-out "
                "accuracy; hard: the smallest such batch")
        chosen = [values[i] for i in tolerated]
        return max(chosen), min(chosen), rule
    rule = (f"easy: the low end of the sweep; hard: the largest value whose held-out accuracy is within "
            f"{100 * ACCURACY_TOLERANCE:.0f} points of the best and whose loss has not diverged")
    return values[0], values[max(tolerated)], rule


# --------------------------------------------------------------------------------------------
# Running the sweep
# --------------------------------------------------------------------------------------------


def _easy_config(config: RunConfig) -> RunConfig:
    """Every cyclical knob at its easy end, as constants: only the swept knob moves."""

    def easy(schedule: Any) -> Any:
        return Constant(schedule.easy) if isinstance(schedule, Cyclical) else schedule

    optim = replace(config.optim, weight_decay=easy(config.optim.weight_decay), momentum=easy(config.optim.momentum),
                    lr=easy(config.optim.lr), warmup_epochs=0.0, sched="constant")
    grad_clip = config.grad_clip
    if grad_clip is not None:
        grad_clip = replace(grad_clip, threshold=easy(grad_clip.threshold))
    return replace(config, optim=optim, temperature=easy(config.temperature), grad_clip=grad_clip,
                   augment=replace(config.augment, strength=easy(config.augment.strength)),
                   data=replace(config.data, batch_size=easy(config.data.batch_size)),
                   self_paced=None, semi_supervised=None, distill=None, couple="none")


class _Probe:
    """Training batches from one part of the train split, accuracy on the held-out rest."""

    def __init__(self, config: RunConfig, device: torch.device) -> None:
        from cycdata.train.builders import run_dataset

        data = run_dataset(config)
        images, labels = getattr(data.train, "images", None), getattr(data.train, "labels", None)
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise ConfigError("data.dataset", f"the range test needs an in-memory dataset; {data.name} is lazy")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(config.seed))
        held = order[: min(HELD_OUT, len(labels) // 5)]
        rest = order[len(held) :]
        self.data = data
        self.images, self.labels = images[rest].to(device), labels[rest].to(device)
        self.held_images, self.held_labels = images[held].to(device), labels[held].to(device)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.device = device
        self._order: Tensor = torch.empty(0, dtype=torch.long)

    def batch(self, size: int) -> tuple[Tensor, Tensor]:
        if len(self._order) < size:
            self._order = torch.cat([self._order, torch.randperm(len(self.labels), generator=self.generator)])
        chosen, self._order = self._order[:size], self._order[size:]
        chosen = chosen.to(self.device)
        return self.images[chosen], self.labels[chosen]

    @torch.no_grad()
    def accuracy(self, model: nn.Module, normalize: nn.Module) -> float:
        model.eval()
        correct = 0
        for start in range(0, len(self.held_labels), 500):
            logits = model(normalize(self.held_images[start : start + 500]))
            correct += int((logits.argmax(1) == self.held_labels[start : start + 500]).sum())
        model.train()
        return correct / len(self.held_labels)


def range_test(config: RunConfig, knob: str, *, low: float | None = None, high: float | None = None,
               steps: int = 100, probes: int = 10, rule: str = "classic", repeats: int = 1,
               log: Any = None) -> RangeResult:
    """Sweep ``knob`` over ``steps`` training steps (batch size: one short run per value) and suggest its ends.

    ``rule`` (``classic`` or ``steepest``) chooses how a step-size knob's easy end is read off the curve.
    ``repeats`` sweeps run with seeds ``seed``, ``seed + 1``, ... (initial weights, batches, held-out
    samples) and the ends are read on their mean curve: one sweep's reading moves with the seed and with
    the CPU's rounding (see ``average_sweeps``).
    """
    low, high = check_sweep(config, knob, low=low, high=high, steps=steps, rule=rule, repeats=repeats)
    if repeats > 1:
        sweeps = []
        for repeat in range(repeats):
            if log:
                log(f"sweep {repeat + 1} of {repeats} (seed {config.seed + repeat})")
            sweeps.append(range_test(replace(config, seed=config.seed + repeat), knob, low=low, high=high,
                                     steps=steps, probes=probes, rule=rule, log=log))
        return average_sweeps(sweeps, rule)
    from cycdata.plan import Plan
    from cycdata.samplers import epoch_generator
    from cycdata.train.builders import Normalize, build_model, build_optimizer, resolve_ladder, setup_runtime
    from cycdata.train.hooks import CyclicalHooks
    from cycdata.train.objectives import training_loss

    spec = KNOB_SPECS[knob]
    config = _easy_config(config)
    if spec.rule == "step" and knob != "grad_clip":
        # Clipping bounds every update and would hide the divergence the step-size rule looks for.
        config = replace(config, grad_clip=None)
    if knob == "augment.strength" and config.augment.ladder == "none":
        raise ConfigError("augment.ladder", "sweeping augment.strength needs a ladder; set augment.ladder")
    runtime = setup_runtime(config.runtime.device)
    probe = _Probe(config, runtime.device)
    ladder = resolve_ladder(config, probe.data)
    normalize = Normalize(probe.data.mean, probe.data.std, channels_last=False).to(runtime.device)
    generator = epoch_generator(config.seed, 0, stream=9, device=runtime.device)

    def fresh() -> tuple[nn.Module, Any, CyclicalHooks]:
        torch.manual_seed(config.seed)
        model = build_model(config, probe.data).to(runtime.device)
        plan = Plan.from_config(config)
        optimizer = build_optimizer(model, config, plan)
        hooks = CyclicalHooks(optimizer, plan, clip_mode=config.grad_clip.mode if config.grad_clip else "norm",
                              set_lr=True)
        hooks.update(0)
        return model.train(), optimizer, hooks

    def step(model: nn.Module, optimizer: Any, hooks: CyclicalHooks, batch_size: int, overrides: dict[str, float]
             ) -> float:
        images, labels = probe.batch(batch_size)
        pixels = images.float() / 255.0
        strength = overrides.get("augment.strength", float(config.augment.strength(0.0)))
        if ladder is not None:
            pixels = ladder.apply(pixels, strength, generator)
        temperature = overrides.get("temperature", hooks.temperature)
        logits = model(normalize(pixels))
        losses = training_loss(config, {})(logits.float() / temperature, labels)
        loss = losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if "grad_clip" in overrides:
            hooks.values["grad_clip"] = overrides["grad_clip"]
        hooks.clip_gradients(model)
        optimizer.step()
        return float(loss.detach())

    def apply(hooks: CyclicalHooks, value: float) -> dict[str, float]:
        hooks.write({knob: value})  # LR, weight decay, momentum: into the optimizer; the rest is used per step
        return {knob: value}

    batch_size = round(float(config.data.batch_size(0.0)))
    values, losses, probed = [], [], []
    stopped = False
    if spec.rule == "batch":
        candidates = sorted({round(v) for v in sweep_values(low, high, max(2, min(8, steps // 10)), spec.scale)})
        per_value = max(10, steps // len(candidates))
        for size in candidates:
            model, optimizer, hooks = fresh()
            run = [step(model, optimizer, hooks, size, {}) for _ in range(per_value)]
            values.append(float(size))
            losses.append(sum(run[-max(1, per_value // 4) :]) / max(1, per_value // 4))
            probed.append((len(values) - 1, probe.accuracy(model, normalize)))
            if log:
                log(f"batch {size}: loss {losses[-1]:.4f}, held-out accuracy {100 * probed[-1][1]:.1f}%")
        smoothed = list(losses)
    else:
        model, optimizer, hooks = fresh()
        every = max(1, steps // probes)
        for index, value in enumerate(sweep_values(low, high, steps, spec.scale)):
            overrides = apply(hooks, value)
            loss = step(model, optimizer, hooks, batch_size, overrides)
            values.append(value)
            losses.append(loss if math.isfinite(loss) else math.inf)
            if (index + 1) % every == 0 or index == steps - 1:
                probed.append((index, probe.accuracy(model, normalize)))
            smoothed = smooth(losses)
            if not math.isfinite(losses[-1]) or (index > steps // 10 and smoothed[-1] > DIVERGENCE * min(smoothed)):
                stopped = True
                break
    easy, hard, text = suggest_ends(knob, values, smoothed, probed or [(len(values) - 1, 0.0)], rule)
    return RangeResult(knob, values, losses, smoothed, probed, easy, hard, text, stopped)


def average_sweeps(sweeps: Sequence[RangeResult], rule: str = "classic") -> RangeResult:
    """One result from several sweeps of the same knob: the raw losses and the held-out accuracies averaged
    step by step over the steps every sweep reached, smoothed again, and the ends read on that curve.

    Measured on the ``range`` suite's config (MNIST-1000, test_resnet, 100 steps): single sweeps over five
    seeds put the LR's hard end anywhere from 0.19 to 0.52 and the steepest easy end from 0.032 to 0.039;
    the five-sweep mean reads 0.035 for the easy end under three CPU instruction sets.

    Example:
        >>> one = RangeResult("optim.lr", [0.1, 1.0], [2.0, 4.0], [2.0, 3.2], [(1, 0.5)], 0.1, 0.1, "", False)
        >>> two = RangeResult("optim.lr", [0.1, 1.0], [1.0, 2.0], [1.0, 1.6], [(1, 0.7)], 0.1, 0.1, "", False)
        >>> mean = average_sweeps([one, two])
        >>> mean.losses, mean.probes
        ([1.5, 3.0], [(1, 0.6)])
    """
    first = sweeps[0]
    reached = min(len(sweep.values) for sweep in sweeps)
    values = first.values[:reached]
    losses = [sum(sweep.losses[i] for sweep in sweeps) / len(sweeps) for i in range(reached)]
    accuracies: dict[int, list[float]] = {}
    for sweep in sweeps:
        for index, accuracy in sweep.probes:
            if index < reached:
                accuracies.setdefault(index, []).append(accuracy)
    probed = [(index, sum(found) / len(found)) for index, found in sorted(accuracies.items())
              if len(found) == len(sweeps)]
    smoothed = list(losses) if KNOB_SPECS[first.knob].rule == "batch" else smooth(losses)
    easy, hard, text = suggest_ends(first.knob, values, smoothed, probed or [(reached - 1, 0.0)], rule)
    stopped = any(sweep.stopped_early for sweep in sweeps)
    return RangeResult(first.knob, values, losses, smoothed, probed, easy, hard, text, stopped)


def plot_range(result: RangeResult, path: str | Path) -> Path:
    """Loss (raw and smoothed) and held-out accuracy against the knob, the suggested ends marked."""
    from cycdata.figures import knob_label, new_figure, save_figure

    title = knob_label(result.knob)[0]
    figure = new_figure(figsize=(8, 4.5))
    axis = figure.subplots()
    finite = [(v, loss) for v, loss in zip(result.values, result.losses) if math.isfinite(loss)]
    axis.plot([v for v, _ in finite], [loss for _, loss in finite], color="tab:blue", alpha=0.3, label="loss")
    axis.plot(result.values, result.smoothed, color="tab:blue", label="smoothed loss")
    if KNOB_SPECS[result.knob].scale == "log":
        axis.set_xscale("log")
    scale = ", log scale" if KNOB_SPECS[result.knob].scale == "log" else ""
    axis.set_xlabel(f"{title} ({result.knob}), swept{scale}")
    axis.set_ylabel("training loss (nats per sample)")
    cap = min(result.smoothed) * DIVERGENCE if result.smoothed else None
    if cap and math.isfinite(cap):
        axis.set_ylim(top=max(cap, max(result.smoothed[: max(1, len(result.smoothed) // 2)])))
    twin = axis.twinx()
    twin.plot([result.values[i] for i, _ in result.probes], [100 * a for _, a in result.probes], "o-",
              color="tab:orange", label="held-out accuracy (%)")
    twin.set_ylabel("held-out accuracy (%)")
    axis.axvline(result.easy, color="tab:green", linestyle="--", label=f"easy {_short(result.easy)}")
    axis.axvline(result.hard, color="tab:red", linestyle="--", label=f"hard {_short(result.hard)}")
    lines = axis.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axis.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")
    axis.set_title(f"range test: {title}")
    return save_figure(figure, path)
