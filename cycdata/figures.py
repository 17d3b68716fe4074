"""Figures the library draws: the epoch axis every plot shares, titled knob panels, the plan's figure.

matplotlib is imported on first use (figures are plain :class:`matplotlib.figure.Figure` objects, no pyplot
state, drawn with Agg), so importing cycdata stays cheap and plotting works on machines without a display.
Figures are built by pure functions and written by :func:`save_figure`, so a test can read their titles,
labels, ticks and line data.

The epoch axis, one convention everywhere: **x = epochs done**. Console epoch k (``epoch`` k − 1 in
metrics.csv) spans (k − 1, k]; a value measured at its end sits at x = k; step s (0-based) of its n steps
ends at x = k − 1 + (s + 1)/n, where the value in force during that step is drawn (``drawstyle="steps-pre"``).

Example:
    >>> import tempfile, pathlib
    >>> figure = new_figure()
    >>> axis = figure.subplots()
    >>> _ = axis.plot([0, 1], [1, 0])
    >>> save_figure(figure, pathlib.Path(tempfile.mkdtemp()) / "sub" / "line.png").stat().st_size > 0
    True
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cycdata.plan import Plan

__all__ = ["EPOCH_HELD", "KNOB_LABELS", "draw_knob", "epoch_axis", "epoch_ticks", "knob_label", "logged_positions",
           "new_figure", "plan_figure", "plan_series", "points_per_epoch", "pyplot", "save_figure", "side_legend"]

#: Panel title and y-axis label of each knob a plan or a run logs (dotted config names).
KNOB_LABELS: dict[str, tuple[str, str]] = {
    "data.batch_size": ("batch size (samples)", "samples per batch"),
    "optim.lr": ("learning rate", "LR"),
    "optim.weight_decay": ("weight decay (CWD)", "decay coefficient"),
    "optim.momentum": ("momentum", "momentum β"),
    "temperature": ("softmax temperature (CST)", "T (training logits / T)"),
    "grad_clip": ("gradient-clip threshold (CGC)", "threshold"),
    "loss.xi": ("focal-loss mix ξ (CFL)", "ξ (1 = high-confidence, 0 = focal)"),
    "augment.strength": ("augmentation strength (0 = identity, 1 = strongest rung)", "strength"),
    "self_paced.keep": ("kept fraction (self-paced)", "fraction of samples"),
    "self_paced.threshold": ("self-paced loss threshold", "loss (nats)"),
    "self_paced.kept": ("samples kept (self-paced)", "samples"),
    "self_paced.unseen": ("never-scored samples admitted (self-paced)", "samples"),
    "self_paced.refreshed": ("stale samples re-admitted (self-paced)", "samples"),
    "self_paced.nonfinite": ("non-finite losses in the ledger", "samples"),
    "semi_supervised.ratio": ("unlabeled ratio (semi-supervised)", "unlabeled per labeled sample"),
    "semi_supervised.coverage": ("unlabeled pool covered in this pass", "fraction of the pool"),
    "semi_supervised.passes": ("passes over the unlabeled pool", "passes"),
    "distill.temperature": ("distillation temperature (KD)", "T"),
    "distill.weight": ("distillation weight (KD)", "share of the KD term"),
}

# Enough points per epoch that a per-step curve looks continuous, few enough that a long run redraws quickly.
_POINTS_PER_RUN = 4000
_MIN_POINTS_PER_EPOCH = 8


def knob_label(name: str) -> tuple[str, str]:
    """``(panel title, y label)`` of a knob; an unknown name titles itself.

    Example:
        >>> knob_label("temperature")
        ('softmax temperature (CST)', 'T (training logits / T)')
        >>> knob_label("my.knob")
        ('my.knob', 'my.knob')
    """
    return KNOB_LABELS.get(name, (name, name))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (for callers that want pyplot's state)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def new_figure(**options: Any) -> Any:
    """A :class:`matplotlib.figure.Figure` outside pyplot (nothing to close, nothing global)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def save_figure(figure: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Lay ``figure`` out, write it to ``path`` (creating its folder) and close it if pyplot holds it."""
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    if getattr(figure.canvas, "manager", None) is not None:  # a pyplot figure: pyplot would keep it alive
        pyplot().close(figure)
    return path


def epoch_ticks(epochs: int, most: int = 12) -> list[int]:
    """At most ``most`` integer ticks for ``epochs`` epochs: from 1 (the console's first epoch), then every
    epoch, every other one, or 1 and the multiples of a round step.

    Example:
        >>> epoch_ticks(5), epoch_ticks(15)
        ([1, 2, 3, 4, 5], [1, 3, 5, 7, 9, 11, 13, 15])
        >>> epoch_ticks(90)
        [1, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    """
    if epochs <= most:
        return list(range(1, epochs + 1))
    step = next(s * 10**k for k in range(12) for s in (1, 2, 5) if epochs / (s * 10**k) <= most - 1)
    if step == 2:
        return list(range(1, epochs + 1, step))
    return [1, *range(step, epochs + 1, step)]


def epoch_axis(axis: Any, epochs: int, *, low: float = 0.0, high: float | None = None) -> None:
    """Label ``axis``'s x axis "epoch", limits ``[low, high]`` (default ``[0, epochs]``), integer ticks."""
    axis.set_xlim(low, epochs if high is None else high)
    axis.set_xticks(epoch_ticks(epochs))
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)


def points_per_epoch(epochs: int, steps: Sequence[int] | int | None = None) -> list[int]:
    """How many points a per-step curve gets in each epoch: its steps, at most ~4000 in the whole run.

    Example:
        >>> points_per_epoch(3, 5), points_per_epoch(2, [10, 20]), points_per_epoch(1000)[:2]
        ([5, 5, 5], [10, 20], [8, 8])
    """
    cap = max(_MIN_POINTS_PER_EPOCH, math.ceil(_POINTS_PER_RUN / epochs))
    if steps is None:
        return [cap] * epochs
    counts = [steps] * epochs if isinstance(steps, int) else list(steps)
    if len(counts) != epochs or any(count < 1 for count in counts):
        raise ValueError(f"steps per epoch must be {epochs} counts >= 1, got {steps!r}")
    return [min(count, cap) for count in counts]


#: Knobs the loader fixes at each epoch's start whatever the schedule unit: the batch size (it sets the epoch's
#: step count) and the self-paced selection (made once per epoch); see cycdata.samplers.
EPOCH_HELD = ("data.batch_size", "self_paced.keep", "self_paced.threshold")


def plan_series(plan: Plan, points: Sequence[int]) -> tuple[list[float], dict[str, list[float]]]:
    """Every knob of ``plan`` step by step: x (epochs done) and each knob's value, from x = 0.

    Point j of ``points[e]`` in 0-based epoch e is the value at ``plan.at(e, j / points[e])`` (the share of
    the epoch's samples seen before the step, as the trainer asks), drawn at the step's end x = e + (j + 1)/n;
    the first point, at x = 0, repeats the first value so that ``steps-pre`` draws the first step too. The
    knobs in :data:`EPOCH_HELD` keep their epoch-start value through the epoch, as the loader keeps them.

    Example:
        >>> from cycdata.config import parse_config
        >>> from cycdata.plan import Plan
        >>> plan = Plan.from_config(parse_config({"epochs": 2, "optim": {"lr": 0.1, "warmup_epochs": 0}}))
        >>> x, values = plan_series(plan, [2, 2])
        >>> x, [round(v, 4) for v in values["optim.lr"]]
        ([0.0, 0.5, 1.0, 1.5, 2.0], [0.1, 0.1, 0.0854, 0.05, 0.0146])
    """
    xs: list[float] = [0.0]
    values: dict[str, list[float]] = {name: [float(value)] for name, value in plan.at(0).items()}
    for epoch, count in enumerate(points):
        held = {name: value for name, value in plan.at(epoch).items() if name in EPOCH_HELD}
        for step in range(count):
            xs.append(epoch + (step + 1) / count)
            for name, value in {**plan.at(epoch, step / count), **held}.items():
                values[name].append(float(value))
    return xs, values


def logged_positions(epoch_values: Sequence[float], logged: float) -> float:
    """Where in its epoch (0..1) a value logged at the epoch's start is drawn: at the end of the run of steps
    whose planned value it equals (the epoch's end for a knob that holds through the epoch, the first step's
    end for one that moves per step, or for a logged value the plan does not give).

    Example:
        >>> logged_positions([2.0, 2.0, 2.0, 2.0], 2.0), logged_positions([0.1, 0.09, 0.08, 0.07], 0.1)
        (1.0, 0.25)
    """
    held = 0
    for value in epoch_values:
        if not math.isclose(value, logged, rel_tol=1e-9, abs_tol=1e-15):
            break
        held += 1
    return max(1, held) / len(epoch_values)


def draw_knob(axis: Any, name: str, *, steps: tuple[Sequence[float], Sequence[float]] | None = None,
              logged: tuple[Sequence[float], Sequence[float]] | None = None,
              ends: tuple[float, float] | None = None, color: str = "tab:blue",
              step_label: str = "plan, step by step", logged_label: str = "per epoch") -> None:
    """One knob panel: the per-step line (``steps``: x, values), the per-epoch markers (``logged``), the
    easy/hard ends as dashed lines, the knob's title and y label. The x axis is left to :func:`epoch_axis`.

    A label starting with ``_`` keeps its line out of the legend (matplotlib's rule)."""
    if steps is not None:
        axis.plot(steps[0], steps[1], drawstyle="steps-pre", color=color, linewidth=1.2, label=step_label)
    if logged is not None:
        axis.plot(logged[0], logged[1], linestyle="none" if steps is not None else "-", marker="o", markersize=3.5,
                  color=color, label=logged_label)
    if ends is not None and ends[0] != ends[1]:
        axis.axhline(ends[0], color="tab:green", linestyle="--", linewidth=0.8, label=f"easy {ends[0]:g}")
        axis.axhline(ends[1], color="tab:red", linestyle="--", linewidth=0.8, label=f"hard {ends[1]:g}")
    title, ylabel = knob_label(name)
    axis.set_title(title, fontsize=10)
    axis.set_ylabel(ylabel, fontsize=9)


def side_legend(axis: Any) -> None:
    """The panel's legend outside it, on the right, where it hides no line."""
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=7)


def _cycle_position(plan: Plan) -> tuple[Any, Any]:
    """x (epochs done) ↔ cycle position t, the clock's own map: t at x = e is ``clock.progress(e)``, the
    position of epoch e's start (and, per step, of every step). With the reference normalization t = 1 falls on
    the last epoch's start, x = E − 1 (the last epoch sits on the easy end)."""
    clock = plan.clock
    span = clock.epochs - 1 if clock.normalization == "reference" else clock.epochs
    start, width = clock.start, clock.end - clock.start

    def forward(x: Any) -> Any:
        return start + width * x / span

    def inverse(t: Any) -> Any:
        return (t - start) * span / width

    return forward, inverse


def _run_fraction(plan: Plan) -> tuple[Any, Any]:
    """x (epochs done) ↔ run fraction, 0..E onto 0..1 (the LR's clock)."""
    epochs = plan.epochs
    return (lambda x: x / epochs), (lambda r: r * epochs)


def plan_figure(plan: Plan, steps: Sequence[int] | int | None = None) -> Any:
    """One titled panel per knob against epochs: the knob step by step (a line), each epoch's start value as
    the table prints it (markers), the easy/hard ends; a top axis with the cycle position t (the run fraction
    for a run-long LR). A windowed run also shows the whole cycle, shaded outside the run.

    ``steps`` (per epoch, when known) sets the per-step resolution; without it the curve is sampled finely.

    Example:
        >>> from cycdata.config import parse_config
        >>> from cycdata.plan import Plan
        >>> figure = plan_figure(Plan.from_config(parse_config({"epochs": 4})))
        >>> [axis.get_title() for axis in figure.axes if axis.get_title()][:2]
        ['batch size (samples)', 'learning rate']
    """
    points = points_per_epoch(plan.epochs, steps)
    xs, values = plan_series(plan, points)
    epochs = plan.epochs
    forward, inverse = _cycle_position(plan)
    low, high = 0.0, float(epochs)
    if plan.clock.windowed:  # room for the whole cycle around the run's window
        low, high = min(low, inverse(0.0)), max(high, inverse(1.0))
    columns = 2 if len(plan.knobs) > 1 else 1
    rows = (len(plan.knobs) + columns - 1) // columns
    figure = new_figure(figsize=(7.6 * columns, 3.0 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    offsets = [0, *itertools.accumulate(points)]  # where each epoch's points start in the series
    for axis, knob in zip(axes.flat, plan.knobs):
        series = values[knob.name]
        marks_x, marks_y = [], []
        for epoch, count in enumerate(points):
            inside = series[1 + offsets[epoch] : 1 + offsets[epoch] + count]
            marks_x.append(epoch + logged_positions(inside, inside[0]))
            marks_y.append(inside[0])
        if knob.timeline == "cycle" and plan.clock.windowed:
            whole = [i / 200 for i in range(201)]
            axis.plot([inverse(t) for t in whole], [knob.schedule(t) for t in whole], color="tab:gray", alpha=0.5,
                      linewidth=1, label="whole cycle")
            axis.axvspan(0, epochs, color="tab:blue", alpha=0.06)
        draw_knob(axis, knob.name, steps=(xs, series), logged=(marks_x, marks_y), ends=knob.ends,
                  logged_label="epoch start (table)")
        epoch_axis(axis, epochs, low=low if knob.timeline == "cycle" else 0.0,
                   high=high if knob.timeline == "cycle" else None)
        if knob.timeline == "run":
            top = axis.secondary_xaxis("top", functions=_run_fraction(plan))
            top.set_xlabel("run fraction", fontsize=8)
        else:
            top = axis.secondary_xaxis("top", functions=(forward, inverse))
            top.set_xlabel("cycle position t", fontsize=8)
        top.set_xticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])  # none past 1: the reference clock's last epoch sits at 1
        top.tick_params(labelsize=7)
        side_legend(axis)
    for axis in list(axes.flat)[len(plan.knobs) :]:
        axis.set_visible(False)
    window = f", cycle window t = {plan.clock.start:g}..{plan.clock.end:g}" if plan.clock.windowed else ""
    figure.suptitle(f"cycdata plan: {epochs} epochs, knobs change per {plan.clock.unit}{window}")
    return figure

