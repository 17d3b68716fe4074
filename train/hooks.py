"""Optimizer-side hooks for any training loop: cyclical weight decay (CWD), softmax temperature (CST),
gradient clipping (CGC), a cyclical momentum and, when asked, the learning rate, all read from one
:class:`~cycdata.plan.Plan`.

Three calls fit into a loop you already have::

    hooks = CyclicalHooks(optimizer, plan)
    for epoch in range(plan.epochs):
        for step, (x, y) in enumerate(loader):
            hooks.update(epoch, fraction=step / len(loader))   # WD, T and clip for this step (LR: when asked)
            loss = F.cross_entropy(hooks.scale_logits(model(x)), y)   # CST: training only
            loss.backward()
            hooks.clip_gradients(model)                          # CGC
            optimizer.step(); optimizer.zero_grad()
        scheduler.step()                                         # your own LR scheduler keeps working

The hooks change only what they are asked to: your optimizer's LR and your LR scheduler are left
alone unless the config you built the plan from sets ``optim.lr`` or you pass ``set_lr=True``; then
the hooks write the plan's LR every update and refuse an LR scheduler on the same optimizer.

``F.cross_entropy`` re-normalises what it is given, so the CST line is right for a model that ends
in ``log_softmax`` too: ``log_softmax(log_softmax(z) / T) == log_softmax(z / T)``. With ``F.nll_loss``
re-normalise first, ``F.nll_loss(F.log_softmax(hooks.scale_logits(output), dim=1), y)``: log-probabilities
divided by T are not log-probabilities, and ``nll_loss`` of them is only the loss divided by T.

Unlike the reference code, cyclical weight decay and cyclical clipping work together (its
``if wd … elif clip`` turned clipping off whenever CWD was on), and weight decay goes into every
param group whose base weight decay is > 0 (not a hard-coded group index), so no-decay groups of
biases and norms stay undecayed.

Example:
    >>> import torch
    >>> from cycdata.config import parse_config
    >>> from cycdata.plan import Plan
    >>> model = torch.nn.Linear(4, 2)
    >>> groups = [{"params": [model.weight], "weight_decay": 1e-4}, {"params": [model.bias], "weight_decay": 0.0}]
    >>> optimizer = torch.optim.SGD(groups, lr=0.1)
    >>> hooks = CyclicalHooks(optimizer, Plan.from_config(parse_config({"epochs": 10})))
    >>> knobs = hooks.update(epoch=4)
    >>> decay, no_decay = optimizer.param_groups
    >>> decay["weight_decay"] == knobs["optim.weight_decay"], no_decay["weight_decay"]
    (True, 0.0)
    >>> decay["lr"], "optim.lr" in knobs  # the config left optim.lr out: the plan's LR is returned, yours stays
    (0.1, True)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from cycdata.plan import Plan

__all__ = ["CLIP_MODES", "CyclicalHooks", "clip_gradients", "has_lr_scheduler"]

CLIP_MODES = ("norm", "value", "agc")


def clippable_parameters(model_or_params: nn.Module | Iterable[Tensor], mode: str) -> list[Tensor]:
    """The parameters a clip mode acts on: all of them, except the classifier head for ``agc``.

    AGC leaves the classifier alone (Brock et al. 2021; timm's train.py does the same).
    """
    if isinstance(model_or_params, nn.Module):
        from timm.models import model_parameters

        return list(model_parameters(model_or_params, exclude_head=mode == "agc"))
    return list(model_or_params)


def clip_gradients(
    model_or_params: nn.Module | Iterable[Tensor], threshold: float, mode: str = "norm"
) -> Tensor | None:
    """Clip gradients in place; returns the total gradient norm before clipping (``norm`` mode).

    ``norm`` clips the global L2 norm, ``value`` clamps every element to ±threshold, ``agc`` is
    adaptive gradient clipping with ``threshold`` as the clip factor (timm's implementation).
    The norm stays on the device: reading it is the caller's choice (no host sync here).

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([3.0, 4.0, 0.0])
        >>> float(clip_gradients([p], 1.0, "norm")), [round(float(g), 3) for g in p.grad]
        (5.0, [0.6, 0.8, 0.0])
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"unknown clip mode {mode!r}; use one of {', '.join(CLIP_MODES)}")
    parameters = [p for p in clippable_parameters(model_or_params, mode) if p.grad is not None]
    if not parameters:
        return None
    if mode == "norm":
        return torch.nn.utils.clip_grad_norm_(parameters, threshold, foreach=True)
    from timm.utils import dispatch_clip_grad

    dispatch_clip_grad(parameters, threshold, mode=mode)
    return None


def has_lr_scheduler(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an LR scheduler is attached to ``optimizer``.

    The rule: a param group's ``initial_lr`` is a scheduler's mark (every ``torch.optim.lr_scheduler``
    scheduler but ``ReduceLROnPlateau`` sets it when constructed, and so do timm's), unless it can only
    have come from a state dict: ``Optimizer.state_dict()`` keeps the key, so an optimizer loaded from a
    checkpoint of a scheduled run has it too. A live torch scheduler always wraps the optimizer's
    ``step`` (to warn when ``scheduler.step()`` comes first), which a state dict never carries; so
    ``initial_lr`` with an unwrapped ``step`` and per-parameter state already there (a loaded optimizer)
    does not count. Not seen: ``ReduceLROnPlateau`` (it leaves no mark), and a non-torch scheduler put on
    an optimizer that already has state.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> before = has_lr_scheduler(opt)
        >>> _ = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
        >>> before, has_lr_scheduler(opt)
        (False, True)
    """
    if not any("initial_lr" in group for group in optimizer.param_groups):
        return False
    step = optimizer.step
    # torch >= 2.2 marks its wrapper ``_wrapped_by_lr_sched``; torch 2.1 marked it ``_with_counter``.
    if getattr(step, "_wrapped_by_lr_sched", False) or getattr(step, "_with_counter", False):
        return True
    return not optimizer.state


class CyclicalHooks:
    """Applies a plan's optimizer-side knobs to an optimizer as training progresses.

    Args:
        optimizer: the optimizer; its param groups with ``weight_decay > 0`` at construction
            get the cyclical weight decay, the others (no-decay groups) are left alone.
        plan: the run's plan (knobs ``optim.lr``, ``optim.weight_decay``, ``optim.momentum``, ``temperature``,
            ``grad_clip``). A cyclical momentum is written into every group (``betas[0]`` for Adam-family).
        clip_mode: ``norm``, ``value`` or ``agc`` for the ``grad_clip`` knob.
        set_lr: whether :meth:`update` writes the plan's ``optim.lr`` into every group (times the group's
            ``lr_scale`` when present). ``None`` (the default): only when the LR is the user's own, i.e. the
            parsed config set ``optim.lr`` (a number or ``{easy, hard}``; ``plan.lr_given``), so the default
            recipe's LR never replaces yours. ``True``/``False`` force it either way.

    Raises:
        ValueError: the hooks drive the LR and an LR scheduler is attached to the optimizer (both would
            write ``group["lr"]``; checked here and again at the first :meth:`update`, see
            :func:`has_lr_scheduler`), or the plan's weight decay has no group with ``weight_decay > 0``.

    The hooks hold no state beyond the current values: after a resume, one ``update(epoch, fraction)``
    restores everything.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, plan: Plan, *, clip_mode: str = "norm", set_lr: bool | None = None
    ) -> None:
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip_mode!r}; use one of {', '.join(CLIP_MODES)}")
        self.optimizer = optimizer
        self.plan = plan
        self.clip_mode = clip_mode
        self.set_lr = set_lr
        #: Whether :meth:`update` writes the plan's LR (``set_lr``, or by default whether the config gave it).
        self.drives_lr = "optim.lr" in plan.names and (plan.lr_given if set_lr is None else bool(set_lr))
        self.decay_groups = [i for i, g in enumerate(optimizer.param_groups) if g.get("weight_decay", 0.0) > 0]
        if "optim.weight_decay" in plan.names and not self.decay_groups and _ever_positive(plan, "optim.weight_decay"):
            ends = plan.knob("optim.weight_decay").ends
            planned = "a schedule" if ends is None else " .. ".join(f"{end:g}" for end in dict.fromkeys(ends))
            raise ValueError(
                f"the plan's weight decay (optim.weight_decay: {planned}) has no param group to act on: every group "
                "of this optimizer has weight_decay == 0 (the default of Adadelta, Adam and SGD). Either give the "
                "optimizer a weight decay on the groups to decay, e.g. torch.optim.Adadelta(model.parameters(), "
                "lr=1.0, weight_decay=1e-4) or timm.optim.create_optimizer_v2(model, weight_decay=1e-4) (which keeps "
                "biases and norms undecayed), and CWD writes the plan's value into them at every update; or leave "
                "weight decay alone with optim.weight_decay: 0 in the config (load_config(path, "
                "['optim.weight_decay=0']))"
            )
        self._refuse_a_scheduler()
        self._updated = False  # the first update checks for a scheduler again: one may be created after the hooks
        self.values: dict[str, float | int] = {}
        # The parameter list of a model, found once: walking the module tree every step costs
        # more than the clipping itself on a launch-bound GPU.
        self._clip_cache: tuple[nn.Module, list[Tensor]] | None = None

    def _refuse_a_scheduler(self) -> None:
        if not self.drives_lr or not has_lr_scheduler(self.optimizer):
            return
        why = "set_lr=True" if self.set_lr else "the config sets optim.lr"
        raise ValueError(
            f"CyclicalHooks drives the learning rate ({why}) and an LR scheduler is attached to the same "
            "optimizer (its param groups carry 'initial_lr'): both would write group['lr'] and one would silently "
            "override the other. Keep one: drop the scheduler to follow the plan's optim.lr, or keep your "
            "scheduler and pass set_lr=False to CyclicalHooks (or leave optim.lr out of the config)"
        )

    @property
    def temperature(self) -> float:
        """The current softmax temperature (1.0 when CST is off)."""
        return float(self.values.get("temperature", 1.0))

    @property
    def clip_threshold(self) -> float | None:
        """The current gradient-clip threshold (None when CGC is off)."""
        value = self.values.get("grad_clip")
        return None if value is None else float(value)

    def update(self, epoch: int, fraction: float = 0.0, lr_scale: float = 1.0) -> dict[str, float | int]:
        """Compute every knob at (epoch, fraction of its samples) and write WD/momentum (and the LR when the
        hooks drive it, :attr:`drives_lr`) into the optimizer.

        ``lr_scale`` multiplies the planned LR (for example the batch-size coupling). Returns every
        knob's value, keyed by dotted knob name, ``optim.lr`` included even when it is not written.
        """
        if not self._updated:
            self._refuse_a_scheduler()
            self._updated = True
        values = self.plan.at(epoch, fraction)
        if "optim.lr" in values:
            values["optim.lr"] = float(values["optim.lr"]) * lr_scale
        self.values = values
        self.write(values if self.drives_lr else {name: v for name, v in values.items() if name != "optim.lr"})
        return values

    def write(self, values: dict[str, float | int]) -> None:
        """Write the ``optim.lr``, ``optim.weight_decay`` and ``optim.momentum`` among ``values`` into the optimizer.

        An explicit call: it writes the ``optim.lr`` it is given whatever ``set_lr`` says (``set_lr`` decides
        what :meth:`update` passes here). Weight decay goes into the decay groups only.

        Example:
            >>> import torch
            >>> from cycdata.config import parse_config
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.9, weight_decay=1e-4)
            >>> hooks = CyclicalHooks(opt, Plan.from_config(parse_config({"epochs": 2})))
            >>> hooks.write({"optim.momentum": 0.8})
            >>> opt.param_groups[0]["momentum"]
            0.8
        """
        groups = self.optimizer.param_groups
        if "optim.lr" in values:
            for group in groups:
                group["lr"] = values["optim.lr"] * group.get("lr_scale", 1.0)
        if "optim.weight_decay" in values:
            for index in self.decay_groups:
                groups[index]["weight_decay"] = float(values["optim.weight_decay"])
        if "optim.momentum" in values:
            momentum = float(values["optim.momentum"])
            for group in groups:  # SGD's momentum; Adam-family optimizers: beta1
                if "betas" in group:  # the other betas stay as they are (Adan has three)
                    group["betas"] = (momentum, *tuple(group["betas"])[1:])
                else:
                    group["momentum"] = momentum

    def scale_logits(self, logits: Tensor) -> Tensor:
        """CST: ``logits / T`` for the training loss. Never call it on evaluation logits.

        Give it logits, or log-probabilities followed by a loss that re-normalises (``F.cross_entropy``,
        or ``F.log_softmax`` before ``F.nll_loss``): ``log_softmax(log_softmax(z) / T) == log_softmax(z / T)``.

        Example:
            >>> import torch
            >>> from cycdata.config import parse_config
            >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=1e-4)
            >>> hooks = CyclicalHooks(opt, Plan.from_config(parse_config({"epochs": 2})))
            >>> _ = hooks.update(0)
            >>> hooks.scale_logits(torch.tensor([1.0, -1.0]))
            tensor([ 2., -2.])
        """
        temperature = self.temperature
        return logits if temperature == 1.0 else logits / temperature

    def attach(self, model: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Apply CST through a forward hook: training-mode outputs are divided by T, eval outputs not.

        The output is divided as it is: on a model ending in ``log_softmax`` use ``F.cross_entropy`` (or
        ``log_softmax`` again before ``F.nll_loss``), see :meth:`scale_logits`.
        """

        def divide(module: nn.Module, inputs: object, output: Tensor) -> Tensor:
            return self.scale_logits(output) if module.training else output

        return model.register_forward_hook(divide)

    def clip_gradients(self, model_or_params: nn.Module | Iterable[Tensor]) -> Tensor | None:
        """CGC: clip with the current threshold and mode (no-op when the plan has no ``grad_clip``)."""
        threshold = self.clip_threshold
        if threshold is None:
            return None
        if isinstance(model_or_params, nn.Module):
            if self._clip_cache is None or self._clip_cache[0] is not model_or_params:
                self._clip_cache = (model_or_params, clippable_parameters(model_or_params, self.clip_mode))
            model_or_params = self._clip_cache[1]  # for agc the head is already left out
        return clip_gradients(model_or_params, threshold, self.clip_mode)


def _ever_positive(plan: Plan, name: str) -> bool:
    knob = plan.knob(name)
    return knob.ends is None or max(knob.ends) > 0
