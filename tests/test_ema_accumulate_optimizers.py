"""Model EMA, gradient accumulation and any timm optimizer by name, in the trainer."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cycdata.config import ConfigError, load_config, parse_config
from cycdata.plan import Plan
from cycdata.train.builders import build_optimizer, check_optimizer
from cycdata.train.checkpoint import load_checkpoint
from cycdata.train.hooks import CyclicalHooks
from cycdata.train.trainer import resume, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=test_resnet", "runtime.progress=false", "data.num_workers=0", "data.dataset=synthetic:200",
        "data.batch_size=50"]


def write_image_folder(root: Path, per_class: dict[str, int]) -> Path:
    """An ImageNet-style tree of real digit photos from the embedded MNIST, upscaled past 224 px, two classes."""
    from PIL import Image

    from cycdata.loaders.datasets import load_dataset

    digits = load_dataset("mnist5k").train
    labels = digits.labels.tolist()
    for split, count in per_class.items():
        for label in (0, 1):
            (root / split / f"digit{label}").mkdir(parents=True)
            members = [i for i, value in enumerate(labels) if value == label][:count]
            for n, index in enumerate(members):
                gray = Image.fromarray(digits.images[index][0].numpy()).resize((240 + 16 * (n % 4), 256),
                                                                                 Image.Resampling.BILINEAR)
                gray.convert("RGB").save(root / split / f"digit{label}" / f"{n}.jpg", quality=90)
    return root


def read_metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_accumulation_steps_once_per_window_with_the_knobs_of_its_start(tmp_path: Path) -> None:
    """4 batches an epoch, accumulate 3: windows of 3 and 1 batches, 2 optimizer steps, the per-step LR of
    each window's start (the share of the epoch's samples seen before it)."""
    steps: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, *_: steps.append(optimizer.param_groups[0]["lr"]))
    try:
        config = load_config(None, ["epochs=3", *FAST, "optim.accumulate=3", "schedule_unit=step",
                                    "self_paced.keep=1.0"])
        train(config, tmp_path)
    finally:
        handle.remove()
    plan = Plan.from_config(config)
    expected = [plan.at(epoch, fraction)["optim.lr"] for epoch in range(3) for fraction in (0.0, 0.75)]
    assert steps == pytest.approx(expected)
    rows = read_metrics(tmp_path)
    assert [float(row["train_samples"]) for row in rows] == [200, 200, 200]  # every batch still trains
    # Every sample's loss reached the ledger although only every third batch stepped the optimizer.
    state = load_checkpoint(tmp_path / "last.pt")
    assert bool(state["data_state"]["ledger"]["seen"].all())


def test_accumulated_gradients_are_the_mean_over_the_window(tmp_path: Path) -> None:
    """Accumulating 2 half batches gives the gradient of the whole batch (a model without batch statistics)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    inputs, targets = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    torch.nn.functional.cross_entropy(model(inputs), targets).backward()
    whole = model.weight.grad.clone()
    model.weight.grad = None
    for half in (slice(0, 4), slice(4, 8)):
        (torch.nn.functional.cross_entropy(model(inputs[half]), targets[half]) / 2).backward()
    assert torch.allclose(model.weight.grad, whole, atol=1e-6)


def test_ema_is_evaluated_checkpointed_and_resumes_exactly(tmp_path: Path) -> None:
    overrides = ["epochs=4", *FAST, "optim.accumulate=2", "model_ema={decay: 0.9, warmup: true}"]
    config = load_config(None, overrides)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(config, straight)
    train(config, interrupted, stop_after=2)
    resume(interrupted)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    assert a["optimizer_steps"] == b["optimizer_steps"] == 4 * 2  # 4 batches an epoch, 2 per step
    for name in a["model_ema"]:
        assert torch.equal(a["model_ema"][name], b["model_ema"][name]), name
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    # The EMA is not the model: it trails it.
    weight = next(name for name in a["model"] if name.endswith("weight") and a["model"][name].ndim == 4)
    assert not torch.equal(a["model_ema"][f"module.{weight}"], a["model"][weight])
    rows = read_metrics(straight)
    assert [row["ema_test_accuracy"] for row in rows] == [row["ema_test_accuracy"] for row in read_metrics(interrupted)]
    # best.pt is the epoch with the best EMA accuracy (timm's rule), first of equals.
    accuracies = [float(row["ema_test_accuracy"]) for row in rows]
    assert load_checkpoint(straight / "best.pt")["epoch"] == accuracies.index(max(accuracies)) + 1


def test_a_timm_optimizer_by_name_trains_and_gets_the_cyclical_momentum(tmp_path: Path) -> None:
    config = load_config(None, ["epochs=3", *FAST, "optim.name=lamb", "optim.lr=0.01",
                                "optim.momentum={easy: 0.95, hard: 0.85}"])
    train(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert [float(row["optim.momentum"]) for row in rows] == [0.95, 0.85, 0.95]
    groups = load_checkpoint(tmp_path / "last.pt")["optimizer"]["param_groups"]
    assert all(tuple(group["betas"]) == (0.95, 0.999) for group in groups)  # beta1 driven, beta2 timm's


def test_three_betas_keep_their_other_two_under_a_cyclical_momentum() -> None:
    config = parse_config({"epochs": 3, "optim": {"name": "adan", "momentum": {"easy": 0.95, "hard": 0.9}}})
    plan = Plan.from_config(config)
    optimizer = build_optimizer(torch.nn.Linear(2, 2), config, plan)
    hooks = CyclicalHooks(optimizer, plan, set_lr=True)
    hooks.update(1)
    betas = [tuple(group["betas"]) for group in optimizer.param_groups]
    assert all(len(b) == 3 and b[0] == pytest.approx(0.9) and b[1:] == (0.92, 0.99) for b in betas), betas


@pytest.mark.parametrize(("settings", "words"), [
    ({"optim": {"name": "lamm"}}, "did you mean lamb"),
    ({"optim": {"name": "adagrad", "momentum": {"easy": 0.9, "hard": 0.8}}}, "has no momentum or beta1"),
    ({"optim": {"name": "adagrad", "momentum": 0.5}}, "has no momentum or beta1"),
])
def test_optimizers_that_cannot_take_the_config_are_refused(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        check_optimizer(parse_config(settings))


def test_adagrad_with_the_default_momentum_is_accepted() -> None:
    check_optimizer(parse_config({"optim": {"name": "adagrad"}}))  # the recipe's momentum: nothing to set


def test_plan_refuses_an_unknown_optimizer_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "cycdata.train.cli", "plan", "optim.name=lamm"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "cycdata plan: invalid config: optim.name: timm has no optimizer 'lamm' (did you mean lamb, lambw, lambc?); "
        "timm.optim.list_optimizers() lists them"]


@pytest.mark.slow
def test_a_224px_folder_run_with_ema_and_accumulation_resumes_exactly(tmp_path: Path) -> None:
    """Real image files at 224 px through DataLoader workers (crops from the whole image at each batch's
    strength), EMA and accumulation on: stopped after epoch 2 and resumed, it ends where an uninterrupted
    run ends."""
    folder = write_image_folder(tmp_path / "images", per_class={"train": 12, "val": 4})
    overrides = ["epochs=3", "model=test_resnet", "runtime.progress=false", f"data.dataset=folder:{folder}",
                 "data.image_size=224", "data.placement=workers", "data.num_workers=2", "data.batch_size=8",
                 "optim.accumulate=2", "model_ema={decay: 0.9}", "augment.strength={easy: 0.2, hard: 1.0}"]
    config = load_config(None, overrides)
    assert config.augment.ladder == "auto"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(config, straight)
    train(config, interrupted, stop_after=2)
    resume(interrupted)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(interrupted / "last.pt")
    for part in ("model", "model_ema"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    rows = read_metrics(straight)
    assert len(rows) == 3 and all(row["ema_test_accuracy"] != "" for row in rows)
    assert (straight / "best.pt").is_file()
