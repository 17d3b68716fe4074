"""The evidence protocol: the validation split and the harder regimes (drawn from the training split only,
per seed), the test split read once at the last epoch, choices made on validation only (best.pt, tuning),
the ledger's loss, and the analysis every suite table carries."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from scipy import stats

from cycdata.config import ConfigError, apply_settings, parse_config
from cycdata.loaders.datasets import load_dataset
from cycdata.train import trainer as trainer_module
from cycdata.train.analysis import detection_limit, holm, paired, tost, verdict
from cycdata.train.builders import labeled_subset, run_dataset
from cycdata.train.experiment import Suite, choose_tuned, run_suite, summarize, time_to_level
from cycdata.train.objectives import Batch, Objective, Supervised
from cycdata.train.regimes import long_tailed_counts, noisy_labels, stratified_split

BASE = {"model": "test_resnet", "runtime.progress": False, "data.num_workers": 0, "augment.ladder": "none"}


def config(**settings: object):
    return parse_config(apply_settings(apply_settings({}, BASE), settings))


# --------------------------------------------------------------------------------------------
# The regimes
# --------------------------------------------------------------------------------------------


def _fingerprints(dataset) -> set[bytes]:
    return {image.numpy().tobytes() for image in dataset.images}


def test_validation_split_is_stratified_disjoint_and_from_the_training_split_only() -> None:
    full = load_dataset("mnist5k")
    data = run_dataset(config(**{"data.val_split": 0.1}))
    assert len(data.val) + len(data.train) == len(full.train)
    assert torch.equal(data.test.images, full.test.images)  # the test split is never touched
    assert not _fingerprints(data.val) & _fingerprints(data.train)
    full_counts = torch.bincount(full.train.labels, minlength=10)
    val_counts = torch.bincount(data.val.labels, minlength=10)
    assert (val_counts - (0.1 * full_counts).round().long()).abs().max() <= 0
    assert run_dataset(config()).val is None


def test_draw_seed_zero_keeps_the_subset_of_earlier_versions_and_null_redraws_it_per_seed() -> None:
    full = load_dataset("mnist5k")
    old = labeled_subset(full.train.labels, 500, 10)  # the subset every run trained on before draw_seed existed
    fixed = run_dataset(config(**{"data.train_limit": 500, "seed": 3}))
    assert torch.equal(fixed.train.images, full.train.images[old])
    first = run_dataset(config(**{"data.train_limit": 500, "data.draw_seed": None, "seed": 1}))
    again = run_dataset(config(**{"data.train_limit": 500, "data.draw_seed": None, "seed": 1}))
    other = run_dataset(config(**{"data.train_limit": 500, "data.draw_seed": None, "seed": 2}))
    assert torch.equal(first.train.images, again.train.images)
    assert not torch.equal(first.train.images, other.train.images)
    assert torch.bincount(other.train.labels).tolist() == [50] * 10


def test_label_noise_changes_exactly_its_share_to_other_classes_in_train_and_validation() -> None:
    clean = run_dataset(config(**{"data.val_split": 0.1, "data.train_limit": 1000}))
    noisy = run_dataset(config(**{"data.val_split": 0.1, "data.train_limit": 1000, "data.label_noise": 0.3}))
    assert torch.equal(clean.train.images, noisy.train.images) and torch.equal(clean.val.images, noisy.val.images)
    assert int((clean.train.labels != noisy.train.labels).sum()) == 300
    assert int((clean.val.labels != noisy.val.labels).sum()) == round(0.3 * len(clean.val))
    assert torch.equal(clean.test.labels, noisy.test.labels)
    labels = torch.arange(10).repeat(200)
    flipped = noisy_labels(labels, 0.5, 10, torch.Generator().manual_seed(0))
    changed = flipped != labels
    assert int(changed.sum()) == 1000
    # Uniform over the other nine classes: each offset 1..9 about equally often (chi-square, not a tight bound).
    offsets = torch.bincount((flipped[changed] - labels[changed]) % 10, minlength=10)[1:].double()
    assert stats.chisquare(offsets.numpy()).pvalue > 0.001


def test_imbalance_follows_the_long_tail_and_leaves_validation_and_test_balanced() -> None:
    assert long_tailed_counts([400] * 10, 20.0) == [400, 286, 205, 147, 105, 75, 54, 38, 27, 20]  # floor(400·20^(−c/9))
    data = run_dataset(config(**{"data.val_split": 0.1, "data.imbalance": 20}))
    counts = torch.bincount(data.train.labels, minlength=10).tolist()
    assert counts[0] / counts[-1] == pytest.approx(20, rel=0.1) and counts == sorted(counts, reverse=True)
    val_counts = torch.bincount(data.val.labels, minlength=10)
    assert val_counts.max() - val_counts.min() <= 10  # mnist5k's classes are nearly balanced; the split keeps them


def test_stratified_split_keeps_a_sample_of_every_class_on_both_sides() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2])
    held, kept = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert set(labels[held].tolist()) == {0, 1, 2} and set(labels[kept].tolist()) == {0, 1, 2}
    assert sorted(held.tolist() + kept.tolist()) == list(range(12))


@pytest.mark.parametrize(("key", "value", "message"), [
    ("data.val_split", 0.5, "data.val_split: got 0.5"),
    ("data.label_noise", -0.1, "data.label_noise: got -0.1"),
    ("data.imbalance", 0.5, "data.imbalance: got 0.5"),
    ("self_paced.ledger", "raw", "self_paced.ledger"),
    ("data.test", False, "data.test: false leaves the run nothing to evaluate"),
])
def test_bad_regime_settings_are_one_line_naming_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**{key: value})


# --------------------------------------------------------------------------------------------
# The test split read once; choices made on validation
# --------------------------------------------------------------------------------------------


def test_with_a_validation_split_the_test_split_is_read_at_the_last_epoch_only(tmp_path: Path, monkeypatch) -> None:
    reads: list[tuple[int, str]] = []
    original = trainer_module.evaluate
    epoch = {"now": -1}

    def recording(model, loader, cfg, normalize, runtime, split="test", num_classes=None):
        if split == "val":
            epoch["now"] += 1
        reads.append((epoch["now"], split))
        return original(model, loader, cfg, normalize, runtime, split, num_classes)

    monkeypatch.setattr(trainer_module, "evaluate", recording)
    cfg = config(epochs=3, **{"data.dataset": "synthetic:120", "data.val_split": 0.2, "data.batch_size": 32})
    row = trainer_module.train(cfg, tmp_path / "run")
    assert reads == [(0, "val"), (1, "val"), (2, "val"), (2, "test")]
    with (tmp_path / "run" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["test_accuracy"] for r in rows[:2]] == ["", ""] and rows[2]["test_accuracy"] != ""
    assert all(r["val_accuracy"] for r in rows) and "test_accuracy" in row
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["best_accuracy"] == max(float(r["val_accuracy"]) for r in rows)  # chosen by validation


def _fake_run(folder: Path, epochs: int, val: float, test: float) -> None:
    """A finished run folder's metrics.csv (what tuning and the summary read)."""
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "val_accuracy": val if e == epochs - 1 else 0.1, "val_balanced_accuracy": val,
             "epoch_seconds": 1.0, "test_accuracy": test if e == epochs - 1 else "",
             "test_balanced_accuracy": test if e == epochs - 1 else "", "test_nll": 0.5 if e == epochs - 1 else "",
             "test_ece": 0.05 if e == epochs - 1 else ""} for e in range(epochs)]
    with (folder / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_tuning_chooses_on_validation_even_when_the_test_split_disagrees(tmp_path: Path) -> None:
    suite = Suite.from_mapping({"tune_seeds": 2, "baseline": "a", "base": {"epochs": 2, "data.val_split": 0.1},
                                "tune": {"a": {"optim.weight_decay": [1e-4, 1e-3]}},
                                "variants": {"a": {}, "b": {"temperature": None}}})
    runs = suite.tuning_runs()
    assert {run.seed for run in runs} == {1000, 1001}  # never a reported seed
    assert not any(run.config.data.test for run in runs)  # and never a look at the test split
    for run in runs:  # point 1 is better on validation, point 0 on test
        _fake_run(tmp_path / run.name, 2, val=0.9 if run.index == 1 else 0.8, test=0.99 if run.index == 0 else 0.5)
    tuned = choose_tuned(suite, tmp_path)
    assert tuned == {"a": {"optim.weight_decay": 1e-3}}
    assert json.loads((tmp_path / "tuned.json").read_text())["a"]["chosen"] == {"optim.weight_decay": 1e-3}
    configs = {run.variant: run.config for run in suite.runs(seeds=1, tuned=tuned)}
    # b does not set the weight decay itself: it differs from the tuned baseline in its own knob only
    assert float(configs["a"].optim.weight_decay(0.0)) == float(configs["b"].optim.weight_decay(0.0)) == 1e-3


def test_summary_carries_holm_tost_detection_limit_and_time_to_accuracy(tmp_path: Path) -> None:
    suite = Suite.from_mapping({"seeds": 6, "baseline": "a", "level": 0.5, "base": {"epochs": 2},
                                "variants": {"a": {}, "b": {"temperature": None}, "c": {"grad_clip": None}}})
    for run in suite.runs():  # b: 2 points better; c: within ±0.05 points of a on every seed
        wobble = 0.0005 * (-1) ** run.seed
        shift = {"a": 0.0, "b": 0.02 + wobble, "c": wobble}[run.variant]
        _fake_run(tmp_path / run.name, 2, val=0.6, test=0.90 + 0.01 * run.seed + shift)
    summary = summarize(suite, tmp_path)
    b, c = summary["groups"]["b"]["paired"]["test_accuracy"], summary["groups"]["c"]["paired"]["test_accuracy"]
    raw = [b["p"], c["p"]]
    assert [b["p_holm"], c["p_holm"]] == holm(raw)
    assert b["verdict"] == "better" and c["verdict"] == "equivalent"
    assert summary["groups"]["a"]["epochs_to_level"]["mean"] == 2
    table = (tmp_path / "results.md").read_text()
    assert "TOST" in table and "| b | 6 |" in table and "better" in table and "equivalent" in table


@pytest.mark.slow  # 22 s; the smoke suite runs, resumes and summarises by default
def test_a_tuned_suite_runs_end_to_end_side_by_side(tmp_path: Path) -> None:
    suite = Suite.from_mapping({"seeds": 2, "tune_seeds": 1, "baseline": "a", "jobs": 2,
                                "base": {**BASE, "epochs": 2, "data.dataset": "synthetic:80", "data.val_split": 0.2,
                                         "data.batch_size": 40, "data.draw_seed": None},
                                "tune": {"a": {"optim.weight_decay": [1e-4, 1e-3]}},
                                "variants": {"a": {}, "b": {"temperature": None}}})
    lines: list[str] = []
    summary = run_suite(suite, tmp_path, log=lines.append)
    assert len(lines) == 2 + 4 and (tmp_path / "tuned.json").is_file()
    tuning_rows = (tmp_path / "tune" / "a" / "point-0" / "seed-1000" / "metrics.csv").read_text()
    assert "val_accuracy" in tuning_rows and "test_accuracy" not in tuning_rows
    assert summary["groups"]["b"]["paired"]["test_accuracy"]["n"] == 2
    again: list[str] = []
    run_suite(suite, tmp_path, log=again.append)
    assert again == []  # resumable: nothing runs twice


# --------------------------------------------------------------------------------------------
# The ledger's loss
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ledger", ["tempered", "plain"])
def test_the_ledger_records_the_tempered_or_the_plain_loss(ledger: str) -> None:
    cfg = config(temperature=0.5, **{"self_paced.ledger": ledger})
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    batch = Batch(logits, labels, labels, 2, torch.zeros(2, 1, 2, 2), {})
    loss, recorded, _ = Objective(Supervised(cfg, lambda z: z / 0.5))(batch, loader_weights=None)
    tempered = torch.nn.functional.cross_entropy(logits / 0.5, labels, reduction="none")
    plain = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(recorded, tempered if ledger == "tempered" else plain)
    assert loss.item() == pytest.approx(tempered.mean().item())  # the trained loss is the tempered one either way


# --------------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------------


def test_paired_analysis_matches_scipy() -> None:
    rng = random.Random(1)
    a = [0.9 + rng.gauss(0, 0.01) for _ in range(20)]
    b = [x + 0.004 + rng.gauss(0, 0.003) for x in a]
    diffs = [y - x for x, y in zip(a, b)]
    result = paired(diffs)
    assert result["p"] == pytest.approx(stats.ttest_rel(b, a).pvalue, rel=1e-9)
    low, high = stats.t.interval(0.95, 19, loc=result["mean"], scale=stats.sem(diffs))
    assert result["ci95"] == pytest.approx((high - low) / 2)
    # TOST: the larger one-sided p of the two shifted one-sample tests
    lower = stats.ttest_1samp(diffs, -0.003, alternative="greater").pvalue
    upper = stats.ttest_1samp(diffs, 0.003, alternative="less").pvalue
    assert tost(diffs) == pytest.approx(max(lower, upper))


def test_detection_limit_is_the_difference_found_with_power_0_8() -> None:
    # Simulated power of the paired t-test at the detection limit: about 0.8 (noncentral-t approximation).
    limit = detection_limit(1.0, 20)
    power = stats.nct.sf(stats.t.ppf(0.975, 19), 19, limit * 20**0.5)
    assert power == pytest.approx(0.8, abs=0.01)
    assert math.isnan(detection_limit(1.0, 1))


def test_holm_and_verdicts() -> None:
    assert holm([0.01, 0.02, 0.03, float("nan")])[:3] == [0.03, 0.04, 0.04]
    assert verdict(0.01, 0.001, 0.9) == "better" and verdict(-0.01, 0.001, 0.9) == "worse"
    assert verdict(0.0, 0.5, 0.01) == "equivalent" and verdict(0.0, 0.5, 0.2) == "inconclusive"


def test_time_to_level_counts_epochs_and_seconds() -> None:
    rows = [{"val_accuracy": 0.4, "epoch_seconds": 1.5}, {"val_accuracy": 0.7, "epoch_seconds": 2.0}]
    assert time_to_level(rows, 0.6, 2) == (2, 3.5)
    epochs, seconds = time_to_level(rows, 0.8, 2)
    assert epochs == 3 and math.isnan(seconds)
