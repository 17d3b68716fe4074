"""The trainer end to end: run folder, knob values in metrics.csv and in the optimizer, resume
equivalence, DDP with 2 gloo processes, and bad input refused before training."""

from __future__ import annotations

import csv
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from cycdata.clock import Clock
from cycdata.config import load_config
from cycdata.schedules import Cyclical
from cycdata.train.checkpoint import CheckpointError, load_checkpoint
from cycdata.train.metrics import DeviceSums
from cycdata.train.objectives import Batch, Distillation, FixMatch, Objective, SelfPaced, Supervised
from cycdata.train.trainer import resume, train

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model=test_resnet", "runtime.progress=false", "data.num_workers=0"]


def read_metrics(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cycdata.train.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=env,
    )


def test_cli_train_writes_the_run_folder_with_spec_knob_values(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("train", "epochs=3", *FAST, "optim.weight_decay={easy: 1.0e-5, hard: 8.0e-5}", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "metrics.csv", "knobs.png", "metrics.png", "last.pt", "best.pt"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").epochs == 3
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    clock = Clock(3)
    for row in rows:
        t = clock.progress(int(row["epoch"]))
        assert float(row["optim.weight_decay"]) == pytest.approx(Cyclical(1e-5, 8e-5)(t), abs=1e-12)
        assert float(row["temperature"]) == pytest.approx(Cyclical(0.5, 2.0)(t))
        assert float(row["grad_clip"]) == pytest.approx(Cyclical(0.5, 2.0)(t))
        for metric in ("train_loss", "train_accuracy", "test_accuracy", "test_nll", "test_ece", "images_per_second"):
            assert float(row[metric]) >= 0
    # easy -> hard -> easy for E=3, f=2: t = 0, 0.5, 1
    assert [float(r["temperature"]) for r in rows] == pytest.approx([0.5, 2.0, 0.5])
    assert float(rows[-1]["test_accuracy"]) > 0.5  # it learns: chance is 0.1
    assert "epoch   3/3" in result.stdout and "test" in result.stdout


def test_optimizer_param_groups_carry_the_planned_values(tmp_path: Path) -> None:
    seen: list[tuple[float, float, float]] = []

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        groups = optimizer.param_groups
        decay = [g["weight_decay"] for g in groups if g["weight_decay"] > 0]
        no_decay = [g["weight_decay"] for g in groups if g["weight_decay"] == 0]
        assert len(decay) == 1 and len(no_decay) == 1
        seen.append((decay[0], groups[0]["lr"], groups[1]["lr"]))

    handle = register_optimizer_step_pre_hook(record)
    try:
        config = load_config(
            None,
            [
                "epochs=3",
                *FAST,
                "data.dataset=synthetic:256",
                "data.batch_size=64",
                "optim.weight_decay={easy: 1.0e-5, hard: 8.0e-5}",
            ],
        )
        train(config, tmp_path)
    finally:
        handle.remove()
    steps_per_epoch = 4
    assert len(seen) == 3 * steps_per_epoch
    rows = read_metrics(tmp_path)
    for step, (weight_decay, lr0, lr1) in enumerate(seen):
        epoch = step // steps_per_epoch
        assert weight_decay == pytest.approx(float(rows[epoch]["optim.weight_decay"]), abs=1e-15)
        assert lr0 == lr1 > 0
    lrs = [lr for _, lr, _ in seen]
    assert lrs[0] == pytest.approx(0.01)  # warmup starts at 10% of the peak LR
    assert lrs[steps_per_epoch] == pytest.approx(max(lrs))  # warmup ends after epoch 0, cosine follows
    assert lrs[-1] < lrs[steps_per_epoch]


def test_resume_after_epoch_k_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    overrides = ["epochs=4", *FAST, "data.dataset=synthetic:256", "data.batch_size=64"]
    config = load_config(None, overrides)
    straight = tmp_path / "straight"
    train(config, straight)
    interrupted = tmp_path / "interrupted"
    train(config, interrupted, stop_after=2)
    assert len(read_metrics(interrupted)) == 2
    assert load_checkpoint(interrupted / "last.pt")["epoch"] == 2
    resume(interrupted)
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(interrupted / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    rows_a, rows_b = read_metrics(straight), read_metrics(interrupted)
    assert [r["test_accuracy"] for r in rows_a] == [r["test_accuracy"] for r in rows_b]
    assert [r["train_loss"] for r in rows_a] == [r["train_loss"] for r in rows_b]


def test_cli_resume_continues_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = load_config(None, ["epochs=3", *FAST, "data.dataset=synthetic:128"])
    train(config, out, stop_after=1)
    again = run_cli("train", "epochs=3", *FAST, "data.dataset=synthetic:128", "--out", str(out))
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_cli("train", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert [int(r["epoch"]) for r in read_metrics(out)] == [0, 1, 2]


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(load_config(None, ["epochs=2", *FAST, "data.dataset=synthetic:64"]), out, stop_after=1)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a cycdata checkpoint"):
        resume(out)
    result = run_cli("train", "--resume", str(out))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["data.dataset=cifar10:/nonexistent/cifar"], "cifar"),
        (["model=no_such_model"], "model:"),
        (["semi_supervised.labeled=100000"], "semi_supervised.labeled"),
        (["epochs=1"], "epochs: got 1, must be >= 2"),
    ],
)
def test_bad_input_fails_before_training(tmp_path: Path, args: list[str], words: str) -> None:
    out = tmp_path / "run"
    result = run_cli("train", *FAST, *args, "--out", str(out))
    assert result.returncode == 2
    assert words in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "last.pt").exists()


def test_a_bad_ladder_fails_before_training(tmp_path: Path) -> None:
    ladder = tmp_path / "bad.yaml"
    ladder.write_text("rungs:\n  - []\n  - [{op: rotat, magnitude: 0.5}]\n")
    result = run_cli("train", *FAST, f"augment.ladder={ladder}", "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "augment.ladder" in result.stderr and "did you mean 'rotate'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cyclical_focal_loss_trains(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "epochs=2",
            *FAST,
            "data.dataset=synthetic:128",
            "loss.name=cyclical_focal",
            "loss.gamma_pos=2",
            "loss.gamma_neg=2",
            "loss.gamma_hc=3",
        ],
    )
    row = train(config, tmp_path)
    assert row["loss.xi"] == 1.0  # last epoch of E=2: easy end
    assert [float(r["loss.xi"]) for r in read_metrics(tmp_path)] == [1.0, 1.0]


def test_ddp_two_gloo_processes(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cycdata.train.cli",
            "train",
            "epochs=3",
            *FAST,
            "data.dataset=synthetic:200",
            "data.batch_size={easy: 50, hard: 20}",
            "self_paced.keep={easy: 0.5, hard: 1.0}",
            "runtime.progress=true",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert len(rows) == 3  # written once, by rank 0
    assert result.stdout.count("epoch   3/3") == 1  # one summary line, from rank 0
    # Both ranks selected the same samples (the ledger is all-gathered) and split them disjointly.
    assert [int(r["self_paced.kept"]) for r in rows] == [100, 200, 100]
    assert [float(r["train_samples"]) for r in rows] == [100, 200, 100]
    assert [int(r["data.batch_size"]) for r in rows] == [50, 20, 50]
    state = load_checkpoint(out / "last.pt")
    assert len(state["rng"]) == 2  # RNG state of both ranks
    assert not any(k.startswith("module.") for k in state["model"])  # saved unwrapped


def test_train_drives_batch_size_and_self_paced_selection(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "epochs=3",
            *FAST,
            "data.dataset=synthetic:300",
            "data.batch_size={easy: 100, hard: 30}",
            "self_paced.keep={easy: 0.5, hard: 1.0}",
            "data.lr_coupling=linear",
        ],
    )
    train(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert [int(r["data.batch_size"]) for r in rows] == [100, 30, 100]
    assert [int(r["self_paced.kept"]) for r in rows] == [150, 300, 150]
    assert [int(r["self_paced.nonfinite"]) for r in rows] == [0, 0, 0]  # no NaN/inf loss was recorded
    assert [float(r["train_samples"]) for r in rows] == [150, 300, 150]
    # linear LR coupling: the LR at epoch 1 is scaled by 30/100 of the planned value
    assert float(rows[1]["optim.lr"]) < float(rows[0]["optim.lr"]) or float(rows[1]["optim.lr"]) < 0.1 * 0.3 + 1e-9


def test_self_paced_run_resumes_exactly(tmp_path: Path) -> None:
    overrides = [
        "epochs=4",
        *FAST,
        "data.dataset=synthetic:256",
        "data.batch_size={easy: 64, hard: 32}",
        "self_paced.keep={easy: 0.5, hard: 1.0}",
        "self_paced.weighting=linear",
        "self_paced.ema=0.5",
    ]
    config = load_config(None, overrides)
    train(config, tmp_path / "straight")
    train(config, tmp_path / "interrupted", stop_after=2)
    resume(tmp_path / "interrupted")
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "interrupted" / "last.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert torch.equal(
        a["data_state"]["ledger"]["losses"].nan_to_num(-1), b["data_state"]["ledger"]["losses"].nan_to_num(-1)
    )


def test_batch_level_self_paced_masks_losses(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "epochs=3",
            *FAST,
            "data.dataset=synthetic:200",
            "data.batch_size=50",
            "self_paced.keep={easy: 0.5, hard: 1.0}",
            "self_paced.level=batch",
        ],
    )
    train(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert [float(r["train_samples"]) for r in rows] == [200, 200, 200]  # the sampler keeps everything
    assert "self_paced.kept" not in rows[0]


@pytest.mark.slow  # 31 s; the semi-supervised example trains by default
def test_semi_supervised_on_100_mnist_labels(tmp_path: Path) -> None:
    config = load_config(
        None,
        [
            "epochs=3",
            *FAST,
            "semi_supervised.labeled=100",
            "data.batch_size=64",
            "semi_supervised.ratio={easy: 0, hard: 3}",
        ],
    )
    train(config, tmp_path)
    rows = read_metrics(tmp_path)
    assert [float(r["semi_supervised.ratio"]) for r in rows] == [0.0, 3.0, 0.0]
    assert float(rows[0]["unlabeled_samples"]) == 0 and float(rows[1]["unlabeled_samples"]) == 63 * 64 * 3
    assert 0 < float(rows[1]["semi_supervised.coverage"]) <= 1
    assert 0 <= float(rows[1]["pseudo_label_rate"]) <= 1
    assert float(rows[-1]["test_accuracy"]) > 0.3  # 100 labels, 3 short epochs of a tiny model: well above chance


def test_lr_follows_one_clock_when_the_batch_size_cycles(tmp_path: Path) -> None:
    lrs: list[float] = []
    handle = register_optimizer_step_pre_hook(lambda optimizer, *_: lrs.append(optimizer.param_groups[0]["lr"]))
    try:
        config = load_config(
            None,
            [
                "epochs=4",
                *FAST,
                "data.dataset=synthetic:240",
                "optim.warmup_epochs=0",
                "data.batch_size={easy: 80, hard: 20}",
                "schedule_unit=step",
            ],
        )
        train(config, tmp_path)
    finally:
        handle.remove()
    steps = [3, 6, 6, 3]  # 240 samples in batches of 80, 40, 40, 80 (E=4, f=2: ξ = 1, 1/3, 1/3, 1)
    assert [int(r["data.batch_size"]) for r in read_metrics(tmp_path)] == [80, 40, 40, 80]
    assert len(lrs) == sum(steps)
    # The cosine LR moves by the share of samples seen, so it falls monotonically across epochs
    # whatever the number of steps per epoch: no jump back, no "stepped too many times".
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(lrs))
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] < 0.01


def test_train_with_a_cyclical_ladder_logs_the_strength(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "epochs=3",
        *FAST,
        "data.dataset=synthetic:256",
        "augment.ladder=default",
        "augment.strength={easy: 0, hard: 1}",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    assert [float(r["augment.strength"]) for r in rows] == [0.0, 1.0, 0.0]
    assert "augment.strength 1" in result.stdout  # the summary line shows it too
    # The default ladder's top rung mixes batches (cutmix): training on soft targets works end to end.
    assert all(float(r["train_loss"]) > 0 for r in rows)


# ---- The pieces of the step: named metric sums on the device and the composed objective.
# Golden values are worked out by hand: CE([2, 0] -> 0) = log(1 + e^-2), CE([0, 1] -> 0) = log(1 + e).

CE = [0.126928, 1.313262]


def _batch(logits: torch.Tensor, labels: list[int], labeled: int, **knobs: float) -> Batch:
    return Batch(logits, torch.tensor(labels), torch.tensor(labels[:labeled]), labeled,
                 torch.zeros(len(logits), 1, 2, 2), knobs)


class _UniformTeacher(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(images), 2)


def test_device_sums_add_by_name_without_a_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    sums = DeviceSums(("loss", "correct", "samples"))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("add() read a tensor value on the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu"):
            patch.setattr(torch.Tensor, name, refuse)
        for losses, correct in ((torch.tensor([0.5, 1.5]), torch.tensor(1)), (torch.tensor([2.0]), torch.tensor(0))):
            sums.add({"loss": losses.sum(), "correct": correct}, samples=len(losses))
    assert sums.totals() == {"loss": 4.0, "correct": 1.0, "samples": 3.0}
    assert sums["loss"].dtype == torch.float64
    with pytest.raises(KeyError, match="no metric sum named 'lost'"):
        sums.add(lost=1.0)
    with pytest.raises(ValueError, match="distinct names"):
        DeviceSums(("loss", "loss"))


def test_objective_supervised_self_paced_and_tempered_golden_values() -> None:
    config = load_config(None, ["epochs=2"])
    batch = _batch(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), [0, 0], 2)
    loss, per_sample, sums = Objective(Supervised(config))(batch, None)
    assert per_sample.tolist() == pytest.approx(CE, abs=1e-6)
    assert loss.item() == pytest.approx(sum(CE) / 2, abs=1e-6)
    assert {name: float(value) for name, value in sums.items()} == pytest.approx(
        {"loss": sum(CE), "correct": 1.0, "samples": 2.0}, abs=1e-6)
    # Self-paced weights scale each sample; the sum is divided by the batch size, not by Σv.
    loss, _, _ = Objective(Supervised(config))(batch, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(CE[0] / 2, abs=1e-6)
    # The batch-level rule (hard, threshold 1.0) keeps only the sample below the threshold.
    loss, _, _ = Objective(Supervised(config), SelfPaced(threshold=1.0))(batch, None)
    assert loss.item() == pytest.approx(CE[0] / 2, abs=1e-6)
    # CST: the loss sees z / T (T = 2: CE([1, 0] -> 0) = log(1 + 1/e), CE([0, 0.5] -> 0) = log(1 + √e)).
    _, per_sample, _ = Objective(Supervised(config, lambda z: z / 2.0))(batch, None)
    assert per_sample.tolist() == pytest.approx([0.313262, 0.974077], abs=1e-6)


def test_objective_blends_distillation_but_the_ledger_keeps_the_supervised_loss() -> None:
    config = load_config(None, ["epochs=2"])
    batch = _batch(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), [0, 0], 2, **{"distill.weight": 0.25,
                                                                          "distill.temperature": 1.0})
    # A uniform teacher: KD_i = KL(u ‖ p_i) = −log 2 − ½·(log p_i0 + log p_i1).
    kd = [-math.log(2) + 0.5 * (CE[0] + CE[0] + 2.0), -math.log(2) + 0.5 * (CE[1] + CE[1] - 1.0)]
    objective = Objective(Supervised(config), distillation=Distillation(_UniformTeacher()))
    loss, per_sample, sums = objective(batch, None)
    assert per_sample.tolist() == pytest.approx(CE, abs=1e-6)  # what the ledger records and self-paced judges
    assert loss.item() == pytest.approx(sum(0.75 * c + 0.25 * k for c, k in zip(CE, kd)) / 2, abs=1e-6)
    assert float(sums["distill"]) == pytest.approx(sum(kd), abs=1e-6)
    assert objective.sums == ("loss", "correct", "samples", "distill")


def test_fixmatch_term_golden_values_and_nan_metrics_without_unlabeled_samples() -> None:
    config = load_config(None, ["epochs=2"])
    # Unlabeled: weak views [3, 0] (p = 0.953 ≥ τ, pseudo-label 0) and [0, 0.5] (p = 0.62: masked out);
    # the confident one's strong view [0, 0] costs log 2; the term is λ times the mean over both.
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5], [0.0, 0.0], [9.0, 0.0]])
    objective = Objective(Supervised(config), fixmatch=FixMatch(confidence=0.9, weight=2.0))
    loss, _, sums = objective(_batch(logits, [0, 0, 1, 1], 2), None)
    assert loss.item() == pytest.approx(sum(CE) / 2 + 2.0 * math.log(2) / 2, abs=1e-6)
    assert {name: float(sums[name]) for name in FixMatch.sums} == pytest.approx(
        {"unlabeled_loss": math.log(2), "confident": 1.0, "unlabeled": 2.0, "pseudo_correct": 0.0}, abs=1e-6)
    # No unlabeled sample in the batch (ratio 0): no term, and NaN rather than 0 for its rates.
    loss, _, sums = objective(_batch(logits[:2], [0, 0], 2), None)
    assert loss.item() == pytest.approx(sum(CE) / 2, abs=1e-6)
    totals = {name: float(value) for name, value in sums.items()}
    metrics = objective.metrics(totals, {"grad_norm": 1.5})
    assert list(metrics) == ["train_loss", "train_accuracy", "train_samples", "grad_norm", "unlabeled_loss",
                             "unlabeled_samples", "pseudo_label_rate", "pseudo_label_accuracy"]  # the CSV's columns
    assert metrics["unlabeled_samples"] == 0 and math.isnan(metrics["pseudo_label_rate"])
    assert math.isnan(metrics["unlabeled_loss"]) and math.isnan(metrics["pseudo_label_accuracy"])
