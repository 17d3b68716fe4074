"""CyclicalHooks: CWD into decay groups only, CST on training logits only, CGC in three modes."""

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


def test_no_decay_group_is_a_clear_error() -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=0.0)
    with pytest.raises(ValueError, match="every group has weight_decay == 0"):
        CyclicalHooks(optimizer, make_plan())
    CyclicalHooks(optimizer, make_plan(optim={"weight_decay": 0.0}))  # constant 0: nothing to decay, fine


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
