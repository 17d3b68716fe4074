"""LR and momentum as cyclical knobs, and the noise-scale coupling (SPEC.md §8)."""

from __future__ import annotations

import pytest
import timm

from cycdata.config import ConfigError, load_config
from cycdata.plan import Plan
from cycdata.schedules import Cyclical
from cycdata.train.hooks import CyclicalHooks
from cycdata.train.trainer import build_optimizer


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cyclical_lr_and_momentum_reach_every_param_group(optimizer: str) -> None:
    config = load_config(None, ["epochs=5", f"optim.name={optimizer}", "optim.warmup_epochs=0",
                                "optim.lr={easy: 0.01, hard: 0.2}", "optim.momentum={easy: 0.8, hard: 0.95}"])
    plan = Plan.from_config(config)
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    opt = build_optimizer(model, config, plan)
    hooks = CyclicalHooks(opt, plan)
    assert len(opt.param_groups) == 2  # decay and no-decay groups
    for epoch in range(5):
        values = hooks.update(epoch)
        t = plan.clock.progress(epoch)
        assert values["optim.lr"] == pytest.approx(Cyclical(0.01, 0.2)(t))
        for group in opt.param_groups:
            assert group["lr"] == pytest.approx(Cyclical(0.01, 0.2)(t))
            momentum = group["betas"][0] if optimizer == "adamw" else group["momentum"]
            assert momentum == pytest.approx(Cyclical(0.8, 0.95)(t))
            if optimizer == "adamw":
                assert group["betas"][1] == 0.999
    assert plan.values()["optim.momentum"] == pytest.approx([0.8, 0.875, 0.95, 0.875, 0.8])


def test_a_cyclical_lr_composes_with_warmup_and_batch_coupling() -> None:
    config = load_config(None, ["epochs=4", "optim.warmup_epochs=2", "optim.lr={easy: 0.02, hard: 0.2}",
                                "data.batch_size={easy: 200, hard: 50}", "data.lr_coupling=linear",
                                "cyclical_factor=1"])
    plan = Plan.from_config(config)
    for epoch in range(4):
        t = plan.clock.progress(epoch)
        warm = 0.1 + 0.9 * min(1.0, epoch / 2)  # run fraction epoch/4 over the 2/4 warmup
        batch_ratio = round(Cyclical(200, 50, factor=1)(t)) / 200
        assert plan.at(epoch)["optim.lr"] == pytest.approx(Cyclical(0.02, 0.2, factor=1)(t) * warm * batch_ratio)


def test_noise_scale_coupling_holds_the_noise_scale_constant() -> None:
    config = load_config(None, ["epochs=7", "couple=noise_scale", "optim.sched=constant", "optim.warmup_epochs=0",
                                "data.batch_size={easy: 256, hard: 32}", "optim.momentum={easy: 0.85, hard: 0.95}"])
    plan = Plan.from_config(config)
    scales = [plan.noise_scale_value(epoch, dataset_size=4000) for epoch in range(7)]
    assert scales == pytest.approx([scales[0]] * 7, rel=1e-12)
    assert len(set(plan.values()["data.batch_size"])) > 2 and len(set(plan.values()["optim.lr"])) > 2
    # With the coupling off, the same plan's noise scale moves with the batch size and the momentum.
    uncoupled = Plan.from_config(load_config(None, ["epochs=7", "optim.sched=constant", "optim.warmup_epochs=0",
                                                    "data.batch_size={easy: 256, hard: 32}",
                                                    "optim.momentum={easy: 0.85, hard: 0.95}"]))
    moving = [uncoupled.noise_scale_value(epoch, dataset_size=4000) for epoch in range(7)]
    assert max(moving) / min(moving) > 10


@pytest.mark.parametrize(("overrides", "words"), [
    (["couple=noise_scale", "data.lr_coupling=linear"], "set it to none"),
    (["couple=noise_scale", "optim.lr={easy: 0.01, hard: 0.1}"], "give optim.lr as a number"),
    (["couple=noise_scale", "optim.name=adamw"], "use sgd or couple: none"),
    (["couple=sqrt"], "must be one of: none, noise_scale"),
    (["optim.momentum={easy: 0.9, hard: 1.0}"], "optim.momentum"),
])
def test_conflicting_couplings_fail_up_front(overrides: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(None, overrides)


def test_trainer_runs_with_cyclical_lr_momentum_and_noise_scale(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cycdata.train.trainer import train

    config = load_config(None, ["epochs=3", "model=test_resnet", "runtime.progress=false", "data.train_limit=600",
                                "couple=noise_scale", "data.batch_size={easy: 100, hard: 25}",
                                "optim.momentum={easy: 0.85, hard: 0.95}"])
    row = train(config, tmp_path)
    assert row["optim.momentum"] == pytest.approx(0.85) and row["test_accuracy"] > 0.2
