"""CyclicalHooks: CWD into decay groups only, CST on training logits only, CGC in three modes; the LR and the
user's LR scheduler are left alone unless the LR is asked for, and a scheduler on a driven LR is refused."""

from __future__ import annotations

import pytest
import timm
import timm.optim
import torch
from torch import nn

from cycdata.clock import Clock
from cycdata.config import parse_config
from cycdata.plan import Plan
from cycdata.schedules import Cyclical
from cycdata.train.hooks import CyclicalHooks, clip_gradients


def make_plan(**raw: object) -> Plan:
    return Plan.from_config(parse_config({"epochs": 10, **raw}))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return timm.optim.create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)


def test_cwd_goes_into_every_decay_group_and_spares_no_decay_groups() -> None:
    model = timm.create_model("test_resnet", num_classes=10)
    optimizer = make_optimizer(model)
    plan = make_plan(optim={"weight_decay": {"easy": 1e-5, "hard": 8e-5}})
    hooks = CyclicalHooks(optimizer, plan)
    decay = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    no_decay = [g for g in optimizer.param_groups if g["weight_decay"] == 0]
    assert decay and no_decay
    expected = [1.0e-5, 2.555556e-5, 4.111111e-5, 5.666667e-5, 7.222222e-5, 7.222222e-5, 5.666667e-5, 4.111111e-5,
                2.555556e-5, 1.0e-5]  # SPEC.md §1.6d
    for epoch, value in enumerate(expected):
        hooks.update(epoch)
        assert all(g["weight_decay"] == pytest.approx(value, abs=1e-11) for g in decay)
        assert all(g["weight_decay"] == 0.0 for g in no_decay)


def test_several_decay_groups_all_follow_the_plan() -> None:
    a, b, bias = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [a], "weight_decay": 1e-3}, {"params": [bias], "weight_decay": 0.0},
                                 {"params": [b], "weight_decay": 5e-4}], lr=0.1)
    hooks = CyclicalHooks(optimizer, make_plan(optim={"weight_decay": {"easy": 1e-5, "hard": 8e-5}}))
    hooks.update(4)
    wds = [g["weight_decay"] for g in optimizer.param_groups]
    assert wds[0] == wds[2] == pytest.approx(7.222222e-5, abs=1e-11) and wds[1] == 0.0


def test_lr_is_written_per_step_with_group_scale() -> None:
    weight = nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([{"params": [weight], "weight_decay": 1e-4, "lr_scale": 0.5}], lr=1.0)
    plan = make_plan(optim={"lr": 0.2, "warmup_epochs": 0, "sched": "cosine"})
    hooks = CyclicalHooks(optimizer, plan)
    hooks.update(5, fraction=0.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.2 * 0.5)  # half-way through the cosine
    hooks.update(5, fraction=0.5, lr_scale=2.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 2.0 * plan.knob("optim.lr").schedule(0.55))


def test_no_decay_group_is_a_clear_error_naming_both_fixes() -> None:
    # Adadelta's default weight decay is 0 and the default recipe's CWD is {easy: 5e-5, hard: 1e-3}.
    assert make_plan().knob("optim.weight_decay").ends == (5e-5, 1e-3)
    optimizer = torch.optim.Adadelta([nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match="every group of this optimizer has weight_decay == 0") as error:
        CyclicalHooks(optimizer, make_plan())
    message = str(error.value)
    assert "5e-05 .. 0.001" in message
    assert "weight_decay=1e-4" in message  # fix 1: give the optimizer a weight decay
    assert "optim.weight_decay: 0" in message and "optim.weight_decay=0" in message  # fix 2: leave WD alone
    CyclicalHooks(optimizer, make_plan(optim={"weight_decay": 0.0}))  # constant 0: nothing to decay, fine
    decayed = torch.optim.Adadelta([nn.Parameter(torch.ones(1))], lr=1.0, weight_decay=1e-4)
    CyclicalHooks(decayed, make_plan()).update(0)
    assert decayed.param_groups[0]["weight_decay"] == pytest.approx(5e-5)  # the easy end at epoch 0


def test_cst_divides_training_logits_only() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=1e-4)
    hooks = CyclicalHooks(optimizer, make_plan(temperature={"easy": 0.5, "hard": 2.0}))
    clock = Clock(10)
    x = torch.randn(4, 3)
    handle = hooks.attach(model)
    for epoch in range(10):
        hooks.update(epoch)
        temperature = Cyclical(0.5, 2.0)(clock.progress(epoch))
        assert hooks.temperature == pytest.approx(temperature)
        model.train()
        plain = x @ model.weight.T + model.bias
        torch.testing.assert_close(model(x), plain / temperature)
        model.eval()
        torch.testing.assert_close(model(x), plain)  # never at evaluation
    handle.remove()
    model.train()
    torch.testing.assert_close(model(x), x @ model.weight.T + model.bias)


def test_cst_changes_the_loss_as_spec_4() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=1e-4)
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    target = torch.tensor([0])
    for temperature, expected in [(0.5, 0.050946), (1.0, 0.241311), (2.0, 0.527976)]:
        hooks = CyclicalHooks(optimizer, make_plan(temperature=temperature))
        hooks.update(0)
        loss = nn.functional.cross_entropy(hooks.scale_logits(logits), target)
        assert float(loss) == pytest.approx(expected, abs=1e-6)


def _with_gradient(values: list[float]) -> nn.Parameter:
    parameter = nn.Parameter(torch.zeros(len(values)))
    parameter.grad = torch.tensor(values)
    return parameter


def test_cgc_norm_mode_follows_the_cyclical_threshold() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=1e-4)
    hooks = CyclicalHooks(optimizer, make_plan(grad_clip={"easy": 0.5, "hard": 2.0, "mode": "norm"}), clip_mode="norm")
    for epoch in (0, 4, 9):
        hooks.update(epoch)
        threshold = hooks.clip_threshold
        assert threshold == pytest.approx(Cyclical(0.5, 2.0)(Clock(10).progress(epoch)))
        parameters = [_with_gradient([30.0, 40.0]), _with_gradient([0.0, 0.0])]
        total = hooks.clip_gradients(parameters)
        assert float(total) == pytest.approx(50.0)
        clipped = torch.cat([p.grad for p in parameters]).norm()
        assert float(clipped) == pytest.approx(threshold, rel=1e-4)


def test_cgc_value_mode_clamps_each_element() -> None:
    parameter = _with_gradient([3.0, -0.2, -5.0])
    clip_gradients([parameter], 0.5, "value")
    assert parameter.grad.tolist() == pytest.approx([0.5, -0.2, -0.5])


def test_cgc_agc_mode_skips_the_head_and_clips_unit_wise() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.01)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    clip_gradients(model, 0.01, "agc")
    body = model[0].weight.grad
    # per output row: ||g|| <= λ·max(||w||, 1e-3) = 0.01 · max(0.02, 1e-3) = 2e-4
    assert torch.all(body.norm(dim=1) <= 2e-4 * 1.0001)
    assert torch.all(model[1].weight.grad == 10.0)  # the classifier head is excluded


def test_cwd_and_cgc_work_together() -> None:
    # The reference's `if wd ... elif clip` turned clipping off under CWD; here both act.
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "weight_decay": 1e-4},
                                 {"params": [model.bias], "weight_decay": 0.0}], lr=0.1)
    plan = make_plan(optim={"weight_decay": {"easy": 1e-5, "hard": 8e-5}}, grad_clip={"easy": 0.5, "hard": 2.0})
    hooks = CyclicalHooks(optimizer, plan)
    hooks.update(4)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(7.222222e-5, abs=1e-11)
    model(torch.randn(8, 3)).pow(2).sum().mul(100).backward()
    hooks.clip_gradients(model.parameters())
    norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm()
    assert float(norm) == pytest.approx(hooks.clip_threshold, rel=1e-4)


def test_hooks_without_cst_or_cgc_are_no_ops() -> None:
    optimizer = torch.optim.SGD([_with_gradient([3.0, 4.0])], lr=0.1, weight_decay=1e-4)
    hooks = CyclicalHooks(optimizer, make_plan(temperature=None, grad_clip=None))
    hooks.update(3)
    logits = torch.randn(2, 3)
    assert hooks.scale_logits(logits) is logits
    assert hooks.clip_gradients(optimizer.param_groups[0]["params"]) is None
    assert optimizer.param_groups[0]["params"][0].grad.tolist() == [3.0, 4.0]


# ---------------------------------------------------------------------------------------------------------------
# The LR: driven only when asked for; never fighting the user's scheduler
# ---------------------------------------------------------------------------------------------------------------


def _train_steps(optimizer: torch.optim.Optimizer, hooks: CyclicalHooks | None, epochs: int, steps: int,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, per_step: bool) -> list[float]:
    """A tiny loop in the usual order; returns the LR of the first group at every optimizer.step()."""
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    seen = []
    for epoch in range(epochs):
        for step in range(steps):
            if hooks is not None:
                hooks.update(epoch, fraction=step / steps)
            loss = sum((p - 0.5).pow(2).sum() for p in parameters)
            optimizer.zero_grad()
            loss.backward()
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            if per_step:
                scheduler.step()
        if not per_step:
            scheduler.step()
    return seen


def _adadelta() -> torch.optim.Optimizer:
    weight = nn.Parameter(torch.ones(3))
    return torch.optim.Adadelta([weight], lr=1.0)


def test_a_default_config_keeps_adadelta_lr_and_its_steplr() -> None:
    # pytorch/examples' MNIST: Adadelta(lr=1.0) + StepLR(step_size=1, gamma=0.7); a config without optim.lr.
    plan = make_plan(epochs=4, optim={"weight_decay": 0.0})
    optimizer = _adadelta()
    hooks = CyclicalHooks(optimizer, plan)
    assert not hooks.drives_lr
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)  # created after the hooks
    seen = _train_steps(optimizer, hooks, epochs=4, steps=3, scheduler=scheduler, per_step=False)
    assert seen == pytest.approx([1.0] * 3 + [0.7] * 3 + [0.49] * 3 + [0.343] * 3, rel=1e-12)
    assert "optim.lr" in hooks.values  # the plan's LR is still reported, just not written


def test_a_default_config_leaves_onecyclelr_exactly_as_without_hooks() -> None:
    def run(with_hooks: bool) -> list[float]:
        optimizer = torch.optim.SGD([nn.Parameter(torch.ones(3))], lr=0.1, momentum=0.9, weight_decay=1e-4)
        hooks = CyclicalHooks(optimizer, make_plan(epochs=3)) if with_hooks else None
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=12)
        return _train_steps(optimizer, hooks, epochs=3, steps=4, scheduler=scheduler, per_step=True)

    plain, hooked = run(False), run(True)
    assert hooked == plain and 0.45 < max(plain) <= 0.5 and len(set(plain)) > 6  # it really cycles


def test_the_lr_is_left_alone_but_weight_decay_temperature_and_clip_still_apply() -> None:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0, weight_decay=1e-4)
    hooks = CyclicalHooks(optimizer, make_plan(epochs=5))  # the default recipe: CWD, CST, CGC all cyclical
    hooks.update(2)  # the hard peak
    group = optimizer.param_groups[0]
    assert group["lr"] == 1.0
    assert group["weight_decay"] == pytest.approx(1e-3) and hooks.temperature == pytest.approx(2.0)
    assert hooks.clip_threshold == pytest.approx(2.0)
    logits = torch.tensor([[2.0, -2.0]])
    torch.testing.assert_close(hooks.scale_logits(logits), torch.tensor([[1.0, -1.0]]))
    model(torch.randn(8, 3)).pow(2).sum().mul(100).backward()
    hooks.clip_gradients(model)
    assert float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm()) == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("lr", [0.1, 0.05])
def test_a_number_written_for_optim_lr_drives_the_lr(lr: float) -> None:
    # Even the default recipe's own value: the user wrote it.
    plan = make_plan(epochs=4, optim={"lr": lr, "sched": "constant", "warmup_epochs": 0, "weight_decay": 0.0})
    assert plan.lr_given
    optimizer = _adadelta()
    hooks = CyclicalHooks(optimizer, plan)
    assert hooks.drives_lr
    for epoch in range(4):
        hooks.update(epoch, fraction=0.5)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr)


def test_a_cyclical_optim_lr_drives_the_lr() -> None:
    plan = make_plan(epochs=5, optim={"lr": {"easy": 0.01, "hard": 0.2}, "warmup_epochs": 0, "weight_decay": 0.0})
    optimizer = _adadelta()
    hooks = CyclicalHooks(optimizer, plan)
    lrs = []
    for epoch in range(5):
        hooks.update(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.105, 0.2, 0.105, 0.01])  # easy ends, hard peak at t = 1/2


def test_set_lr_forces_either_way() -> None:
    optimizer = _adadelta()
    plan = make_plan(epochs=4, optim={"weight_decay": 0.0, "warmup_epochs": 0, "sched": "constant"})
    hooks = CyclicalHooks(optimizer, plan, set_lr=True)  # the default recipe's LR, asked for
    hooks.update(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    optimizer = _adadelta()
    plan = make_plan(epochs=4, optim={"lr": 0.05, "weight_decay": 0.0, "warmup_epochs": 0, "sched": "constant"})
    hooks = CyclicalHooks(optimizer, plan, set_lr=False)
    values = hooks.update(1)
    assert optimizer.param_groups[0]["lr"] == 1.0 and values["optim.lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("when", ["before the hooks", "after the hooks"])
@pytest.mark.parametrize("scheduler", ["StepLR", "OneCycleLR", "timm CosineLRScheduler"])
def test_a_scheduler_on_a_driven_lr_is_a_clear_error(when: str, scheduler: str) -> None:
    import timm.scheduler

    def attach(optimizer: torch.optim.Optimizer) -> object:
        if scheduler == "StepLR":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
        if scheduler == "OneCycleLR":
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1.0, total_steps=10, cycle_momentum=False)
        return timm.scheduler.CosineLRScheduler(optimizer, t_initial=10)

    optimizer = _adadelta()
    plan = make_plan(epochs=4, optim={"lr": 0.05, "weight_decay": 0.0})
    words = r"drives the learning rate \(the config sets optim.lr\).*LR scheduler.*drop the scheduler.*set_lr=False"
    if when == "before the hooks":
        attach(optimizer)
        with pytest.raises(ValueError, match=words):
            CyclicalHooks(optimizer, plan)
    else:
        hooks = CyclicalHooks(optimizer, plan)
        attach(optimizer)
        lr = optimizer.param_groups[0]["lr"]
        with pytest.raises(ValueError, match=words):
            hooks.update(0)
        assert optimizer.param_groups[0]["lr"] == lr  # refused before anything was written


def test_set_lr_true_with_a_scheduler_names_the_argument() -> None:
    optimizer = _adadelta()
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    with pytest.raises(ValueError, match=r"\(set_lr=True\)"):
        CyclicalHooks(optimizer, make_plan(optim={"weight_decay": 0.0}), set_lr=True)


def test_set_lr_false_keeps_a_scheduler_with_an_explicit_lr() -> None:
    optimizer = _adadelta()
    hooks = CyclicalHooks(optimizer, make_plan(epochs=3, optim={"lr": 0.05, "weight_decay": 0.0}), set_lr=False)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    seen = _train_steps(optimizer, hooks, epochs=3, steps=2, scheduler=scheduler, per_step=False)
    assert seen == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])


def test_an_optimizer_loaded_from_a_scheduled_run_is_not_taken_for_a_scheduler() -> None:
    # The state dict of a run that had a StepLR carries 'initial_lr' in its groups; no scheduler is attached now.
    old = _adadelta()
    scheduler = torch.optim.lr_scheduler.StepLR(old, step_size=1)
    _train_steps(old, None, epochs=1, steps=2, scheduler=scheduler, per_step=False)
    state = old.state_dict()
    assert "initial_lr" in state["param_groups"][0]
    plan = make_plan(epochs=4, optim={"lr": 0.05, "sched": "constant", "warmup_epochs": 0, "weight_decay": 0.0})
    loaded_first = _adadelta()
    loaded_first.load_state_dict(state)
    hooks = CyclicalHooks(loaded_first, plan)  # loaded before the hooks ...
    hooks.update(0)
    assert loaded_first.param_groups[0]["lr"] == pytest.approx(0.05)
    loaded_after = _adadelta()
    hooks = CyclicalHooks(loaded_after, plan)
    loaded_after.load_state_dict(state)  # ... or between the hooks and the first update (a resume)
    hooks.update(0)
    assert loaded_after.param_groups[0]["lr"] == pytest.approx(0.05)
    # A scheduler re-created on a loaded optimizer (a resume that kept it) is still seen.
    resumed = _adadelta()
    torch.optim.lr_scheduler.StepLR(resumed, step_size=1)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="LR scheduler"):
        CyclicalHooks(resumed, plan)


def test_write_writes_the_lr_it_is_given() -> None:
    # The range test sweeps the LR through write(): an explicit call, whatever set_lr says.
    optimizer = torch.optim.SGD([{"params": [nn.Parameter(torch.ones(1))], "lr_scale": 0.5}], lr=1.0, weight_decay=1e-4)
    hooks = CyclicalHooks(optimizer, make_plan())
    assert not hooks.drives_lr
    hooks.write({"optim.lr": 0.2})
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


def test_what_counts_as_an_explicit_lr() -> None:
    import yaml

    from cycdata.config import ConfigError, config_to_dict, dump_config, load_config

    assert not Plan.from_config(parse_config({})).lr_given  # the default recipe's LR
    assert not Plan.from_config(parse_config({"optim": {"sched": "constant", "warmup_epochs": 0}})).lr_given
    assert Plan.from_config(parse_config({"optim": {"lr": 0.1}})).lr_given  # a number written, even the default's
    assert Plan.from_config(load_config(None, ["optim.lr={easy: 0.01, hard: 0.1}"])).lr_given
    assert Plan.from_config(load_config(None, ["optim.lr=0.05"]), epochs=7).lr_given  # kept when epochs change
    # A run folder's config.yaml states every key, so a plan from it drives the LR, as the run did.
    assert Plan.from_config(load_config(None, [])).lr_given is False
    assert Plan.from_config(parse_config(yaml.safe_load(dump_config(parse_config({}))))).lr_given
    # The record of given keys is no config key: not accepted, not written, not compared.
    with pytest.raises(ConfigError, match="given_keys: unknown key"):
        parse_config({"given_keys": ["optim.lr"]})
    assert "given_keys" not in config_to_dict(parse_config({"optim": {"lr": 0.1}}))
    assert parse_config({"optim": {"lr": 0.1}}) == parse_config({})
