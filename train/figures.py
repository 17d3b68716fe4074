"""Figures of runs and suites: ``metrics.png`` and ``knobs.png`` of a run folder, ``accuracy.png`` and
``knobs.png`` of a suite, built by pure functions (written by :func:`cycdata.figures.save_figure`).

The x axis is the one of :mod:`cycdata.figures`: epochs as the console numbers them, a value measured at
the end of console epoch k at x = k. A knob the run's :class:`~cycdata.plan.Plan` gives is drawn step by
step from the plan (deterministic, so rebuilt from the run folder's ``config.yaml``), with the values
metrics.csv logged at each epoch's start as markers on it; a run whose plan cannot be rebuilt (an older
config) gets the logged per-epoch points only.

Example:
    >>> history = [{"epoch": 0, "train_loss": 2.0, "test_nll": 1.9, "train_accuracy": 0.3, "test_accuracy": 0.4,
    ...             "test_ece": 0.1}, {"epoch": 1, "train_loss": 1.5, "test_nll": 1.4, "train_accuracy": 0.5,
    ...             "test_accuracy": 0.6, "test_ece": 0.05}]
    >>> figure = metrics_figure(history)
    >>> [axis.get_title() for axis in figure.axes]
    ['loss (nats per sample)', 'accuracy (%)', 'calibration error (ECE, 0 = calibrated)']
    >>> test = figure.axes[1].lines[1]  # accuracy (%), test: at the console's epochs 1 and 2
    >>> [int(x) for x in test.get_xdata()], [float(y) for y in test.get_ydata()]
    ([1, 2], [40.0, 60.0])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cycdata.config import load_config
from cycdata.figures import (
    draw_knob,
    epoch_axis,
    logged_positions,
    new_figure,
    plan_series,
    points_per_epoch,
    side_legend,
)
from cycdata.plan import Plan

__all__ = ["METRIC_PANELS", "knobs_figure", "metrics_figure", "run_plan", "steps_per_epoch", "suite_accuracy_figure",
           "suite_knobs_figure"]

#: metrics.png: (title, y label, [(column, legend label, scale)]) per panel.
METRIC_PANELS: tuple[tuple[str, str, tuple[tuple[str, str, float], ...]], ...] = (
    ("loss (nats per sample)", "nats",
     (("train_loss", "train (its objective, during the epoch)", 1.0), ("val_nll", "validation NLL", 1.0),
      ("test_nll", "test NLL", 1.0))),
    ("accuracy (%)", "%", (("train_accuracy", "train, during the epoch", 100.0),
                           ("val_accuracy", "validation", 100.0), ("ema_val_accuracy", "validation, model EMA", 100.0),
                           ("test_accuracy", "test", 100.0), ("ema_test_accuracy", "test, model EMA", 100.0))),
    ("calibration error (ECE, 0 = calibrated)", "ECE", (("val_ece", "validation", 1.0), ("test_ece", "test", 1.0),
                                                        ("ema_test_ece", "test, model EMA", 1.0))),
)

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")


def _number(value: Any) -> float:
    """A metrics value as a float; missing or empty (a column another epoch added) is NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def _console_epochs(history: Sequence[Mapping[str, Any]]) -> list[int]:
    """Each row's epoch as the console prints it (metrics.csv counts from 0)."""
    return [int(_number(row["epoch"])) + 1 for row in history]


def run_plan(folder: str | Path) -> Plan | None:
    """The plan of the run in ``folder``, rebuilt from its ``config.yaml``; None when it cannot be (no such
    file, or a config this version no longer reads)."""
    try:
        return Plan.from_config(load_config(Path(folder) / "config.yaml"))
    except (ValueError, OSError, TypeError, KeyError):  # ConfigError is a ValueError
        return None


def steps_per_epoch(history: Sequence[Mapping[str, Any]], plan: Plan) -> list[int] | None:
    """Steps of each of the plan's epochs, estimated as ⌈samples / batch size⌉ from the logged
    ``train_samples`` (all ranks together, so under DDP a finer drawing than the steps, on the same curve) and
    the planned batch size; epochs not run yet take the last logged sample count. None without samples.

    Example:
        >>> from cycdata.config import parse_config
        >>> plan = Plan.from_config(parse_config({"epochs": 3, "data": {"batch_size": 32}}))
        >>> steps_per_epoch([{"epoch": 0, "train_samples": 100.0}], plan)
        [4, 4, 4]
    """
    samples = {int(_number(row["epoch"])): _number(row.get("train_samples")) for row in history}
    known = [count for count in samples.values() if math.isfinite(count) and count > 0]
    if not known:
        return None
    steps, last = [], known[0]
    for epoch in range(plan.epochs):
        count = samples.get(epoch, math.nan)
        last = count if math.isfinite(count) and count > 0 else last
        steps.append(max(1, math.ceil(last / float(plan.at(epoch)["data.batch_size"]))))
    return steps


def metrics_figure(history: Sequence[Mapping[str, Any]], epochs: int | None = None) -> Any | None:
    """Loss, accuracy and calibration of a run against epochs (``epochs``: the axis length, default the last
    logged epoch); None when no panel has data."""
    panels = [panel for panel in METRIC_PANELS if history and any(column in history[-1] for column, _, _ in panel[2])]
    if not panels:
        return None
    x = _console_epochs(history)
    figure = new_figure(figsize=(9, 2.8 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for axis, (title, ylabel, series) in zip(axes, panels):
        for column, label, scale in series:
            if column in history[-1]:
                axis.plot(x, [scale * _number(row.get(column)) for row in history], marker="o", markersize=3,
                          label=label)
        axis.set_title(title, fontsize=10)
        axis.set_ylabel(ylabel, fontsize=9)
        epoch_axis(axis, epochs or max(x))
        side_legend(axis)
    return figure


def _knob_panel(axis: Any, name: str, rows: Sequence[Mapping[str, Any]], plan: Plan | None,
                series: tuple[list[float], dict[str, list[float]]] | None, points: Sequence[int] | None,
                color: str, variant: str | None = None) -> None:
    """One run's knob ``name`` on ``axis``: the plan's per-step line with the logged markers on it, or the
    logged per-epoch values alone, each held through its epoch, when the plan does not give the knob. With
    ``variant`` (a suite's panel) the line is labelled by the variant and the easy/hard ends are left out (one
    pair per variant would clutter)."""
    epochs = [int(_number(row["epoch"])) for row in rows]
    logged = [_number(row.get(name)) for row in rows]
    if plan is None or series is None or points is None or name not in plan.names:
        # Each logged value held through its epoch (k − 1, k]: what a knob that changes per epoch does.
        ends = [epoch + 1 for epoch in epochs]
        held = ([ends[0] - 1, *ends], [logged[0], *logged])
        draw_knob(axis, name, steps=held, logged=(ends, logged), color=color, step_label=variant or "_held",
                  logged_label="_logged" if variant else "metrics.csv (epoch start)")
        return
    xs, values = series
    starts = [0, *itertools.accumulate(points)]  # where each epoch's points start in the series (after x = 0)
    run = [(epoch, value) for epoch, value in zip(epochs, logged) if epoch < plan.epochs]
    marks = [epoch + logged_positions(values[name][1 + starts[epoch] : 1 + starts[epoch + 1]], value)
             for epoch, value in run]
    draw_knob(axis, name, steps=(xs, values[name]), logged=(marks, [value for _, value in run]),
              ends=None if variant else plan.knob(name).ends, color=color,
              step_label=variant or "plan, step by step",
              logged_label="_logged" if variant else "metrics.csv (epoch start)")


def knobs_figure(history: Sequence[Mapping[str, Any]], names: Sequence[str], plan: Plan | None = None,
                 steps: Sequence[int] | int | None = None) -> Any | None:
    """One titled panel per knob in ``names`` against epochs: the plan's per-step value (``plan``, with
    ``steps`` per epoch when known, else estimated from the history) and the logged values as markers; without
    a plan the logged per-epoch points alone. None without knobs."""
    names = [name for name in names if any(name in row for row in history)]
    if not history or not names:
        return None
    series = points = None
    if plan is not None:
        points = points_per_epoch(plan.epochs, steps if steps is not None else steps_per_epoch(history, plan))
        series = plan_series(plan, points)
    epochs = plan.epochs if plan is not None else max(_console_epochs(history))
    columns = 2 if len(names) > 3 else 1
    rows = (len(names) + columns - 1) // columns
    figure = new_figure(figsize=(8.5 * columns, 2.8 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, name in zip(axes.flat, names):
        _knob_panel(axis, name, history, plan, series, points, "tab:blue")
        epoch_axis(axis, epochs)
        side_legend(axis)
    for axis in list(axes.flat)[len(names) :]:
        axis.set_visible(False)
    return figure


def suite_accuracy_figure(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]) -> Any:
    """Accuracy (%) per variant against epochs: the mean over seeds, ± one standard deviation shaded. Runs with a
    validation split draw it (their test split is read at the last epoch only)."""
    import numpy as np

    figure = new_figure(figsize=(10, 4.8))
    axis = figure.subplots()
    longest = 1
    split = "val" if any("val_accuracy" in runs[0][0] for runs in curves.values() if runs and runs[0]) else "test"
    for index, (group, runs) in enumerate(curves.items()):
        accuracy = np.array([[_number(row.get(f"{split}_accuracy")) for row in rows] for rows in runs]) * 100
        mean, std = accuracy.mean(axis=0), accuracy.std(axis=0)
        epochs = np.arange(1, accuracy.shape[1] + 1)
        longest = max(longest, accuracy.shape[1])
        color = _COLORS[index % len(_COLORS)]
        axis.plot(epochs, mean, color=color, label=f"{group} ({len(runs)} seeds)")
        axis.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15)
    name = "validation" if split == "val" else "test"
    axis.set_title(f"{name} accuracy (%), mean ± std over seeds", fontsize=10)
    axis.set_ylabel(f"{name} accuracy (%)")
    epoch_axis(axis, longest)
    side_legend(axis)
    return figure


def suite_knobs_figure(curves: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], names: Sequence[str],
                       plans: Mapping[str, Plan | None] | None = None) -> Any | None:
    """One titled panel per knob, one line per variant (its first seed's run): the variant's plan step by
    step with the logged values on it, or the logged per-epoch points when its plan is not known."""
    plans = plans or {}
    present = [name for name in names if any(name in runs[0][0] for runs in curves.values() if runs and runs[0])]
    if not present:
        return None
    columns = 2 if len(present) > 1 else 1
    rows_count = (len(present) + columns - 1) // columns
    figure = new_figure(figsize=(7.5 * columns, 2.9 * rows_count))
    axes = figure.subplots(rows_count, columns, squeeze=False)
    drawn: dict[str, tuple[Any, list[int]]] = {}  # each variant's plan, sampled once for every panel
    for group, runs in curves.items():
        plan = plans.get(group)
        if plan is not None and runs:
            points = points_per_epoch(plan.epochs, steps_per_epoch(runs[0], plan))
            drawn[group] = (plan_series(plan, points), points)
    longest = max(max((len(runs[0]) for runs in curves.values() if runs), default=1),
                  max((plan.epochs for plan in plans.values() if plan is not None), default=1))
    for axis, name in zip(axes.flat, present):
        for index, (group, runs) in enumerate(curves.items()):
            rows = runs[0]
            if not rows or all(math.isnan(_number(row.get(name))) for row in rows):
                continue
            series, points = drawn.get(group, (None, None))
            _knob_panel(axis, name, rows, plans.get(group), series, points, _COLORS[index % len(_COLORS)],
                        variant=group)
        epoch_axis(axis, longest)
    for axis in list(axes.flat)[len(present) :]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    axes.flat[0].legend(handles, labels, fontsize=7)
    figure.suptitle("knobs per variant (first seed): the plan step by step, dots where metrics.csv logged them",
                    fontsize=10)
    return figure
