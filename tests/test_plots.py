"""Plots a reader understands at a glance: every panel titled, epochs numbered as the console numbers them
(the first epoch at x = 1), the per-step LR drawn as it moves (checked against the LR the optimizer really
used), the plan against epochs with the cycle position on a top axis, and the per-epoch fallback for runs
whose plan cannot be rebuilt."""

from __future__ import annotations

import csv
import io
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cycdata.clock import Clock
from cycdata.config import load_config, parse_config
from cycdata.figures import plan_figure
from cycdata.plan import Plan

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4  # 128 training samples in batches of 32


def panels(figure: Any) -> list[Any]:
    return [axis for axis in figure.axes if axis.get_visible()]


def panel(figure: Any, title: str) -> Any:
    found = [axis for axis in panels(figure) if axis.get_title() == title]
    assert len(found) == 1, [axis.get_title() for axis in panels(figure)]
    return found[0]


def line(axis: Any, label: str) -> Any:
    found = [artist for artist in axis.lines if artist.get_label() == label]
    assert len(found) == 1, [artist.get_label() for artist in axis.lines]
    return found[0]


def drawn(figure: Any) -> None:
    """Lay the figure out as a PNG would be (secondary axes take their limits at draw time)."""
    figure.savefig(io.BytesIO(), format="png")


def value_at(artist: Any, x: float) -> float:
    """The y a steps-pre line shows just left of ``x`` (its points sit at the end of each step)."""
    xs, ys = list(artist.get_xdata()), list(artist.get_ydata())
    index = min(range(len(xs)), key=lambda i: abs(xs[i] - x))
    assert xs[index] == pytest.approx(x)
    return float(ys[index])


def test_plan_plot_titles_each_knob_against_epochs_with_the_cycle_position_on_top() -> None:
    plan = Plan.from_config(parse_config({"epochs": 6, "optim": {"lr": 0.1, "warmup_epochs": 0}}))
    figure = plan_figure(plan, steps=5)
    titles = [axis.get_title() for axis in panels(figure)]
    assert len(titles) == len(plan.knobs) and all(titles)
    assert {"learning rate", "weight decay (CWD)", "softmax temperature (CST)", "batch size (samples)",
            "gradient-clip threshold (CGC)"} <= set(titles)
    assert not any(title in plan.names for title in titles)  # readable words, not config keys
    for axis in panels(figure):
        assert axis.get_xlabel() == "epoch" and axis.get_ylabel()
        assert list(axis.get_xticks()) == [1, 2, 3, 4, 5, 6] and axis.get_xlim() == (0, 6)
    for axis in panels(figure):
        (top,) = axis.child_axes
        assert top.get_xlabel() == ("run fraction" if axis.get_title() == "learning rate" else "cycle position t")
    drawn(figure)
    lr_top = panel(figure, "learning rate").child_axes[0]
    assert lr_top.get_xlim() == pytest.approx((0.0, 1.0))  # x = 0..E is the run, 0..1
    # The cycle axis reads the clock's t at each epoch's start x = e (the reference clock: the last epoch at t = 1).
    clock = Clock(epochs=6)
    temperature = panel(figure, "softmax temperature (CST)")
    for epoch in (1, 3, 5):
        temperature.set_xlim(0, epoch)
        drawn(figure)
        assert temperature.child_axes[0].get_xlim() == pytest.approx((0.0, clock.progress(epoch)))


def test_plan_plot_with_the_papers_clock_maps_the_epochs_onto_the_cycle() -> None:
    plan = Plan.from_config(parse_config({"epochs": 5, "normalization": "paper"}))
    figure = plan_figure(plan)
    drawn(figure)
    for axis in panels(figure):
        assert axis.get_xlim() == (0, 5)
        assert axis.child_axes[0].get_xlim() == pytest.approx((0.0, 1.0))  # x = 0..E reads t = 0..1


def test_plan_plot_draws_the_lr_step_by_step_and_each_epochs_value_at_its_end() -> None:
    plan = Plan.from_config(parse_config({"epochs": 6, "optim": {"lr": 0.1, "warmup_epochs": 0}}))
    figure = plan_figure(plan, steps=5)
    lr = line(panel(figure, "learning rate"), "plan, step by step")
    assert len(lr.get_xdata()) > plan.epochs and lr.get_drawstyle() == "steps-pre"
    for epoch, step in ((0, 0), (0, 3), (2, 1), (5, 4)):
        run_fraction = (epoch + step / 5) / 6
        cosine = 0.05 * (1 + math.cos(math.pi * run_fraction))  # the cosine LR from 0.1 to 0, by hand
        assert value_at(lr, epoch + (step + 1) / 5) == pytest.approx(cosine)
    # A knob held through each epoch (schedule_unit=epoch): its dot at the epoch's end, x = 1 for epoch 1.
    decay = line(panel(figure, "weight decay (CWD)"), "epoch start (table)")
    assert list(decay.get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(decay.get_ydata()) == pytest.approx(plan.values()["optim.weight_decay"])


def test_plan_plot_of_a_window_maps_the_run_onto_its_part_of_the_cycle() -> None:
    plan = Plan.from_config(parse_config({"epochs": 4, "cycle": {"end": 0.5}}))
    figure = plan_figure(plan)
    temperature = panel(figure, "softmax temperature (CST)")
    line(temperature, "whole cycle")
    assert temperature.get_xlim() == pytest.approx((0, 6))  # room for the whole cycle: t = 1 at x = 6
    clock = Clock(epochs=4, end=0.5)
    temperature.set_xlim(0, 3)
    drawn(figure)
    assert temperature.child_axes[0].get_xlim() == pytest.approx((0.0, clock.progress(3))) == (0.0, 0.5)
    assert "cycle window t = 0..0.5" in figure.get_suptitle()


def test_long_runs_get_integer_ticks_from_the_first_epoch() -> None:
    figure = plan_figure(Plan.from_config(parse_config({"epochs": 90})))
    ticks = list(panels(figure)[0].get_xticks())
    assert ticks[0] == 1 and ticks[-1] == 90 and all(float(t).is_integer() for t in ticks) and len(ticks) <= 12


def test_plan_cli_writes_the_png(tmp_path: Path) -> None:
    out = tmp_path / "plan.png"
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "plan", "epochs=5", "--plot", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000


def test_importing_cycdata_imports_neither_matplotlib_nor_torch() -> None:
    code = "import sys, cycdata, cycdata.figures; print(sorted({'matplotlib', 'torch'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- a real run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """A 3-epoch run of 4 steps per epoch, and the learning rate the optimizer had at each of its steps."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from cycdata.train.trainer import train

    folder = tmp_path_factory.mktemp("plots") / "run"
    config = load_config(None, ["epochs=3", "model=test_resnet", "runtime.progress=false", "data.num_workers=0",
                                "data.train_limit=128", "data.batch_size=32", "optim.lr=0.1",
                                "optim.warmup_epochs=1"])
    used: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used.append(float(optimizer.param_groups[0]["lr"])))
    try:
        with torch.random.fork_rng():
            train(config, folder)
    finally:
        handle.remove()
    assert len(used) == 3 * STEPS
    return folder, used


def read_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_run_knobs_follow_the_lr_the_optimizer_used_step_by_step(short_run: tuple[Path, list[float]]) -> None:
    from cycdata.train.figures import knobs_figure, run_plan
    from cycdata.train.metrics import KNOB_PREFIXES

    folder, used = short_run
    assert (folder / "knobs.png").stat().st_size > 10_000 and (folder / "metrics.png").stat().st_size > 10_000
    rows = read_rows(folder)
    names = [name for name in rows[-1] if name.startswith(KNOB_PREFIXES)]
    plan = run_plan(folder)
    assert plan is not None
    figure = knobs_figure(rows, names, plan)
    assert len(panels(figure)) == len(names) and all(axis.get_title() for axis in panels(figure))
    for axis in panels(figure):
        assert axis.get_xlabel() == "epoch" and list(axis.get_xticks()) == [1, 2, 3]
    lr_panel = panel(figure, "learning rate")
    lr = line(lr_panel, "plan, step by step")
    assert len(lr.get_xdata()) > len(rows)
    for step, value in enumerate(used):  # step s of epoch e ends at x = e + (s + 1)/4
        epoch, within = divmod(step, STEPS)
        assert value_at(lr, epoch + (within + 1) / STEPS) == pytest.approx(value, rel=1e-6)
    logged = line(lr_panel, "metrics.csv (epoch start)")
    assert list(logged.get_xdata()) == pytest.approx([0.25, 1.25, 2.25])  # the first step of each epoch
    assert list(logged.get_ydata()) == pytest.approx([used[0], used[STEPS], used[2 * STEPS]])
    decay = line(panel(figure, "weight decay (CWD)"), "metrics.csv (epoch start)")
    assert list(decay.get_xdata()) == [1, 2, 3]  # held through each epoch: drawn at its end
    assert list(decay.get_ydata()) == pytest.approx([float(row["optim.weight_decay"]) for row in rows])


@pytest.mark.slow
def test_run_metrics_are_drawn_at_the_console_epochs(short_run: tuple[Path, list[float]]) -> None:
    from cycdata.train.figures import metrics_figure

    rows = read_rows(short_run[0])
    figure = metrics_figure(rows)
    assert [axis.get_title() for axis in panels(figure)] == [
        "loss (nats per sample)", "accuracy (%)", "calibration error (ECE, 0 = calibrated)"]
    accuracy = line(panel(figure, "accuracy (%)"), "test")
    assert list(accuracy.get_xdata()) == [1, 2, 3]
    assert list(accuracy.get_ydata()) == pytest.approx([100 * float(row["test_accuracy"]) for row in rows])
    assert all(axis.get_xlabel() == "epoch" and axis.get_ylabel() for axis in panels(figure))


@pytest.mark.slow
def test_a_run_whose_plan_cannot_be_rebuilt_gets_its_logged_epoch_points(
        short_run: tuple[Path, list[float]], tmp_path: Path) -> None:
    from cycdata.train.figures import knobs_figure, run_plan

    rows = read_rows(short_run[0])
    (tmp_path / "config.yaml").write_text("epochs: 3\nno_such_key: 1\n")  # a config this version cannot read
    assert run_plan(tmp_path) is None and run_plan(tmp_path / "missing") is None
    figure = knobs_figure(rows, ["optim.lr", "temperature"], None)
    lr = line(panel(figure, "learning rate"), "metrics.csv (epoch start)")
    assert list(lr.get_xdata()) == [1, 2, 3]
    assert list(lr.get_ydata()) == pytest.approx([float(row["optim.lr"]) for row in rows])
    assert all(axis.get_xlabel() == "epoch" for axis in panels(figure))


@pytest.mark.slow
def test_suite_figures_are_titled_with_each_variants_plan(short_run: tuple[Path, list[float]]) -> None:
    from cycdata.train.experiment import KNOB_COLUMNS
    from cycdata.train.figures import run_plan, suite_accuracy_figure, suite_knobs_figure

    folder, used = short_run
    rows = [{name: float(value) for name, value in row.items()} for row in read_rows(folder)]
    curves = {"cyclical": [rows, rows]}
    accuracy = suite_accuracy_figure(curves)
    (axis,) = panels(accuracy)
    assert axis.get_title() == "test accuracy (%), mean ± std over seeds" and axis.get_xlabel() == "epoch"
    assert list(line(axis, "cyclical (2 seeds)").get_xdata()) == [1, 2, 3]
    knobs = suite_knobs_figure(curves, KNOB_COLUMNS, {"cyclical": run_plan(folder)})
    lr = line(panel(knobs, "learning rate"), "cyclical")
    assert value_at(lr, 1 + 1 / STEPS) == pytest.approx(used[STEPS], rel=1e-6)
    assert all(axis.get_title() and axis.get_xlabel() == "epoch" for axis in panels(knobs))
