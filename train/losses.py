"""Losses for cyclical training: the cyclical focal loss (CFL) and a soft-target cross-entropy.

The cyclical focal loss (SPEC.md §6, reference class ``Cyclical_FocalLoss``) blends, with the
cyclical coefficient ξ, a "high-confidence" loss (ξ = 1, the easy ends of training) and an
asymmetric focal loss (ξ = 0, the hard peak). For logits z, target distribution y (one-hot or
soft), p = softmax(z) and C classes::

    asymmetric_w = (y·(1 − p) + (1 − y)·p) ** (γ_pos·y + γ_neg·(1 − y))
    positive_w   = (1 + p·y) ** (γ_hc·y)
    w            = (1 − ξ)·asymmetric_w + ξ·positive_w
    q            = (1 − ε)·y + ε / C
    loss         = − Σ_j q_j · w_j · log p_j          (per sample)

The loss is linear in ξ, the weights are not detached (as in the reference), and 0 ** 0 = 1.
Unlike the reference, soft (mixup/cutmix) targets are used as given instead of being collapsed
with argmax.

Example:
    >>> import torch
    >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, -0.3]])
    >>> target = torch.tensor([0, 2])
    >>> round(cyclical_focal_loss(logits, target, xi=0.0, gamma_hc=2.0).item(), 6)
    1.020273
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["REDUCTIONS", "CyclicalFocalLoss", "cyclical_focal_loss", "distillation_loss", "soft_cross_entropy"]

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")


# --------------------------------------------------------------------------- validation


def _check_reduction(reduction: str) -> None:
    """Raise ``ValueError`` unless ``reduction`` is one of :data:`REDUCTIONS`.

    Example:
        >>> _check_reduction("sum")
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_gamma(name: str, value: float) -> None:
    """Raise ``ValueError`` unless the focusing exponent ``value`` is finite and >= 0.

    Example:
        >>> _check_gamma("gamma_neg", 4.0)
    """
    # Why: a negative exponent turns p**γ into an unbounded weight at p -> 0; NaN/inf poison every step.
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_smoothing(name: str, value: float, *, allow_one: bool) -> None:
    """Raise ``ValueError`` unless the smoothing ``value`` lies in [0, 1) (or [0, 1] if ``allow_one``).

    Example:
        >>> _check_smoothing("eps", 0.1, allow_one=False)
    """
    upper_ok = value <= 1 if allow_one else value < 1
    if not (math.isfinite(value) and value >= 0 and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def _check_xi(xi: float | Tensor) -> None:
    """Raise ``ValueError`` unless ``xi`` is a float in [0, 1] or a 0-d floating/integer tensor.

    Tensor values are deliberately not range-checked: reading them would force a device sync on every step.

    Example:
        >>> _check_xi(0.25)
    """
    if isinstance(xi, Tensor):
        if xi.ndim != 0:
            raise ValueError(f"xi must be a float or a 0-d tensor, got a tensor of shape {tuple(xi.shape)}")
        if xi.dtype.is_complex or xi.dtype == torch.bool:
            raise ValueError(f"xi tensor must be real-valued, got dtype {xi.dtype}")
        return
    if isinstance(xi, bool) or not isinstance(xi, (int, float)):
        raise ValueError(f"xi must be a float in [0, 1] or a 0-d tensor, got {type(xi).__name__}")
    if not 0.0 <= xi <= 1.0:  # also rejects NaN
        raise ValueError(f"xi must lie in [0, 1] (1 = easy ends, 0 = hard peak), got {xi!r}")


def _check_logits(logits: Tensor) -> None:
    """Raise ``ValueError`` unless ``logits`` is a floating tensor of shape [N, C] with C >= 1.

    Example:
        >>> _check_logits(torch.zeros(4, 3))
    """
    if not isinstance(logits, Tensor):
        raise ValueError(f"logits must be a torch.Tensor of shape [N, C], got {type(logits).__name__}")
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape [N, C] with C >= 1, got shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating tensor, got dtype {logits.dtype}")


def _check_target(target: Tensor, logits: Tensor) -> None:
    """Raise ``ValueError`` unless ``target`` is hard labels [N] (integer) or a soft target [N, C] (floating).

    Label ranges are only checked for CPU tensors; on an accelerator that check would cost a sync.

    Example:
        >>> _check_target(torch.tensor([0, 2]), torch.zeros(2, 3))
    """
    n, c = logits.shape
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point:
        if tuple(target.shape) != (n, c):
            raise ValueError(
                f"soft target must have the logits' shape [N, C] = {(n, c)}, got shape {tuple(target.shape)}"
            )
        return
    if target.dtype == torch.bool or target.dtype.is_complex:
        raise ValueError(
            f"target must be integer class indices [N] or floating soft targets [N, C], got dtype {target.dtype}"
        )
    if tuple(target.shape) != (n,):
        raise ValueError(
            f"hard target must have shape [N] = {(n,)} for logits of shape {(n, c)}, got shape {tuple(target.shape)}"
        )
    if target.device.type == "cpu" and n > 0:
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= c:
            raise ValueError(f"class indices must lie in [0, {c}) for {c} classes, got values in [{low}, {high}]")


# --------------------------------------------------------------------------- building blocks


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """The dtype the loss is computed in: at least float32, so bf16/fp16 logits do not lose the loss.

    Example:
        >>> _compute_dtype(torch.zeros(1, 2, dtype=torch.bfloat16))
        torch.float32
    """
    return torch.promote_types(logits.dtype, torch.float32)


def _target_distribution(target: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Target as a per-class distribution [N, C]: one-hot for hard labels, soft targets as given.

    Example:
        >>> _target_distribution(torch.tensor([1, 0]), 3, torch.float32)
        tensor([[0., 1., 0.],
                [1., 0., 0.]])
    """
    if target.dtype.is_floating_point:
        return target.to(dtype)  # mixup/cutmix targets are kept, never collapsed with argmax
    one_hot = torch.zeros(target.shape[0], num_classes, dtype=dtype, device=target.device)
    return one_hot.scatter_(1, target.long().unsqueeze(1), 1.0)


def _smooth(y: Tensor, eps: float) -> Tensor:
    """Label smoothing ``(1 − eps)·y + eps / C`` (the same form as timm and ``F.cross_entropy``).

    Example:
        >>> _smooth(torch.tensor([[1.0, 0.0]]), 0.1)
        tensor([[0.9500, 0.0500]])
    """
    return (1.0 - eps) * y + eps / y.shape[1]


def _safe_pow(base: Tensor, exponent: Tensor) -> Tensor:
    """``base ** exponent`` for ``base >= 0`` with 0 ** 0 = 1 and a finite gradient at base == 0.

    Example:
        >>> _safe_pow(torch.tensor([0.0, 0.0, 0.25]), torch.tensor([0.0, 0.5, 0.5]))
        tensor([1.0000, 0.0000, 0.5000])
    """
    # Why: d/db b**e = e·b**(e−1) is inf at b == 0 for 0 < e < 1 (p underflows to exactly 0 with large logits),
    # and inf times the zero softmax Jacobian is NaN. Evaluate at a harmless base there and pick the exact
    # value 0**e afterwards, so the forward stays exact and the backward gets a zero (not NaN) gradient.
    positive = base > 0
    safe_base = torch.where(positive, base, torch.ones_like(base))
    at_zero = (exponent == 0).to(base.dtype)
    return torch.where(positive, safe_base.pow(exponent), at_zero)


def _neg_weighted_log_sum(coef: Tensor, log_p: Tensor) -> Tensor:
    """Per-sample ``−Σ_j coef_j · log p_j`` where a zero coefficient contributes exactly 0.

    Example:
        >>> _neg_weighted_log_sum(torch.tensor([[1.0, 0.0]]), torch.tensor([[-0.5, -float("inf")]]))
        tensor([0.5000])
    """
    # Why: masked logits (−inf) give log p = −inf; 0·(−inf) would be NaN in the forward and in the backward,
    # so log p itself is masked wherever its coefficient is zero (the x·log x → 0 limit).
    active = coef != 0
    return -(coef * torch.where(active, log_p, torch.zeros_like(log_p))).sum(dim=1)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    """Apply ``reduction`` ("mean", "sum" or "none") to per-sample losses [N].

    Example:
        >>> _reduce(torch.tensor([1.0, 3.0]), "mean")
        tensor(2.)
    """
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _cfl_weights(
    p: Tensor, y: Tensor, xi: float | Tensor, gamma_pos: float, gamma_neg: float, gamma_hc: float
) -> Tensor:
    """Per-class CFL weights ``w = (1 − ξ)·asymmetric_w + ξ·positive_w`` [N, C] (not detached).

    Example:
        >>> p, y = torch.tensor([[0.75, 0.25]]), torch.tensor([[1.0, 0.0]])
        >>> _cfl_weights(p, y, 0.0, gamma_pos=2.0, gamma_neg=1.0, gamma_hc=0.0)
        tensor([[0.0625, 0.2500]])
    """
    # y·(1 − p) + (1 − y)·p equals the reference's 1 − p·y − (1 − p)·(1 − y), but for y = 0 it yields p
    # itself instead of 1 − (1 − p), which would round tiny p to 0 in float32.
    asymmetric_w = _safe_pow(y * (1.0 - p) + (1.0 - y) * p, gamma_pos * y + gamma_neg * (1.0 - y))
    positive_w = (1.0 + p * y).pow(gamma_hc * y)  # base >= 1, so the plain pow has no 0**e issue
    return (1.0 - xi) * asymmetric_w + xi * positive_w


# --------------------------------------------------------------------------- public API


def cyclical_focal_loss(
    logits: Tensor,
    target: Tensor,
    xi: float | Tensor,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 4.0,
    gamma_hc: float = 0.0,
    eps: float = 0.1,
    reduction: str = "mean",
) -> Tensor:
    """Cyclical focal loss (SPEC.md §6): ξ·(high-confidence loss) + (1 − ξ)·(asymmetric focal loss).

    Args:
        logits: Raw scores [N, C] (already divided by the temperature if cyclical temperature is on).
            bf16/fp16 logits are computed in float32.
        target: Hard class indices [N] (integer) or soft targets [N, C] (floating, e.g. from mixup),
            used as given. Soft targets are smoothed again with ``eps``: pass ``eps=0`` if they already are.
        xi: Cyclical coefficient in [0, 1]; 1 at the easy ends of training, 0 at the hard peak. A 0-d
            tensor is accepted (and differentiated through) but its value is not range-checked.
        gamma_pos: Focusing exponent of the target term at ξ = 0: weight (1 − p_t) ** gamma_pos.
        gamma_neg: Exponent of the non-target (smoothing) terms at ξ = 0: weight p_j ** gamma_neg.
        gamma_hc: High-confidence exponent of the target term at ξ = 1: weight (1 + p_t) ** gamma_hc.
        eps: Label smoothing in [0, 1); the reference always uses 0.1.
        reduction: "mean" (over samples), "sum" or "none" (per-sample losses [N]).

    Returns:
        A float32 (float64 for float64 logits) scalar, or a tensor [N] for ``reduction="none"``.

    Raises:
        ValueError: On an out-of-range xi, gamma or eps, an unknown reduction, or mismatched shapes.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, -0.3]], dtype=torch.float64)
        >>> target = torch.tensor([0, 2])
        >>> loss = cyclical_focal_loss(logits, target, xi=1.0, gamma_hc=2.0, reduction="none")
        >>> [round(v, 6) for v in loss.tolist()]
        [0.884181, 2.435926]
        >>> logits = logits.float()
        >>> mixup = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]])
        >>> loss = cyclical_focal_loss(logits, mixup, xi=0.5, gamma_pos=2.0, gamma_neg=2.0, gamma_hc=3.0)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
    """
    _check_logits(logits)
    _check_target(target, logits)
    _check_xi(xi)
    for name, gamma in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg), ("gamma_hc", gamma_hc)):
        _check_gamma(name, gamma)
    _check_smoothing("eps", eps, allow_one=False)
    _check_reduction(reduction)

    dtype = _compute_dtype(logits)
    z = logits.to(dtype)
    if isinstance(xi, Tensor):
        xi = xi.to(device=z.device, dtype=dtype)
    p = torch.softmax(z, dim=1)
    log_p = torch.log_softmax(z, dim=1)  # not p.log(): stays finite when p underflows to 0
    y = _target_distribution(target, z.shape[1], dtype)
    w = _cfl_weights(p, y, xi, gamma_pos, gamma_neg, gamma_hc)
    return _reduce(_neg_weighted_log_sum(_smooth(y, eps) * w, log_p), reduction)


def soft_cross_entropy(
    logits: Tensor,
    target: Tensor,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy with hard or soft targets and optional label smoothing, computed in >= float32.

    For hard targets it equals ``F.cross_entropy(logits, target, label_smoothing=...)``; for soft targets
    it equals ``F.cross_entropy`` with class-probability targets (timm's ``SoftTargetCrossEntropy``
    when ``label_smoothing == 0``).

    Args:
        logits: Raw scores [N, C].
        target: Hard class indices [N] (integer) or soft targets [N, C] (floating).
        label_smoothing: Smoothing in [0, 1]: the target becomes ``(1 − s)·y + s / C``.
        reduction: "mean" (over samples), "sum" or "none" (per-sample losses [N]).

    Returns:
        A scalar, or a tensor [N] for ``reduction="none"``.

    Raises:
        ValueError: On an out-of-range label_smoothing, an unknown reduction, or mismatched shapes.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, -0.3]])
        >>> ce = soft_cross_entropy(logits, torch.tensor([0, 2]), label_smoothing=0.1, reduction="none")
        >>> [round(v, 6) for v in ce.tolist()]
        [0.391311, 1.878786]
    """
    _check_logits(logits)
    _check_target(target, logits)
    _check_smoothing("label_smoothing", label_smoothing, allow_one=True)
    _check_reduction(reduction)

    dtype = _compute_dtype(logits)
    log_p = torch.log_softmax(logits.to(dtype), dim=1)
    q = _smooth(_target_distribution(target, logits.shape[1], dtype), label_smoothing)
    return _reduce(_neg_weighted_log_sum(q, log_p), reduction)


def distillation_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, *, reduction: str = "mean"
) -> Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per sample.

    The T² keeps the gradient's scale independent of T. The teacher's logits are detached.

    Args:
        student_logits: the student's raw scores [N, C].
        teacher_logits: the teacher's raw scores [N, C].
        temperature: T > 0; higher softens both distributions.
        reduction: "mean", "sum" or "none" (per-sample [N]).

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
        >>> round(distillation_loss(s, t, 1.0).item(), 6)   # (p − q)·log(p/q), p = sigmoid(1), q = 1 − p
        0.462117
        >>> float(distillation_loss(t, t, 4.0))
        0.0
    """
    _check_logits(student_logits)
    _check_logits(teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}; the teacher must predict the same classes")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    _check_reduction(reduction)
    dtype = _compute_dtype(student_logits)
    log_student = torch.log_softmax(student_logits.to(dtype) / temperature, dim=1)
    log_teacher = torch.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)
    return _reduce(kl * temperature**2, reduction)


class CyclicalFocalLoss(nn.Module):
    """Module form of :func:`cyclical_focal_loss`; ξ is passed per call, as the reference passes the epoch.

    Args:
        gamma_pos: Focusing exponent of the target term at ξ = 0.
        gamma_neg: Exponent of the non-target (smoothing) terms at ξ = 0.
        gamma_hc: High-confidence exponent of the target term at ξ = 1.
        eps: Label smoothing in [0, 1).
        reduction: "mean", "sum" or "none".

    Raises:
        ValueError: On an out-of-range gamma or eps or an unknown reduction (checked at construction).

    Example:
        >>> import torch
        >>> loss_fn = CyclicalFocalLoss(gamma_pos=2.0, gamma_neg=2.0, gamma_hc=3.0)
        >>> loss_fn
        CyclicalFocalLoss(gamma_pos=2.0, gamma_neg=2.0, gamma_hc=3.0, eps=0.1, reduction='mean')
        >>> logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, -0.3]])
        >>> round(loss_fn(logits, torch.tensor([0, 2]), xi=0.5).item(), 6)
        1.393715
    """

    def __init__(
        self,
        *,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        gamma_hc: float = 0.0,
        eps: float = 0.1,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        # Why validate here too: a bad setting should fail when the run is configured, not at the first step.
        for name, gamma in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg), ("gamma_hc", gamma_hc)):
            _check_gamma(name, gamma)
        _check_smoothing("eps", eps, allow_one=False)
        _check_reduction(reduction)
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.gamma_hc = float(gamma_hc)
        self.eps = float(eps)
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor, xi: float | Tensor) -> Tensor:
        """Loss of ``logits`` against ``target`` at cyclical coefficient ``xi`` (see :func:`cyclical_focal_loss`).

        Example:
            >>> import torch
            >>> loss_fn = CyclicalFocalLoss(eps=0.0, gamma_neg=0.0)
            >>> round(loss_fn(torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0]), 0.3).item(), 6)
            0.241311
        """
        return cyclical_focal_loss(
            logits,
            target,
            xi,
            gamma_pos=self.gamma_pos,
            gamma_neg=self.gamma_neg,
            gamma_hc=self.gamma_hc,
            eps=self.eps,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        """The settings, shown in ``repr(module)``.

        Example:
            >>> CyclicalFocalLoss().extra_repr()
            "gamma_pos=0.0, gamma_neg=4.0, gamma_hc=0.0, eps=0.1, reduction='mean'"
        """
        return (
            f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, gamma_hc={self.gamma_hc}, "
            f"eps={self.eps}, reduction={self.reduction!r}"
        )
