"""The training objective of one batch, composed in one place from small loss terms.

::

    loss = Σ_i v_i · ((1 − s)·ℓ_i + s·KD_i) / L  +  λ · mean_u FixMatch_u

* ℓ_i (:class:`Supervised`): the per-sample loss of the L labeled samples on the tempered logits z_i / T
  (cross-entropy or the cyclical focal loss). It is what the loss ledger records and what self-paced
  weights judge, whatever the other terms add.
* v_i (:class:`SelfPaced`): self-paced weights, 1 without self-paced learning. The sum is divided by L, not
  by Σ v, so a batch of mostly excluded samples does not take a full-size step.
* KD_i (:class:`Distillation`): distillation from a frozen teacher, blended in with share s.
* FixMatch_u (:class:`FixMatch`): the consistency loss of the unlabeled samples, with weight λ.

A term reads a :class:`Batch` and returns its loss and the sums it adds to the epoch's metrics (device
tensors: no host read per step); after the epoch, it turns the totals into named metrics.

Example:
    Two labeled samples (cross-entropy 0.1269 and 1.3133), two unlabeled ones of which the first is
    confident (weak view 3:0, so p = 0.953 ≥ τ; its strong view 4:0 costs 0.0181, averaged over both):

    >>> import torch
    >>> from cycdata.config import parse_config
    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.5], [4.0, 0.0], [0.0, 0.1]])
    >>> batch = Batch(logits, labels=torch.tensor([0, 0, 0, 1]), targets=torch.tensor([0, 0]), labeled=2,
    ...               inputs=torch.zeros(6, 1, 2, 2), knobs={})
    >>> objective = Objective(Supervised(parse_config({"epochs": 2})), fixmatch=FixMatch(confidence=0.9, weight=1.0))
    >>> loss, per_sample, sums = objective(batch, loader_weights=None)
    >>> [round(v, 4) for v in per_sample.tolist()], round(loss.item(), 4)   # (0.1269 + 1.3133)/2 + 0.0181/2
    ([0.1269, 1.3133], 0.7292)
    >>> {name: round(float(value), 4) for name, value in sums.items()}  # doctest: +NORMALIZE_WHITESPACE
    {'loss': 1.4402, 'correct': 1.0, 'samples': 2.0, 'unlabeled_loss': 0.0181, 'confident': 1.0,
     'unlabeled': 2.0, 'pseudo_correct': 1.0}
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cycdata.augment_ladder.views import strong_view, weak_view
from cycdata.config import RunConfig
from cycdata.loaders.torch_loader import CyclicalLoader
from cycdata.plan import Plan
from cycdata.selection import loss_quantile, spl_weights
from cycdata.train.losses import CyclicalFocalLoss, distillation_loss, soft_cross_entropy

__all__ = [
    "Batch",
    "Distillation",
    "FixMatch",
    "Objective",
    "SelfPaced",
    "Supervised",
    "batch_self_paced_threshold",
    "fixmatch_loss",
    "fixmatch_views",
    "training_loss",
]

Sums = dict[str, Tensor | float]  # a step's contribution to the epoch's named metric sums


@dataclass(frozen=True)
class Batch:
    """One training batch after the forward pass: what every loss term reads."""

    logits: Tensor  # the labeled samples, then (FixMatch) the weak and the strong views of the unlabeled ones
    labels: Tensor  # the loader's labels, labeled then unlabeled (those are hidden: diagnostics only)
    targets: Tensor  # the labeled samples' training targets (soft when a ladder rung mixes images)
    labeled: int
    inputs: Tensor  # what the model saw (the teacher sees its labeled part)
    knobs: Mapping[str, float | int]  # the plan's values at this step

    @property
    def labeled_logits(self) -> Tensor:
        return self.logits[: self.labeled]

    @property
    def unlabeled(self) -> int:
        return len(self.labels) - self.labeled


def _ratio(numerator: float, denominator: float) -> float:
    """NaN, not 0 or an error, for an empty denominator (no unlabeled sample, no confident pseudo-label)."""
    return numerator / (denominator or math.nan)


# --------------------------------------------------------------------------------------------
# The terms
# --------------------------------------------------------------------------------------------


def training_loss(config: RunConfig, plan_values: Mapping[str, float | int]) -> Callable[[Tensor, Tensor], Tensor]:
    """The per-sample training loss of this config, as a function of (logits, targets)."""
    loss = config.loss
    if loss.name == "cyclical_focal":
        focal = CyclicalFocalLoss(gamma_pos=loss.gamma_pos, gamma_neg=loss.gamma_neg, gamma_hc=loss.gamma_hc,
                                  eps=loss.smoothing, reduction="none")
        xi = float(plan_values["loss.xi"])
        return lambda logits, target: focal(logits, target, xi)
    return lambda logits, target: soft_cross_entropy(logits, target, label_smoothing=loss.smoothing, reduction="none")


def _identity(logits: Tensor) -> Tensor:
    return logits


@dataclass(frozen=True)
class Supervised:
    """ℓ_i = loss(z_i / T, y_i) for each labeled sample; accuracy on the untempered logits.

    With ``self_paced.ledger: plain`` the ledger records (and selection ranks) loss(z_i, y_i) instead, so losses
    taken at different temperatures of a CST run compare; the trained loss stays the tempered one.
    """

    config: RunConfig
    scale_logits: Callable[[Tensor], Tensor] = _identity  # CST: the hooks' ``scale_logits``
    sums: ClassVar[tuple[str, ...]] = ("loss", "correct", "samples")

    def ledger_loss(self, batch: Batch, per_sample: Tensor) -> Tensor:
        """What the ledger records and self-paced weights judge: ℓ itself, or its untempered twin."""
        sp = self.config.self_paced
        if sp is None or sp.ledger == "tempered" or self.config.temperature is None or self.scale_logits is _identity:
            return per_sample
        with torch.no_grad():
            return training_loss(self.config, batch.knobs)(batch.labeled_logits.float(), batch.targets)

    def __call__(self, batch: Batch) -> tuple[Tensor, Sums]:
        logits = batch.labeled_logits
        # The loss is rebuilt each step: with per-step schedules the focal loss's ξ moves within the epoch.
        per_sample = training_loss(self.config, batch.knobs)(self.scale_logits(logits.float()), batch.targets)
        correct = (logits.argmax(dim=1) == batch.labels[: batch.labeled]).sum()
        return per_sample, {"loss": per_sample.detach().sum(), "correct": correct, "samples": batch.labeled}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        samples = totals["samples"]
        return {"train_loss": totals["loss"] / samples, "train_accuracy": totals["correct"] / samples,
                "train_samples": samples}


@dataclass(frozen=True)
class Distillation:
    """KD_i = T²·KL(teacher ‖ student) at T = ``distill.temperature``; its share s is ``distill.weight``."""

    teacher: nn.Module  # eval mode, no gradients
    autocast: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    sums: ClassVar[tuple[str, ...]] = ("distill",)

    def share(self, batch: Batch) -> float:
        return float(batch.knobs["distill.weight"])

    def __call__(self, batch: Batch) -> tuple[Tensor, Sums]:
        with torch.no_grad(), self.autocast:
            teacher_logits = self.teacher(batch.inputs[: batch.labeled])
        per_sample = distillation_loss(batch.labeled_logits.float(), teacher_logits.float(),
                                       float(batch.knobs["distill.temperature"]), reduction="none")
        return per_sample, {"distill": per_sample.detach().sum()}

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        return {"distill_loss": totals["distill"] / totals["samples"]}


def fixmatch_views(images: Tensor, labeled: int, generator: torch.Generator | None) -> Tensor:
    """FixMatch's model input: weak views of the labeled samples, then weak and strong views of the unlabeled."""
    unlabeled = images[labeled:]
    return torch.cat([weak_view(images[:labeled], generator), weak_view(unlabeled, generator),
                      strong_view(unlabeled, generator)])


def fixmatch_loss(logits_weak: Tensor, logits_strong: Tensor, confidence: float) -> tuple[Tensor, Tensor, Tensor]:
    """FixMatch: pseudo-labels from the weak view where confident, cross-entropy on the strong view.

    Returns the per-sample unlabeled loss, the confidence mask and the pseudo-labels.

    Example:
        >>> weak, strong = torch.tensor([[3.0, 0.0], [0.0, 0.1]]), torch.tensor([[0.0, 0.0], [5.0, 0.0]])
        >>> loss, mask, pseudo = fixmatch_loss(weak, strong, confidence=0.9)
        >>> [round(v, 4) for v in loss.tolist()], mask.tolist(), pseudo.tolist()
        ([0.6931, 0.0], [1.0, 0.0], [0, 1])
    """
    probabilities = logits_weak.detach().float().softmax(dim=1)
    top, pseudo = probabilities.max(dim=1)
    mask = (top >= confidence).float()
    per_sample = F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask
    return per_sample, mask, pseudo


@dataclass(frozen=True)
class FixMatch:
    """λ·mean_u CE(strong_u, p̂_u)·[max p(weak_u) ≥ τ]: Sohn et al. 2020 on the unlabeled part of the batch."""

    confidence: float  # τ
    weight: float  # λ
    sums: ClassVar[tuple[str, ...]] = ("unlabeled_loss", "confident", "unlabeled", "pseudo_correct")

    def __call__(self, batch: Batch) -> tuple[Tensor | None, Sums]:
        """The term's loss (None for a batch without unlabeled samples) and its sums."""
        start, count = batch.labeled, batch.unlabeled
        weak, strong = batch.logits[start : start + count], batch.logits[start + count :]
        per_sample, mask, pseudo = fixmatch_loss(weak, strong, self.confidence)
        # A diagnostic only: the hidden labels of the unlabeled pool never enter the loss.
        pseudo_correct = ((pseudo == batch.labels[start:]).float() * mask).sum()
        sums = {"unlabeled_loss": per_sample.detach().sum(), "confident": mask.sum(), "unlabeled": count,
                "pseudo_correct": pseudo_correct}
        return (self.weight * per_sample.mean() if count else None), sums

    def metrics(self, totals: Mapping[str, float]) -> dict[str, float]:
        unlabeled = totals["unlabeled"]
        return {"unlabeled_loss": _ratio(totals["unlabeled_loss"], unlabeled), "unlabeled_samples": unlabeled,
                "pseudo_label_rate": _ratio(totals["confident"], unlabeled),
                "pseudo_label_accuracy": _ratio(totals["pseudo_correct"], totals["confident"])}


@dataclass(frozen=True)
class SelfPaced:
    """v_i: the loader's epoch-level weights when it yields them, else the batch-level rule at this epoch's threshold.

    Without a threshold (no batch-level self-paced learning, or nothing scored yet) there are no weights.
    """

    threshold: float | None = None
    weighting: str = "hard"

    def __call__(self, per_sample: Tensor, loader_weights: Tensor | None) -> Tensor | None:
        if loader_weights is not None:
            return loader_weights.to(per_sample.device, non_blocking=True)
        if self.threshold is None or not math.isfinite(self.threshold):
            return None
        return spl_weights(per_sample.detach().float(), self.threshold, self.weighting)


def batch_self_paced_threshold(config: RunConfig, plan: Plan, loader: CyclicalLoader, epoch: int) -> float | None:
    """The batch-level self-paced threshold: from the ledger's keep-quantile (or the threshold knob)."""
    sp = config.self_paced
    if sp is None or sp.level != "batch":
        return None
    t = plan.clock.progress(epoch)
    if sp.threshold is not None:
        return float(sp.threshold(t))
    seen = loader.ledger.seen.cpu()
    if not bool(seen.any()):
        return None  # nothing scored yet: the first epoch trains on every sample
    assert sp.keep is not None
    return loss_quantile(loader.ledger.losses.cpu()[seen], float(sp.keep(t))) * (1 + 1e-6)


# --------------------------------------------------------------------------------------------
# The composition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    """``Σ_i v_i·((1 − s)·ℓ_i + s·KD_i) / L + λ·FixMatch``: the terms of one run, composed here and only here."""

    supervised: Supervised
    self_paced: SelfPaced = SelfPaced()
    distillation: Distillation | None = None
    fixmatch: FixMatch | None = None

    @property
    def sums(self) -> tuple[str, ...]:
        """The names of every metric sum the terms add each step."""
        return tuple(name for term in self._terms() for name in term.sums)

    def _terms(self) -> list[Supervised | Distillation | FixMatch]:
        return [term for term in (self.supervised, self.distillation, self.fixmatch) if term is not None]

    def __call__(self, batch: Batch, loader_weights: Tensor | None) -> tuple[Tensor, Tensor, Sums]:
        """The loss to minimise, ℓ per labeled sample (for the ledger) and the step's metric sums."""
        per_sample, sums = self.supervised(batch)
        trained = per_sample
        if self.distillation is not None:
            distill, distill_sums = self.distillation(batch)
            share = self.distillation.share(batch)
            trained = (1.0 - share) * per_sample + share * distill
            sums.update(distill_sums)
        ranked = self.supervised.ledger_loss(batch, per_sample)
        weights = self.self_paced(ranked, loader_weights)  # judged on ℓ alone, not on the blend
        loss = trained.mean() if weights is None else (trained * weights).sum() / len(trained)
        if self.fixmatch is not None:
            unlabeled, fixmatch_sums = self.fixmatch(batch)
            sums.update(fixmatch_sums)
            if unlabeled is not None:
                loss = loss + unlabeled
        return loss, ranked, sums

    def metrics(self, totals: Mapping[str, float], step_metrics: Mapping[str, float] | None = None) -> dict[str, float]:
        """The epoch's named metrics from its totals; ``step_metrics`` (gradient norm) follow the supervised ones."""
        metrics = {**self.supervised.metrics(totals), **(step_metrics or {})}
        for term in self._terms()[1:]:
            metrics.update(term.metrics(totals))
        return metrics
