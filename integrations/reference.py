"""The reference code's flags (lnsmith54/CFL, a patch of timm's ``train.py``) as a cycdata config.

The reference computes, at the start of each epoch ``e`` of ``E`` (``diff_train.py``, hunks ``@@ -614,6 +653,18 @@``
and ``@@ -673,6 +724,13 @@``)::

    eta = 1 - f·e/(E-1)              if f·e < E
        = 0                          elif f == 1
        = (f·e/(E-1) - 1)/(f - 1)    otherwise
    value = (1 - eta)·max + eta·min

which is cycdata's ξ with ``normalization: reference`` and ``schedule_unit: epoch`` (easy = ``min``, hard = ``max``),
exactly for an integer factor. For a non-integer one the reference's branch test (``f·e < E``) lags its formula
(divided by ``E − 1``): in the epoch where ``(E−1)/f < e < E/f`` it gives ``eta < 0`` (a value beyond ``max``),
where cycdata's clock takes the continuous V. The flags map as:

=====================================  ============================================================
``--wd_min W --wd_max X`` (W > 0)      ``optim.weight_decay: {easy: W, hard: X}``; W = 0: ``--weight-decay``
``--T_min T --T_max U`` (T > 0)        ``temperature: {easy: T, hard: U}``; T = 0: ``temperature: null``
``--clip_min C --clip_max D`` (C > 0)  ``grad_clip: {easy: C, hard: D, mode: --clip-mode}``; else ``--clip-grad`` or off
``--cyclical_factor F``                ``cyclical_factor: F`` (shared by every knob, the focal loss too)
``--epochs`` (+ ``--cooldown-epochs``) ``epochs``: what timm trains, the span of the reference's WD/clip cycle
``--focal_loss asym-cyclical``         ``loss: {name: cyclical_focal, gamma_pos, gamma_neg, gamma_hc: --gamma0}``
``--smoothing``                        ``loss.label_smoothing``
``-b/--batch-size``                    ``data.batch_size`` (constant, as in timm; augmentation constant at 1)
=====================================  ============================================================

Not copied: the reference's ``if wd_min > 0 … elif clip_min > 0`` turns cyclical clipping off whenever
cyclical weight decay is on; here both act when both are asked for. Other timm flags (``--model``,
``--lr``, ...) are timm's own and stay with its ``train.py``: they are ignored, except a key that looks
like a misspelt reference flag, which is refused.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Mapping
from typing import Any

from cycdata.config import ConfigError, RunConfig, parse_config

__all__ = ["REFERENCE_FLAGS", "config_from_reference", "reference_overrides"]

# The reference's own flags and its defaults (diff_train.py's argparse lines).
REFERENCE_FLAGS: dict[str, Any] = {
    "wd_min": 0.0, "wd_max": 1e-3, "T_min": 0.0, "T_max": 2.0, "clip_min": 0.0, "clip_max": 100.0,
    "cyclical_factor": 2.0, "focal_loss": "", "gamma": 2.0, "gamma0": 0.0, "gamma_pos": 0.0, "gamma_neg": 4.0,
}
# timm's flags that the cyclical ones interact with, and timm's defaults for them.
TIMM_FLAGS: dict[str, Any] = {"epochs": None, "cooldown_epochs": 0, "weight_decay": 2e-5, "clip_grad": None,
                              "clip_mode": "norm", "smoothing": None, "batch_size": 128}


def _flag_name(key: str) -> str:
    """``--clip-grad`` / ``clip-grad`` / ``clip_grad`` → ``clip_grad`` (argparse's attribute name)."""
    return str(key).lstrip("-").replace("-", "_")


def _flags(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The given flags by attribute name, with defaults for the absent ones; misspelt reference flags refused."""
    raw = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(raw, Mapping):
        raise ConfigError("", f"config_from_reference takes an argparse Namespace or a dict of flags, got "
                              f"{type(args).__name__}")
    given = {_flag_name(key): value for key, value in raw.items()}
    known = {**REFERENCE_FLAGS, **TIMM_FLAGS}
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, REFERENCE_FLAGS, n=1, cutoff=0.75)
            if close:
                raise ConfigError(f"--{name}", f"not a reference flag (did you mean --{close[0]}?)")
    flags = {**known, **{name: value for name, value in given.items() if name in known}}
    if flags["epochs"] is None:
        raise ConfigError("--epochs", "the reference's flags need the run's --epochs (the cycle spans them)")
    return flags


def _knob(low: Any, high: Any) -> dict[str, Any]:
    # The reference's `min` is the value at eta = 1, the start and end of the cycle: cycdata's easy end.
    return {"easy": low, "hard": high}


def _loss(flags: Mapping[str, Any]) -> dict[str, Any]:
    focal = flags["focal_loss"] or ""
    loss: dict[str, Any] = {}
    if focal == "asym-cyclical":
        loss = {"name": "cyclical_focal", "gamma_pos": flags["gamma_pos"], "gamma_neg": flags["gamma_neg"],
                "gamma_hc": flags["gamma0"]}
    elif focal:
        raise ConfigError("--focal_loss", f"{focal!r} has no cycdata counterpart; cycdata has the cyclical focal "
                                          "loss (--focal_loss asym-cyclical) or cross-entropy (leave it out)")
    if flags["smoothing"] is not None:
        loss["label_smoothing"] = flags["smoothing"]
    return loss


def _epochs(flags: Mapping[str, Any]) -> int:
    cooldown = flags["cooldown_epochs"] or 0
    if cooldown and flags["T_min"] > 0:
        # The reference cycles T over --epochs but WD and clipping over timm's num_epochs (with the cooldown).
        raise ConfigError("--cooldown-epochs", "the reference cycles T over --epochs but weight decay and clipping "
                                               "over --epochs + --cooldown-epochs; cycdata has one clock: pass "
                                               "--cooldown-epochs 0 (or drop --T_min)")
    return int(flags["epochs"]) + int(cooldown)


def reference_overrides(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The cycdata config mapping (as in a YAML file) that the reference's flags describe.

    Example:
        >>> reference_overrides({"epochs": 10, "wd_min": 5e-5, "wd_max": 5e-4, "T_min": 0.5})["temperature"]
        {'easy': 0.5, 'hard': 2.0}
    """
    flags = _flags(args)
    # The reference cycles only what its flags name: batch size and augmentation stay constant (timm's -b, and
    # timm's augmentation applied at its full strength on every batch), not cycdata's default cycles of both.
    raw: dict[str, Any] = {"epochs": _epochs(flags), "cyclical_factor": flags["cyclical_factor"],
                           "schedule_unit": "epoch", "normalization": "reference",
                           "data": {"batch_size": flags["batch_size"]}, "augment": {"strength": 1.0}}
    if flags["wd_min"] > 0:
        raw["optim"] = {"weight_decay": _knob(flags["wd_min"], flags["wd_max"])}
    else:
        raw["optim"] = {"weight_decay": flags["weight_decay"]}
    raw["temperature"] = _knob(flags["T_min"], flags["T_max"]) if flags["T_min"] > 0 else None
    if flags["clip_min"] > 0:
        raw["grad_clip"] = {**_knob(flags["clip_min"], flags["clip_max"]), "mode": flags["clip_mode"]}
    elif flags["clip_grad"] is not None:
        raw["grad_clip"] = {"value": flags["clip_grad"], "mode": flags["clip_mode"]}
    else:
        raw["grad_clip"] = None
    loss = _loss(flags)
    if loss:
        raw["loss"] = loss
    return raw


def config_from_reference(args: argparse.Namespace | Mapping[str, Any]) -> RunConfig:
    """A validated :class:`~cycdata.config.RunConfig` from the reference's flags (a Namespace or a dict).

    Raises :class:`~cycdata.config.ConfigError` (one line naming the flag or key and the fix) for flags it
    cannot map or values out of range.
    """
    return parse_config(reference_overrides(args))
