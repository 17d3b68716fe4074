"""The model side of the cycle: cycle windows (pre-training + fine-tuning as one cycle), --init weights,
and knowledge distillation with a cyclical temperature."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from cycdata.clock import Clock
from cycdata.config import ConfigError, load_config
from cycdata.plan import Plan
from cycdata.schedules import Cyclical
from cycdata.train.checkpoint import CheckpointError
from cycdata.train.losses import distillation_loss
from cycdata.train.trainer import train
from cycdata.train.weights import build_teacher, load_weights

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=test_resnet", "runtime.progress=false"]
CYCLE_KNOBS = ("optim.weight_decay", "temperature", "grad_clip", "augment.strength", "data.batch_size",
               "self_paced.keep")


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cycdata.train.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def test_clock_window_maps_the_run_onto_part_of_the_cycle() -> None:
    assert [Clock(3, start=0.0, end=0.5).progress(e) for e in range(3)] == [0.0, 0.25, 0.5]
    assert [Clock(3, start=0.5, end=1.0).progress(e) for e in range(3)] == [0.5, 0.75, 1.0]
    assert [Clock(4, normalization="paper", start=0.5).progress(e) for e in range(4)] == [0.5, 0.625, 0.75, 0.875]
    assert Clock(5, unit="step", start=0.2, end=0.6).progress(2, 0.5) == pytest.approx(0.2 + 0.4 * 2.5 / 4)
    for start, end in ((0.5, 0.5), (0.6, 0.2), (-0.1, 0.5), (0.0, 1.5), (math.nan, 1.0)):
        with pytest.raises(ValueError, match="0 <= start < end <= 1"):
            Clock(4, start=start, end=end)


@pytest.mark.parametrize(("overrides", "words"), [
    (["cycle.start=0.5", "cycle.end=0.5"], "start (0.5) must be below end (0.5)"),
    (["cycle.start=-0.1"], "cycle.start: got -0.1, must be >= 0 and < 1"),
    (["cycle.end=1.5"], "cycle.end: got 1.5, must be > 0 and <= 1"),
    (["cycle.middle=0.5"], "cycle.middle: unknown key"),
    (["distill={weight: 0.5}"], "distill.teacher: is required"),
    (["distill.teacher=x.pt", "distill.weight=1.5"], "distill.weight"),
])
def test_bad_windows_and_distill_settings_fail_up_front(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, overrides)


def test_two_windowed_plans_join_into_one_cycle() -> None:
    common = ["epochs=4", "self_paced.keep={easy: 0.5, hard: 1.0}", "data.batch_size={easy: 256, hard: 64}"]
    first = Plan.from_config(load_config(None, [*common, "cycle={start: 0.0, end: 0.5}"]))
    second = Plan.from_config(load_config(None, [*common, "cycle={start: 0.5, end: 1.0}"]))
    t = first.progress() + second.progress()
    assert t == pytest.approx([0, 1 / 6, 1 / 3, 0.5, 0.5, 2 / 3, 5 / 6, 1])
    for name in ("optim.weight_decay", "temperature", "grad_clip", "augment.strength", "self_paced.keep"):
        joined = first.values()[name] + second.values()[name]
        knob = first.knob(name)
        assert joined == pytest.approx([knob.schedule(x) for x in t]), name
    assert "covers t = 0.5 .. 1" in second.table()
    assert json.loads(second.to_json())["cycle"]["start"] == 0.5


def test_cli_plan_plots_the_window_inside_the_whole_cycle(tmp_path: Path) -> None:
    result = cli("plan", "epochs=4", "cycle.end=0.5", "--plot", str(tmp_path / "plan.png"))
    assert result.returncode == 0, result.stderr
    assert "covers t = 0 .. 0.5" in result.stdout and (tmp_path / "plan.png").stat().st_size > 10_000


def _assert_easy_hard_easy(values: list[float], easy: float, hard: float, name: str) -> None:
    assert values[0] == pytest.approx(easy) and values[-1] == pytest.approx(easy), name
    peak = values.index(max(values, key=lambda v: abs(v - easy)))
    assert values[peak] == pytest.approx(hard), name
    rising, falling = values[: peak + 1], values[peak:]
    direction = 1 if hard > easy else -1
    assert all(direction * (b - a) >= -1e-12 for a, b in itertools.pairwise(rising)), name
    assert all(direction * (b - a) <= 1e-12 for a, b in itertools.pairwise(falling)), name


@pytest.mark.slow  # 29 s, the one end-to-end windowed run; the window clock and joined plans are checked by default
def test_pretrain_then_finetune_runs_are_one_cycle(tmp_path: Path) -> None:
    knobs = ["self_paced.keep={easy: 0.5, hard: 1.0}", "data.batch_size={easy: 128, hard: 32}"]
    pre = cli("train", "epochs=3", *FAST, *knobs, "data.dataset=digits", "cycle={start: 0.0, end: 0.5}",
              "--out", str(tmp_path / "pre"))
    assert pre.returncode == 0, pre.stderr
    fine = cli("train", "epochs=3", *FAST, *knobs, "data.dataset=mnist5k", "cycle={start: 0.5, end: 1.0}",
               "optim.lr=0.02", "--init", str(tmp_path / "pre"), "--out", str(tmp_path / "fine"))
    assert fine.returncode == 0, fine.stderr
    assert "loaded" in fine.stdout and "best.pt" in fine.stdout
    rows = metrics(tmp_path / "pre") + metrics(tmp_path / "fine")
    config = load_config(tmp_path / "fine" / "config.yaml")
    ends = {"optim.weight_decay": config.optim.weight_decay, "temperature": config.temperature,
            "grad_clip": config.grad_clip.threshold, "augment.strength": config.augment.strength,
            "data.batch_size": config.data.batch_size, "self_paced.keep": config.self_paced.keep}
    for name in CYCLE_KNOBS:
        schedule = ends[name]
        assert isinstance(schedule, Cyclical)
        _assert_easy_hard_easy([float(row[name]) for row in rows], schedule.easy, schedule.hard, name)
    assert float(rows[-1]["test_accuracy"]) > 0.5


def test_init_rejects_a_missing_file_before_training(tmp_path: Path) -> None:
    result = cli("train", "epochs=2", *FAST, "--init", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "no weights file" in result.stderr
    assert not (tmp_path / "run" / "metrics.csv").exists()


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def test_load_weights_resizes_the_head_and_adapts_input_channels(tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=10, in_chans=3)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    target = timm.create_model("test_resnet", num_classes=4, in_chans=1)
    report = load_weights(target, path)
    assert report.new_head == ["fc.bias", "fc.weight"] and report.adapted == ["conv1.0.weight"]
    assert torch.equal(target.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    assert target.fc.weight.shape == (4, target.fc.weight.shape[1])


def test_load_weights_refuses_another_architecture(tmp_path: Path) -> None:
    path = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=10).state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_weights(timm.create_model("test_resnet", num_classes=10), path)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read weights"):
        load_weights(timm.create_model("test_resnet", num_classes=10), tmp_path / "junk.pt")


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


def test_distillation_loss_matches_a_hand_computed_value() -> None:
    student = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    teacher = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    temperature = 2.0

    def softmax(row: list[float]) -> list[float]:
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    expected = []
    for s, t in zip(student.tolist(), teacher.tolist()):
        p_s, p_t = softmax(s), softmax(t)
        expected.append(temperature**2 * sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s)))
    got = distillation_loss(student, teacher, temperature, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(student, teacher, temperature).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    student.requires_grad_(True)
    distillation_loss(student, teacher, temperature).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(student, teacher, 0.0)
    with pytest.raises(ValueError, match="same classes"):
        distillation_loss(student, teacher[:, :2], 1.0)


def test_distillation_from_a_trained_teacher(tmp_path: Path) -> None:
    teacher_run = tmp_path / "teacher"
    train(load_config(None, ["epochs=2", *FAST]), teacher_run)
    config = load_config(None, ["epochs=3", *FAST, f"distill.teacher={teacher_run}",
                                "distill.temperature={easy: 1.0, hard: 4.0}", "distill.weight=0.7"])
    row = train(config, tmp_path / "student")
    rows = metrics(tmp_path / "student")
    assert [float(r["distill.temperature"]) for r in rows] == pytest.approx([1.0, 4.0, 1.0])
    assert all(float(r["distill_loss"]) >= 0 for r in rows) and row["test_accuracy"] > 0.3
    teacher, description = build_teacher(str(teacher_run / "best.pt"), num_classes=10, in_chans=1,
                                         device=torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert "teacher test_resnet" in description


def test_bad_teachers_fail_before_training(tmp_path: Path) -> None:
    five = tmp_path / "five.pth"
    torch.save(timm.create_model("test_resnet", num_classes=5, in_chans=1).state_dict(), five)
    for teacher, words in ((str(tmp_path / "missing.pt"), "no such file or folder"),
                           (f"test_resnet:{five}", "is for 5 classes, the data has 10"),
                           (f"no_such_model:{five}", "Unknown model")):
        result = cli("train", "epochs=2", *FAST, f"distill.teacher={teacher}", "--out", str(tmp_path / "run"))
        assert result.returncode == 2, result.stderr
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run" / "metrics.csv").exists()


def test_every_plan_knob_is_logged_and_plotted_as_a_knob() -> None:
    """The run logger's knob panels and the progress line pick knobs by KNOB_PREFIXES: none may be missed."""
    from cycdata.config import parse_config
    from cycdata.plan import Plan
    from cycdata.train.metrics import KNOB_PREFIXES

    common = {"optim": {"momentum": {"easy": 0.85, "hard": 0.95}}, "distill": {"teacher": "runs/teacher"}}
    extra = {"self_paced": {"keep": {"easy": 0.5, "hard": 1.0}}, "semi_supervised": {"labeled": 100}}
    names = Plan.from_config(parse_config({**common, **extra})).names
    assert {"distill.temperature", "distill.weight", "optim.momentum", "self_paced.keep",
            "semi_supervised.ratio"} <= set(names)
    assert [name for name in names if not name.startswith(KNOB_PREFIXES)] == []
