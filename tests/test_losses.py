"""Tests for cycdata.train.losses: the cyclical focal loss (SPEC.md §6) and soft_cross_entropy (SPEC.md §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cycdata.train.losses import CyclicalFocalLoss, cyclical_focal_loss, soft_cross_entropy

TOL = 1e-5

# SPEC.md §6 test vectors: C = 3, eps = 0.1; sample A has target 0, sample B target 2.
LOGITS = [[2.0, 0.5, -1.0], [0.1, 1.2, -0.3]]
TARGET = [0, 2]
SPEC_TABLE = [
    # ((gamma_pos, gamma_neg, gamma_hc), xi, loss A, loss B, batch mean)
    ((0.0, 4.0, 2.0), 1.0, 0.884181, 2.435926, 1.660054),
    ((0.0, 4.0, 2.0), 0.5, 0.554730, 2.125596, 1.340163),
    ((0.0, 4.0, 2.0), 0.0, 0.225279, 1.815266, 1.020273),
    ((2.0, 2.0, 3.0), 1.0, 1.448314, 2.775752, 2.112033),
    ((2.0, 2.0, 3.0), 0.5, 0.730308, 2.057122, 1.393715),
    ((2.0, 2.0, 3.0), 0.0, 0.012302, 1.338493, 0.675397),
]


def spec_batch(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(LOGITS, dtype=dtype), torch.tensor(TARGET)


def gammas_kwargs(gammas: tuple[float, float, float]) -> dict[str, float]:
    gamma_pos, gamma_neg, gamma_hc = gammas
    return {"gamma_pos": gamma_pos, "gamma_neg": gamma_neg, "gamma_hc": gamma_hc}


def random_batch(seed: int, n: int, c: int, scale: float = 3.0, dtype: torch.dtype = torch.float64):
    """Random logits [n, c], hard labels [n] and a random soft (Dirichlet-like) target [n, c]."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=gen, dtype=dtype) * scale
    labels = torch.randint(0, c, (n,), generator=gen)
    soft = torch.rand(n, c, generator=gen, dtype=dtype) ** 3
    return logits, labels, soft / soft.sum(dim=1, keepdim=True)


def numpy_reference_cfl(logits, y, xi, gamma_pos, gamma_neg, gamma_hc, eps):
    """Literal NumPy mirror of the reference forward (Cyclical_FocalLoss), with y used as given (no argmax)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    c = z.shape[1]
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    xs_pos, xs_neg = p * y, (1 - p) * (1 - y)
    asymmetric_w = np.power(1 - xs_pos - xs_neg, gamma_pos * y + gamma_neg * (1 - y))
    positive_w = np.power(1 + xs_pos, gamma_hc * y)
    q = y * (1 - eps) + eps / c
    return -(q * log_p * ((1 - xi) * asymmetric_w + xi * positive_w)).sum(axis=1)


# --------------------------------------------------------------------------- SPEC.md values


@pytest.mark.parametrize(("gammas", "xi", "loss_a", "loss_b", "mean"), SPEC_TABLE)
def test_spec_table_per_sample_and_mean(gammas, xi, loss_a, loss_b, mean):
    logits, target = spec_batch()
    per_sample = cyclical_focal_loss(logits, target, xi, reduction="none", **gammas_kwargs(gammas))
    assert per_sample.shape == (2,)
    assert per_sample[0].item() == pytest.approx(loss_a, abs=TOL)
    assert per_sample[1].item() == pytest.approx(loss_b, abs=TOL)
    batch = cyclical_focal_loss(logits, target, xi, **gammas_kwargs(gammas))
    assert batch.ndim == 0
    assert batch.item() == pytest.approx(mean, abs=TOL)


@pytest.mark.parametrize(("gammas", "xi", "loss_a", "loss_b", "mean"), SPEC_TABLE)
def test_spec_table_with_tensor_xi_and_module(gammas, xi, loss_a, loss_b, mean):
    logits, target = spec_batch()
    module = CyclicalFocalLoss(**gammas_kwargs(gammas), eps=0.1, reduction="none")
    per_sample = module(logits, target, torch.tensor(xi))
    assert per_sample.tolist() == pytest.approx([loss_a, loss_b], abs=TOL)


@pytest.mark.parametrize(("gammas", "xi", "loss_a", "loss_b", "mean"), SPEC_TABLE)
def test_spec_table_matches_numpy_reference_mirror(gammas, xi, loss_a, loss_b, mean):
    logits, target = spec_batch(torch.float64)
    expected = numpy_reference_cfl(LOGITS, np.eye(3)[TARGET], xi, *gammas, eps=0.1)
    got = cyclical_focal_loss(logits, target, xi, reduction="none", **gammas_kwargs(gammas))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(expected, [loss_a, loss_b], atol=TOL)


def test_spec_softmax_values():
    logits, _ = spec_batch()
    p = torch.softmax(logits, dim=1)
    np.testing.assert_allclose(p[0].numpy(), [0.785597, 0.175290, 0.039113], atol=1e-6)
    np.testing.assert_allclose(p[1].numpy(), [0.213927, 0.642673, 0.143400], atol=1e-6)


@pytest.mark.parametrize("xi", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_sanity_no_smoothing_no_focusing_is_plain_ce(xi):
    logits, target = spec_batch()
    loss = cyclical_focal_loss(logits[:1], target[:1], xi, gamma_pos=0.0, gamma_neg=0.0, gamma_hc=0.0, eps=0.0)
    assert loss.item() == pytest.approx(0.241311, abs=TOL)
    assert loss.item() == pytest.approx(F.cross_entropy(logits[:1], target[:1]).item(), abs=1e-6)


def test_plain_ce_with_smoothing_spec_values():
    logits, target = spec_batch()
    ce = soft_cross_entropy(logits, target, label_smoothing=0.1, reduction="none")
    assert ce.tolist() == pytest.approx([0.391311, 1.878786], abs=TOL)
    assert soft_cross_entropy(logits[:1], target[:1]).item() == pytest.approx(0.241311, abs=TOL)


@pytest.mark.parametrize(("temperature", "expected"), [(0.5, 0.050946), (1.0, 0.241311), (2.0, 0.527976)])
def test_temperature_ce_spec_values(temperature, expected):
    logits, target = spec_batch()
    ce = soft_cross_entropy(logits[:1] / temperature, target[:1])
    assert ce.item() == pytest.approx(expected, abs=TOL)


# --------------------------------------------------------------------------- structure of the loss


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 6),
    c=st.integers(2, 7),
    xi=st.floats(0.0, 1.0),
    gamma_pos=st.floats(0.0, 5.0),
    gamma_neg=st.floats(0.0, 5.0),
    gamma_hc=st.floats(0.0, 5.0),
    eps=st.floats(0.0, 0.9),
    soft=st.booleans(),
)
def test_linear_in_xi(seed, n, c, xi, gamma_pos, gamma_neg, gamma_hc, eps, soft):
    logits, labels, soft_target = random_batch(seed, n, c)
    target = soft_target if soft else labels
    kwargs = {"gamma_pos": gamma_pos, "gamma_neg": gamma_neg, "gamma_hc": gamma_hc, "eps": eps, "reduction": "none"}
    loss_xi = cyclical_focal_loss(logits, target, xi, **kwargs)
    blend = xi * cyclical_focal_loss(logits, target, 1.0, **kwargs) + (1 - xi) * cyclical_focal_loss(
        logits, target, 0.0, **kwargs
    )
    torch.testing.assert_close(loss_xi, blend, rtol=1e-9, atol=1e-9)
    # Also against the literal reference mirror (hard: one-hot; soft: the generalisation, y as given).
    y = soft_target.numpy() if soft else np.eye(c)[labels.numpy()]
    expected = numpy_reference_cfl(logits.numpy(), y, xi, gamma_pos, gamma_neg, gamma_hc, eps)
    np.testing.assert_allclose(loss_xi.numpy(), expected, rtol=1e-9, atol=1e-9)


def test_gradient_wrt_tensor_xi_is_l1_minus_l0():
    # Linearity means dL/dxi = L(1) - L(0); a 0-d tensor xi is differentiated through.
    logits, labels, _ = random_batch(0, 5, 4)
    xi = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    cyclical_focal_loss(logits, labels, xi, gamma_hc=2.0).backward()
    expected = cyclical_focal_loss(logits, labels, 1.0, gamma_hc=2.0) - cyclical_focal_loss(
        logits, labels, 0.0, gamma_hc=2.0
    )
    assert xi.grad is not None
    assert xi.grad.item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("gammas", [(0.0, 4.0, 2.0), (2.0, 2.0, 3.0), (0.5, 1.5, 0.0)])
@pytest.mark.parametrize("xi", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_one_hot_soft_target_equals_hard_labels(gammas, xi, reduction):
    logits, labels, _ = random_batch(1, 8, 5, dtype=torch.float32)
    one_hot = F.one_hot(labels, 5).float()
    hard = cyclical_focal_loss(logits, labels, xi, reduction=reduction, **gammas_kwargs(gammas))
    soft = cyclical_focal_loss(logits, one_hot, xi, reduction=reduction, **gammas_kwargs(gammas))
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-6)


@pytest.mark.parametrize("xi", [0.0, 0.5, 1.0])
def test_mixup_target_is_not_collapsed_with_argmax(xi):
    logits, _ = spec_batch()
    mixup = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]])
    soft = cyclical_focal_loss(logits, mixup, xi, gamma_hc=2.0, reduction="none")
    collapsed = cyclical_focal_loss(logits, mixup.argmax(dim=1), xi, gamma_hc=2.0, reduction="none")
    assert torch.all((soft - collapsed).abs() > 1e-3)
    expected = numpy_reference_cfl(LOGITS, mixup.numpy(), xi, 0.0, 4.0, 2.0, 0.1)
    np.testing.assert_allclose(soft.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_reduction_shapes_and_sum_is_n_times_mean():
    logits, labels, soft = random_batch(2, 7, 4, dtype=torch.float32)
    for target in (labels, soft.float()):
        none = cyclical_focal_loss(logits, target, 0.3, reduction="none")
        total = cyclical_focal_loss(logits, target, 0.3, reduction="sum")
        mean = cyclical_focal_loss(logits, target, 0.3, reduction="mean")
        assert none.shape == (7,)
        assert total.shape == () and mean.shape == ()
        assert total.item() == pytest.approx(7 * mean.item(), rel=1e-6)
        assert total.item() == pytest.approx(none.sum().item(), rel=1e-6)
        ce_none = soft_cross_entropy(logits, target, reduction="none")
        assert ce_none.shape == (7,)
        assert soft_cross_entropy(logits, target, reduction="sum").item() == pytest.approx(
            7 * soft_cross_entropy(logits, target).item(), rel=1e-6
        )


# --------------------------------------------------------------------------- gradients


def test_gradcheck_weights_are_not_detached():
    # gradcheck compares autograd to finite differences of the full loss, so it fails if the focal
    # weights were detached (their derivative would be missing).
    logits, labels, soft = random_batch(3, 4, 5)
    for target in (labels, soft):
        x = logits.clone().requires_grad_(True)

        def loss_fn(z, target=target):
            return cyclical_focal_loss(z, target, 0.3, gamma_pos=2.0, gamma_neg=2.0, gamma_hc=3.0)

        assert torch.autograd.gradcheck(loss_fn, (x,), eps=1e-6, atol=1e-6)


def test_gradient_differs_from_detached_weights():
    logits, labels, _ = random_batch(4, 3, 4)
    x = logits.clone().requires_grad_(True)
    cyclical_focal_loss(x, labels, 0.0, gamma_pos=2.0, gamma_neg=2.0).backward()
    # Detached-weight version of the same loss, built by hand.
    p = torch.softmax(logits, 1)
    y = F.one_hot(labels, 4).double()
    w = ((y * (1 - p) + (1 - y) * p) ** 2).detach()
    x2 = logits.clone().requires_grad_(True)
    q = 0.9 * y + 0.1 / 4
    (-(q * w * torch.log_softmax(x2, 1)).sum(1).mean()).backward()
    assert x.grad is not None and x2.grad is not None
    assert (x.grad - x2.grad).abs().max().item() > 1e-3


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
@pytest.mark.parametrize(
    "gammas", [(0.0, 4.0, 0.0), (0.0, 0.0, 0.0), (2.0, 2.0, 3.0), (0.5, 0.5, 0.5), (1.0, 1.0, 1.0)]
)
@pytest.mark.parametrize("xi", [0.0, 0.5, 1.0])
def test_gradients_finite_and_flowing(scale, gammas, xi):
    # At scale 1e4 softmax saturates: p is exactly 0 and 1 in float32, where 0**0 and 0**(0 < g < 1) appear.
    gen = torch.Generator().manual_seed(5)
    logits = (torch.randn(6, 4, generator=gen) * scale).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    soft = torch.softmax(torch.randn(6, 4, generator=gen), dim=1)
    for target in (labels, soft):
        logits.grad = None
        loss = cyclical_focal_loss(logits, target, xi, eps=0.1, **gammas_kwargs(gammas))
        loss.backward()
        assert torch.isfinite(loss)
        assert logits.grad is not None
        assert torch.isfinite(logits.grad).all()
        assert logits.grad.abs().sum().item() > 0


def test_saturated_softmax_zero_power_zero_is_one():
    # p_t == 1 exactly and gamma_pos == 0: (1 - p_t)**0 must be 1, so the target term stays -q_t*log p_t.
    logits = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    target = torch.tensor([0])
    loss = cyclical_focal_loss(logits, target, 0.0, gamma_pos=0.0, gamma_neg=0.5, eps=0.0)
    assert loss.item() == 0.0  # log p_t == 0, non-target coefficients are 0
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_masked_minus_inf_logits_in_soft_cross_entropy():
    logits = torch.tensor([[2.0, -math.inf, 0.5], [0.1, 1.2, -math.inf]], requires_grad=True)
    target = torch.tensor([0, 1])
    ours = soft_cross_entropy(logits, target)
    ours.backward()
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, target)
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert logits.grad is not None and ref_logits.grad is not None
    torch.testing.assert_close(logits.grad, ref_logits.grad)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_and_returned_in_float32(dtype):
    logits, target = spec_batch(dtype)
    loss = cyclical_focal_loss(logits, target, 0.5, gamma_hc=2.0)
    assert loss.dtype == torch.float32
    expected = cyclical_focal_loss(logits.float(), target, 0.5, gamma_hc=2.0)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert soft_cross_entropy(logits, target).dtype == torch.float32
    x = logits.clone().requires_grad_(True)
    cyclical_focal_loss(x, target, 0.5).backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()


def test_bf16_under_autocast():
    linear = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([0, 1, 2, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = linear(x)
        assert logits.dtype == torch.bfloat16
        loss = cyclical_focal_loss(logits, target, 0.5, gamma_pos=2.0, gamma_neg=2.0, gamma_hc=3.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


def test_float64_stays_float64():
    logits, target = spec_batch(torch.float64)
    assert cyclical_focal_loss(logits, target, 0.5).dtype == torch.float64


# --------------------------------------------------------------------------- soft_cross_entropy


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_soft_cross_entropy_matches_torch(label_smoothing, reduction):
    logits, labels, soft = random_batch(7, 9, 6, dtype=torch.float32)
    for target in (labels, soft.float()):
        ours = soft_cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
        ref = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_soft_cross_entropy_gradient_matches_torch():
    logits, labels, _ = random_batch(8, 5, 4, dtype=torch.float32)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    soft_cross_entropy(a, labels, label_smoothing=0.1).backward()
    F.cross_entropy(b, labels, label_smoothing=0.1).backward()
    assert a.grad is not None and b.grad is not None
    torch.testing.assert_close(a.grad, b.grad)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"xi": 1.5}, r"xi must lie in \[0, 1\]"),
        ({"xi": -0.1}, r"xi must lie in \[0, 1\]"),
        ({"xi": math.nan}, r"xi must lie in \[0, 1\]"),
        ({"xi": "0.5"}, r"xi must be a float"),
        ({"xi": torch.tensor([0.5, 0.5])}, r"xi must be a float or a 0-d tensor.*\(2,\)"),
        ({"reduction": "avg"}, r"reduction must be one of .*'avg'"),
        ({"gamma_pos": -1.0}, r"gamma_pos must be a finite number >= 0"),
        ({"gamma_neg": math.inf}, r"gamma_neg must be a finite number >= 0"),
        ({"gamma_hc": -0.5}, r"gamma_hc must be a finite number >= 0"),
        ({"eps": 1.0}, r"eps must lie in \[0, 1\)"),
        ({"eps": -0.1}, r"eps must lie in \[0, 1\)"),
    ],
)
def test_cfl_rejects_bad_settings(kwargs, match):
    logits, target = spec_batch()
    call = {"xi": 0.5, **kwargs}
    xi = call.pop("xi")
    with pytest.raises(ValueError, match=match):
        cyclical_focal_loss(logits, target, xi, **call)


@pytest.mark.parametrize(
    ("logits", "target", "match"),
    [
        (torch.zeros(3), torch.tensor([0]), r"logits must have shape \[N, C\].*\(3,\)"),
        (torch.zeros(2, 3, 4), torch.tensor([0, 1]), r"logits must have shape \[N, C\].*\(2, 3, 4\)"),
        (torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), r"logits must be a floating tensor"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), r"hard target must have shape \[N\].*\(2,\).*\(3,\)"),
        (torch.zeros(2, 3), torch.zeros(2, 4), r"soft target must have the logits' shape.*\(2, 3\).*\(2, 4\)"),
        (torch.zeros(2, 3), torch.zeros(2), r"soft target must have the logits' shape.*\(2,\)"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"class indices must lie in \[0, 3\)"),
        (torch.zeros(2, 3), torch.tensor([-1, 0]), r"class indices must lie in \[0, 3\)"),
        (torch.zeros(2, 3), torch.tensor([True, False]), r"target must be integer class indices"),
        ([[0.0, 1.0]], torch.tensor([0]), r"logits must be a torch.Tensor"),
    ],
)
def test_bad_shapes_and_targets_raise(logits, target, match):
    with pytest.raises(ValueError, match=match):
        cyclical_focal_loss(logits, target, 0.5)
    with pytest.raises(ValueError, match=match):
        soft_cross_entropy(logits, target)


def test_soft_cross_entropy_rejects_bad_settings():
    logits, target = spec_batch()
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
        soft_cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        soft_cross_entropy(logits, target, reduction="batchmean")


def test_module_rejects_bad_settings_at_construction():
    with pytest.raises(ValueError, match="gamma_neg"):
        CyclicalFocalLoss(gamma_neg=-1.0)
    with pytest.raises(ValueError, match="eps"):
        CyclicalFocalLoss(eps=1.0)
    with pytest.raises(ValueError, match="reduction"):
        CyclicalFocalLoss(reduction="avg")


# --------------------------------------------------------------------------- module


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("xi", [0.0, 0.7, 1.0])
def test_module_matches_function(reduction, xi):
    logits, labels, soft = random_batch(9, 6, 5, dtype=torch.float32)
    settings_ = {"gamma_pos": 1.0, "gamma_neg": 3.0, "gamma_hc": 2.0, "eps": 0.05, "reduction": reduction}
    module = CyclicalFocalLoss(**settings_)
    for target in (labels, soft.float()):
        torch.testing.assert_close(
            module(logits, target, xi), cyclical_focal_loss(logits, target, xi, **settings_), rtol=0, atol=0
        )
    assert isinstance(module, torch.nn.Module)
    assert list(module.parameters()) == []
    assert "gamma_hc=2.0" in repr(module) and "reduction='" + reduction + "'" in repr(module)


def test_module_default_settings_match_reference_defaults():
    module = CyclicalFocalLoss()
    assert (module.gamma_pos, module.gamma_neg, module.gamma_hc, module.eps, module.reduction) == (
        0.0,
        4.0,
        0.0,
        0.1,
        "mean",
    )
