"""Self-paced learning: sample weights from losses, and each epoch's selection (SPEC.md §10).

:func:`spl_weights` gives the closed-form self-paced weight ``v*(ℓ; λ)`` of a loss ``ℓ`` under a
loss threshold ``λ`` (hard, linear, logarithmic, mixture). :func:`select` turns the loss ledger
(:mod:`cycdata.ledger`) into the dataset indices, and their weights, to train on in one epoch:

* **keep mode** (``keep``: a fraction in (0, 1]): exactly ``ceil(keep·N)`` samples (per class with
  ``labels``: ``ceil(keep·n_c)`` of each class c, so no class disappears). λ is the loss of the
  highest-loss seen sample admitted by rank.
* **threshold mode** (``threshold``: λ itself): the seen samples whose weight is > 0.

Two directions, as policies of the one ledger (``policy``):

* **easy_first** (the paper's self-paced keep, the default): train on the lowest-loss samples; the rules
  below.
* **prune** (InfoBatch's direction, SPEC.md §10b): keep mode only. Drop ``N − ceil(keep·N)`` samples, all
  of them *well-learned*, at random, and weigh the kept well-learned ones by the inverse of their keep
  probability so the epoch's expected (weighted) gradient is the full epoch's. The well-learned pool W is
  the seen samples whose loss is below the seen mean (InfoBatch's rule), widened by loss rank (then by
  unseen samples, drawn at random) until at most ``max_drop`` of it is dropped; the dropped samples are a
  uniformly random subset of W, so each member of W is kept with probability exactly ``(|W| − D)/|W|`` and
  weighs ``|W|/(|W| − D)`` (1 with ``rescale=False``). Every sample outside W trains with weight 1;
  ``keep = 1`` trains on everything. There is no refresh: a dropped sample's loss is as fresh as
  the epoch it was last drawn in, and it is drawn again at random.

Easy-first policies (each chosen so that every rank, given the same ledger and seed, selects the same set):

* **Unseen samples first.** A sample without a loss is admitted before any seen sample is excluded,
  with weight 1; otherwise a sample excluded in epoch 0 would never get a loss. When the unseen
  outnumber the keep target, a random ``target``-subset of them is taken (the first epoch is a
  random ``keep`` share of the data).
* **Refreshing stale losses.** An excluded sample is not trained on, so its loss is not re-measured
  and stays as stale as the epoch it was excluded in, while the model improves: plain SPL would keep
  excluding it on old evidence (a known weakness of self-paced learning). Each epoch a
  ``refresh_fraction`` share (rounded down) of the excluded seen samples, drawn at random, is
  re-admitted with weight 1 so the training pass measures it again. In keep mode this is
  budget-neutral: the refreshed samples replace as many of the highest-loss seen samples admitted by
  rank, and the count stays exactly the target. In threshold mode they are added.
  ``refresh_fraction=0`` turns it off.
* **Soft weights in keep mode.** The highest-loss admitted sample has ``ℓ = λ``, which every soft
  weighting maps to 0. The weights therefore use ``λ'`` = the next seen loss above λ (the lowest
  loss left out by rank), or ``λ·(1 + 1e-6)`` when none is left out; so each sample admitted by rank
  gets a weight > 0 and the weights still fall to 0 where the excluded samples begin.
  ``Selection.threshold`` reports λ itself.
* **Non-finite losses rank last.** A sample whose latest loss was NaN or infinite (``nonfinite``,
  :attr:`cycdata.ledger.LossLedger.nonfinite`) is the worst sample there is: it is admitted only when the
  keep target needs more samples than all the others (at ``keep = 1`` every sample trains), never by a
  threshold and never as a refresh, and weighs 1 when admitted (its loss is measured again). Without this
  rule such a sample would look unseen forever and be admitted first every epoch.
* **Ties** are broken by dataset index (the lower index first), as a stable sort by (loss, index)
  would; randomness comes only from ``generator`` (default: a fixed seed), never the global RNG.

Cost: O(N) passes plus selection in a small bracket (no full sort): a 10-million-sample ledger
takes a fraction of a second on two CPU cores (``benchmarks/selection.py``).

Example:
    >>> import torch
    >>> losses = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, float("nan")])
    >>> seen = ~losses.isnan()
    >>> chosen = select(losses, seen, keep=0.5, refresh_fraction=0.0)
    >>> chosen.indices.tolist(), chosen.threshold, chosen.unseen   # the unseen sample 5, then the two easiest
    ([0, 1, 5], 0.5, 1)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor

__all__ = ["POLICIES", "WEIGHTINGS", "Selection", "loss_quantile", "prune_weight", "select", "spl_weights"]

WEIGHTINGS = ("hard", "linear", "log", "mixture")
POLICIES = ("easy_first", "prune")

# Below this many entries torch.kthvalue is already fast; above it, bracket the rank with a sample.
_DIRECT_SELECT = 1 << 18
_SAMPLE_SIZE = 1 << 15
_SMALL_PERMUTATION = 1 << 16


# --------------------------------------------------------------------------------------------
# Self-paced weights (SPEC.md §10)
# --------------------------------------------------------------------------------------------


def _check_weighting(weighting: str, threshold: float | None, mixture_ratio: float) -> None:
    """Refuse an unknown weighting, or a λ (when given) or mixture ratio outside the weighting's domain."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if isinstance(mixture_ratio, bool) or not isinstance(mixture_ratio, numbers.Real) or not 0 < mixture_ratio < 1:
        raise ValueError(f"mixture_ratio must lie in (0, 1) (λ2 = mixture_ratio·λ1 below λ1), got {mixture_ratio!r}")
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold < math.inf:
        raise ValueError(f"the loss threshold λ must be a finite number > 0, got {threshold!r}; "
                         "a sample is easy when its loss is below λ")
    if weighting == "log" and threshold >= 1:
        raise ValueError(f"log weighting needs a loss threshold below 1 (ζ = 1 − λ must lie in (0, 1)), got "
                         f"λ = {threshold:g}; use threshold mode with a value < 1, or another weighting "
                         "('hard', 'linear' or 'mixture')")


def spl_weights(losses: Tensor, threshold: float, weighting: str = "hard", *, mixture_ratio: float = 0.5) -> Tensor:
    """Self-paced weights ``v*(ℓ)`` for loss threshold ``λ = threshold`` (SPEC.md §10).

    * hard: ``1[ℓ < λ]`` (strict)
    * linear: ``max(0, 1 − ℓ/λ)``
    * log (0 < λ < 1, ζ = 1 − λ): ``log(ℓ + ζ)/log ζ`` if ℓ < λ, else 0
    * mixture (λ1 = λ, λ2 = mixture_ratio·λ, ζ = λ1·λ2/(λ1 − λ2)): 1 if ℓ ≤ λ2, 0 if ℓ ≥ λ1,
      else ``ζ/ℓ − ζ/λ1``

    Negative losses count as 0 (weight 1: the weights are the minimisers over v ∈ [0, 1]); NaN
    losses get weight 0.

    Args:
        losses: per-sample losses (any shape).
        threshold: λ, > 0 (and < 1 for ``log``).
        weighting: one of :data:`WEIGHTINGS`.
        mixture_ratio: λ2/λ1 for ``mixture``, in (0, 1).

    Returns:
        Weights in [0, 1], the shape of ``losses``, its floating dtype (float32 for integer input).

    Example:
        >>> losses = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0])
        >>> spl_weights(losses, 0.6).tolist()
        [1.0, 1.0, 0.0, 0.0, 0.0]
        >>> [round(w, 6) for w in spl_weights(losses, 1.35, "linear").tolist()]
        [0.925926, 0.62963, 0.259259, 0.0, 0.0]
    """
    _check_weighting(weighting, threshold, mixture_ratio)
    loss = (losses if losses.is_floating_point() else losses.float()).clamp_min(0.0)
    # Strict comparisons throughout, so a NaN loss (never < or <= anything) lands on weight 0.
    if weighting == "hard":
        return (loss < threshold).to(loss.dtype)
    if weighting == "linear":
        return torch.where(loss < threshold, 1.0 - loss / threshold, 0.0)
    if weighting == "log":
        zeta = 1.0 - threshold
        return torch.where(loss < threshold, torch.log(loss + zeta) / math.log(zeta), 0.0)
    low, high = mixture_ratio * threshold, threshold
    zeta = high * low / (high - low)
    return torch.where(loss <= low, 1.0, torch.where(loss < high, zeta / loss - zeta / high, 0.0))


# --------------------------------------------------------------------------------------------
# Order statistics without a full sort
# --------------------------------------------------------------------------------------------


def fraction_count(fraction: float, total: int, *, round_up: bool) -> int:
    """``ceil`` (or ``floor``) of ``fraction·total``, reading ``fraction`` as the decimal it was written as.

    In binary floating point 0.7·10 is 7.000000000000001, whose ceiling is 8; users mean 7.

    Example:
        >>> fraction_count(0.7, 10, round_up=True), fraction_count(0.29, 100, round_up=False)
        (7, 29)
    """
    exact = Fraction(repr(float(fraction))) * total
    return math.ceil(exact) if round_up else math.floor(exact)


def _kth_smallest(values: Tensor, ranks: Sequence[int]) -> list[float]:
    """Exact k-th smallest values (1-based ``ranks``) of a 1-D tensor without NaN.

    For large inputs a strided sample brackets the wanted ranks (Floyd–Rivest): one pass counts what
    lies below the bracket and only the values inside it are sorted. If the bracket misses (an
    adversarial order), everything is sorted. Sorting, not ``torch.kthvalue``: on CPU its quickselect
    is quadratic on descending input (64,000 values: 130 ms; 10 million: most of an hour).

    Example:
        >>> _kth_smallest(torch.tensor([5.0, 1.0, 3.0, 2.0]), [1, 3, 4])
        [1.0, 3.0, 5.0]
    """
    count = values.numel()
    if count <= _DIRECT_SELECT:
        return _select_exact(values, ranks)
    sample = torch.sort(values[:: count // _SAMPLE_SIZE]).values
    size = sample.numel()
    margin = 4.0 * math.sqrt(size) + 2.0  # the sample rank is binomial: sd <= sqrt(size)/2
    low_rank = math.floor(min(ranks) * size / count - margin)
    high_rank = math.ceil(max(ranks) * size / count + margin)
    low = float(sample[low_rank - 1]) if low_rank >= 1 else -math.inf
    high = float(sample[high_rank - 1]) if high_rank <= size else math.inf
    below = int(torch.count_nonzero(values < low))
    inside = (values >= low) & (values <= high)
    inside_count = int(torch.count_nonzero(inside))
    if not all(below < rank <= below + inside_count for rank in ranks):
        return _select_exact(values, ranks)
    return _select_exact(values[inside], [rank - below for rank in ranks])


def _select_exact(values: Tensor, ranks: Sequence[int]) -> list[float]:
    """The k-th smallest values by a full pass: numpy's introselect on the CPU (O(n), worst case
    O(n log n), several times faster than a sort), a sort elsewhere."""
    if values.device.type == "cpu":
        partitioned = np.partition(values.numpy(), sorted({rank - 1 for rank in ranks}))
        return [float(partitioned[rank - 1]) for rank in ranks]
    return _pick(torch.sort(values).values, ranks)


def _pick(ordered: Tensor, ranks: Sequence[int]) -> list[float]:
    """The entries of an ascending tensor at 1-based ``ranks``, as floats."""
    return [float(ordered[rank - 1]) for rank in ranks]


# numpy computes these passes over a CPU ledger several times faster than torch's CPU kernels (float
# comparisons, reductions over bool, nonzero: 50,000 entries, 5 µs against 85 µs for ``<=``, 55 µs against
# 420 µs for nonzero, measured with one thread); both give the same values.
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.bool, torch.int64)


def _host_array(tensor: Tensor) -> np.ndarray | None:
    """A numpy view of a CPU tensor of a dtype numpy holds exactly, else None (use torch)."""
    if tensor.device.type == "cpu" and tensor.dtype in _NUMPY_DTYPES:
        return tensor.detach().numpy()
    return None


def _nonzero(mask: Tensor) -> Tensor:
    """Positions of a 1-D mask's True entries, ascending (int64), as ``mask.nonzero().squeeze(1)``.

    Example:
        >>> _nonzero(torch.tensor([False, True, True])).tolist()
        [1, 2]
    """
    host = _host_array(mask)
    if host is not None:
        return torch.from_numpy(np.flatnonzero(host))
    return mask.nonzero().squeeze(1)


def _at_most(values: Tensor, bound: float) -> Tensor:
    """``values <= bound`` (the bound cast to the values' dtype, as torch and numpy both do for a Python float)."""
    host = _host_array(values)
    if host is not None:
        return torch.from_numpy(host <= bound)
    return values <= bound


def _smallest_mask(values: Tensor, count: int, kth: float) -> Tensor:
    """Mask of the ``count`` smallest ``values`` (``kth`` = the count-th smallest); ties: lower index first.

    Example:
        >>> _smallest_mask(torch.tensor([2.0, 1.0, 2.0, 2.0]), 3, 2.0).tolist()
        [True, True, True, False]
    """
    if count <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    at_most = _at_most(values, kth)
    if int(torch.count_nonzero(at_most)) == count:  # no tie straddles the cut: the usual case
        return at_most
    below = values < kth
    ties = values == kth
    need = count - int(torch.count_nonzero(below))
    return below | (ties & (torch.cumsum(ties, 0) <= need))


def _random_subset(mask: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """A uniformly random ``count``-subset of ``mask``'s True entries, as a mask.

    I.i.d. random keys, the ``count`` smallest kept: O(n), unlike a permutation of everything.

    Example:
        >>> pick = _random_subset(torch.tensor([True, False, True, True]), 2, torch.Generator().manual_seed(0))
        >>> int(pick.sum()), bool(pick[1])
        (2, False)
    """
    if count <= 0:
        return torch.zeros_like(mask)
    positions = _nonzero(mask)
    if count >= positions.numel():
        return mask.clone()
    chosen = torch.zeros_like(mask)
    if positions.numel() <= _SMALL_PERMUTATION:  # small pools: a permutation is cheaper than keys + selection
        picked = torch.randperm(positions.numel(), generator=generator, device=generator.device)[:count]
        return chosen.index_fill_(0, positions.index_select(0, picked.to(mask.device)), True)
    keys = torch.rand(positions.numel(), dtype=torch.float64, generator=generator, device=generator.device)
    keys = keys.to(mask.device)
    (kth,) = _kth_smallest(keys, [count])
    picked = _nonzero(_smallest_mask(keys, count, kth))
    return chosen.index_fill_(0, positions.index_select(0, picked), True)


def loss_quantile(losses: Tensor, fraction: float) -> float:
    """The loss at or below which ``fraction`` of the entries lie (the ``ceil(fraction·n)``-th smallest).

    NaN entries (never-recorded samples in a ledger) are left out; with none left, NaN. Uses
    selection, not ``torch.quantile`` (which refuses more than 16 million entries).

    Args:
        losses: 1-D losses.
        fraction: in (0, 1].

    Example:
        >>> loss_quantile(torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0, float("nan")]), 0.4)
        0.5
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    values = losses.reshape(-1)
    values = values[~values.isnan()]
    if values.numel() == 0:
        return math.nan
    rank = max(1, fraction_count(fraction, values.numel(), round_up=True))
    return _kth_smallest(values, [rank])[0]


# --------------------------------------------------------------------------------------------
# The epoch's selection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Selection:
    """What one epoch trains on.

    Attributes:
        indices: int64, sorted ascending: the dataset indices to train on.
        weights: float32, aligned with ``indices`` (all 1.0 for hard weighting).
        threshold: the loss threshold λ in effect (keep mode: the highest loss admitted by rank,
            the largest over classes with labels); NaN when no seen sample is admitted by loss.
        unseen: never-scored samples admitted.
        refreshed: excluded (stale) seen samples re-admitted to re-measure their loss.

    Example:
        >>> chosen = select(torch.tensor([0.3, 0.1, 0.2]), torch.ones(3, dtype=torch.bool), keep=0.5)
        >>> chosen.indices.tolist(), chosen.weights.tolist(), chosen.threshold == float(torch.tensor(0.2))
        ([1, 2], [1.0, 1.0], True)
    """

    indices: Tensor
    weights: Tensor
    threshold: float
    unseen: int
    refreshed: int


def _soft_threshold(keys: Tensor, threshold: float) -> float:
    """λ' for soft weights in keep mode: the next seen loss above λ, else λ·(1 + 1e-6).

    Example:
        >>> _soft_threshold(torch.tensor([0.5, 1.0, 2.0, math.inf]), 1.0), _soft_threshold(torch.tensor([1.0]), 1.0)
        (2.0, 1.000001)
    """
    above = torch.where(keys > threshold, keys, math.inf)
    following = float(above.min()) if above.numel() else math.inf
    if not math.isfinite(following):
        following = threshold * (1.0 + 1e-6)
    # λ' must be > 0 for the formulas; all-zero (or negative) losses all get weight 1 with a tiny λ'.
    return max(following, torch.finfo(torch.float32).tiny)


def _keep_part(losses: Tensor, seen: Tensor, target: int, weighting: str, refresh_fraction: float,
               mixture_ratio: float, generator: torch.Generator) -> Selection:
    """Keep-mode selection of exactly ``target`` samples from one pool (indices local to the pool)."""
    unseen = ~seen
    unseen_count = int(torch.count_nonzero(unseen))
    if unseen_count >= target:
        indices = _nonzero(_random_subset(unseen, target, generator))
        return Selection(indices, torch.ones(indices.numel(), device=losses.device), math.nan, indices.numel(), 0)
    seen_count = losses.numel() - unseen_count
    budget = target - unseen_count  # seen samples to admit
    refresh = min(fraction_count(refresh_fraction, seen_count - budget, round_up=False), budget)
    ranked = budget - refresh  # seen samples admitted by loss
    # Unseen entries rank last; seen losses are finite (checked by select). (index_fill_ of the unseen
    # positions: the same as masked_fill, which is several times slower on a scattered CPU mask.)
    keys = losses if unseen_count == 0 else losses.clone().index_fill_(0, _nonzero(unseen), math.inf)
    cuts = sorted({rank for rank in (ranked, budget) if 0 < rank})
    kth = dict(zip(cuts, _kth_smallest(keys, cuts)))
    by_rank = _smallest_mask(keys, ranked, kth.get(ranked, math.nan))
    if refresh:
        excluded = seen & ~_smallest_mask(keys, budget, kth.get(budget, math.nan))
        admitted = by_rank | _random_subset(excluded, refresh, generator)
    else:  # nothing to refresh: the admitted seen samples are the ranked ones (no random draw either way)
        admitted = by_rank
    if unseen_count:
        admitted = admitted | unseen
    indices = _nonzero(admitted)
    threshold = kth[ranked] if ranked > 0 else math.nan
    if weighting == "hard" or ranked == 0:
        return Selection(indices, torch.ones(indices.numel(), device=losses.device), threshold, unseen_count, refresh)
    soft = _soft_threshold(keys, threshold)
    if weighting == "log" and soft >= 1.0:
        raise ValueError(f"log weighting needs a loss threshold below 1, but this keep fraction admits losses up "
                         f"to {threshold:g} (λ' = {soft:g}); use threshold mode with a value < 1, a smaller keep, "
                         "or another weighting ('hard', 'linear' or 'mixture')")
    weights = spl_weights(losses[indices], soft, weighting, mixture_ratio=mixture_ratio).float()
    weights = torch.where(by_rank[indices], weights, 1.0)  # unseen and refreshed samples weigh 1
    return Selection(indices, weights, threshold, unseen_count, refresh)


def _threshold_part(losses: Tensor, seen: Tensor, threshold: float, weighting: str, refresh_fraction: float,
                    mixture_ratio: float, generator: torch.Generator) -> Selection:
    """Threshold-mode selection: every unseen sample, the seen ones with weight > 0, plus refreshes."""
    unseen = ~seen
    weights = spl_weights(losses.masked_fill(unseen, math.inf), threshold, weighting, mixture_ratio=mixture_ratio)
    by_weight = weights > 0
    excluded = seen & ~by_weight
    refresh = fraction_count(refresh_fraction, int(torch.count_nonzero(excluded)), round_up=False)
    refreshed = _random_subset(excluded, refresh, generator)
    indices = _nonzero(by_weight | refreshed | unseen)
    chosen_weights = torch.where(by_weight[indices], weights[indices].float(), 1.0)
    return Selection(indices, chosen_weights, float(threshold), int(torch.count_nonzero(unseen)), refresh)


def _seen_finite(losses: Tensor, seen: Tensor) -> bool:
    """Whether every seen sample's loss is finite (with everything seen, one min/max pass).

    Example:
        >>> _seen_finite(torch.tensor([1.0, math.nan]), torch.tensor([True, False]))
        True
    """
    if losses.numel() == 0:
        return True
    host_seen, host_losses = _host_array(seen), _host_array(losses)
    if host_seen is not None and host_losses is not None:
        if host_seen.all():
            return bool(np.isfinite(host_losses.min()) and np.isfinite(host_losses.max()))
        return not (host_seen & ~np.isfinite(host_losses)).any()
    if bool(seen.all()):
        low, high = torch.aminmax(losses)
        return math.isfinite(float(low)) and math.isfinite(float(high))
    return not bool((seen & ~torch.isfinite(losses)).any())


def _check_select_inputs(losses: Tensor, seen: Tensor, keep: float | None, threshold: float | None,
                         labels: Tensor | None, refresh_fraction: float) -> None:
    """Refuse bad arguments up front, each with what to pass instead."""
    if not isinstance(losses, Tensor) or losses.ndim != 1 or not losses.is_floating_point():
        raise ValueError("losses must be a 1-D floating tensor (LossLedger.losses)")
    if not isinstance(seen, Tensor) or seen.dtype != torch.bool or seen.shape != losses.shape:
        raise ValueError(f"seen must be a bool tensor shaped like losses {tuple(losses.shape)} (LossLedger.seen)")
    if seen.device != losses.device:
        raise ValueError(f"losses and seen must be on one device, got {losses.device} and {seen.device}")
    if (keep is None) == (threshold is None):
        raise ValueError("give exactly one of keep (the fraction of samples to train on, in (0, 1]) and "
                         "threshold (a loss value λ > 0)")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0 < keep <= 1):
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if isinstance(refresh_fraction, bool) or not isinstance(refresh_fraction, numbers.Real) \
            or not 0 <= refresh_fraction <= 1:
        raise ValueError(f"refresh_fraction must lie in [0, 1] (0 turns refreshing off), got {refresh_fraction!r}")
    if labels is not None and (not isinstance(labels, Tensor) or labels.shape != losses.shape
                               or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool):
        raise ValueError(f"labels must be an integer tensor shaped like losses {tuple(losses.shape)}, or None")
    if not _seen_finite(losses, seen):
        raise ValueError("a seen sample has a NaN or infinite loss; LossLedger never records those, so pass "
                         "LossLedger.losses and LossLedger.seen together")


def select(losses: Tensor, seen: Tensor, *, keep: float | None = None, threshold: float | None = None,
           weighting: str = "hard", labels: Tensor | None = None, refresh_fraction: float = 0.05,
           mixture_ratio: float = 0.5, generator: torch.Generator | None = None,
           nonfinite: Tensor | None = None, policy: str = "easy_first", rescale: bool = True,
           max_drop: float = 0.5) -> Selection:
    """Choose the samples (and their weights) for one epoch; the policies are in the module docstring.

    Args:
        losses: float ``[N]``, each sample's latest loss (``LossLedger.losses``; unseen entries ignored).
        seen: bool ``[N]``, which samples have a loss (``LossLedger.seen``).
        keep: fraction of the data to train on, in (0, 1]; exclusive with ``threshold``.
        threshold: the loss threshold λ > 0; exclusive with ``keep``.
        weighting: one of :data:`WEIGHTINGS` (SPEC.md §10).
        labels: integer ``[N]``; in keep mode, keep ``ceil(keep·n_c)`` of every class c. An absolute
            threshold treats all classes alike, so threshold mode does not use them.
        refresh_fraction: share of the excluded seen samples re-admitted (rounded down), in [0, 1].
        mixture_ratio: λ2/λ1 for the mixture weighting, in (0, 1).
        generator: the only source of randomness (default: a fixed-seed CPU generator). Pass one
            seeded from (seed, epoch) for a new draw each epoch.
        nonfinite: bool ``[N]``, samples whose latest loss was NaN or infinite (``LossLedger.nonfinite``):
            ranked last, as the worst (module docstring), or None.
        policy: ``easy_first`` (keep the lowest-loss samples) or ``prune`` (drop well-learned samples at
            random, keep mode with hard weighting only; module docstring).
        rescale: with ``prune``, weigh the kept well-learned samples by their inverse keep probability.
        max_drop: with ``prune``, the largest share of the well-learned pool dropped, in (0, 1).

    Returns:
        A :class:`Selection` on the device of ``losses``.

    Example:
        >>> losses = torch.tensor([0.9, 0.1, 0.5, 0.3])
        >>> chosen = select(losses, torch.ones(4, dtype=torch.bool), threshold=0.6, weighting="linear",
        ...                 refresh_fraction=0.0)
        >>> chosen.indices.tolist(), [round(w, 4) for w in chosen.weights.tolist()]
        ([1, 2, 3], [0.8333, 0.1667, 0.5])
    """
    _check_select_inputs(losses, seen, keep, threshold, labels, refresh_fraction)
    _check_weighting(weighting, threshold, mixture_ratio)
    _check_policy(policy, keep, weighting, max_drop)
    if nonfinite is not None and (not isinstance(nonfinite, Tensor) or nonfinite.dtype != torch.bool
                                  or nonfinite.shape != losses.shape):
        raise ValueError(f"nonfinite must be a bool tensor shaped like losses {tuple(losses.shape)} "
                         "(LossLedger.nonfinite), or None")
    if nonfinite is not None:
        nonfinite = nonfinite.to(losses.device)
        if not bool(nonfinite.any()):
            nonfinite = None  # nothing marked: the usual epoch, no pools to split
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    if threshold is not None:
        if nonfinite is None:
            return _threshold_part(losses, seen, threshold, weighting, refresh_fraction, mixture_ratio, generator)
        pool = _nonzero(~nonfinite)  # a NaN loss is above every threshold: never admitted, never refreshed
        part = _threshold_part(losses[pool], seen[pool], threshold, weighting, refresh_fraction, mixture_ratio,
                               generator)
        return Selection(pool[part.indices], part.weights, part.threshold, part.unseen, part.refreshed)
    assert keep is not None
    if policy == "prune":
        def choose(pool_losses: Tensor, pool_seen: Tensor, marked: Tensor | None, target: int) -> Selection:
            return _prune_keeping_worst(pool_losses, pool_seen, marked, target, max_drop, rescale, generator)
    else:
        def choose(pool_losses: Tensor, pool_seen: Tensor, marked: Tensor | None, target: int) -> Selection:
            return _keep_worst_last(pool_losses, pool_seen, marked, target, weighting, refresh_fraction,
                                    mixture_ratio, generator)
    if labels is None:
        return choose(losses, seen, nonfinite, fraction_count(keep, losses.numel(), round_up=True))
    return _keep_per_class(losses, seen, keep, labels.to(losses.device), choose, nonfinite)


def _check_policy(policy: str, keep: float | None, weighting: str, max_drop: float) -> None:
    """Refuse an unknown policy, or pruning with what it cannot honour (a threshold, soft weights, bad max_drop)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown selection policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy != "prune":
        return
    if keep is None:
        raise ValueError("policy 'prune' needs keep (the share of samples trained on each epoch), not threshold")
    if weighting != "hard":
        raise ValueError(f"policy 'prune' weighs samples by their inverse keep probability; weighting must be "
                         f"'hard', got {weighting!r}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not 0 < max_drop < 1:
        raise ValueError(f"max_drop must lie in (0, 1) (the largest share of the well-learned samples dropped; "
                         f"InfoBatch drops 0.5), got {max_drop!r}")


def prune_weight(pool: int, dropped: int) -> float:
    """The weight of a kept well-learned sample when ``dropped`` of a ``pool`` of them are dropped at random.

    Each is kept with probability ``(pool − dropped)/pool``, so weighing it by the inverse keeps its
    expected contribution: SPEC.md §10b's tiny check drops one of two and weighs the other 2.

    Example:
        >>> prune_weight(2, 1), prune_weight(10, 4), prune_weight(10, 0)
        (2.0, 1.6666666666666667, 1.0)
    """
    return pool / (pool - dropped)


def _well_learned_size(losses: Tensor, seen: Tensor, drop: int, max_drop: float) -> int:
    """|W|: the seen samples below the seen mean, at least ``ceil(drop / max_drop)`` of them, at most all.

    Example:
        >>> losses, seen = torch.tensor([0.1, 0.2, 0.9, 1.0]), torch.ones(4, dtype=torch.bool)
        >>> _well_learned_size(losses, seen, 1, 0.5), _well_learned_size(losses, seen, 2, 0.5)
        (2, 4)
    """
    below_mean = 0
    if bool(seen.any()):
        seen_losses = losses[seen].double()
        below_mean = int(torch.count_nonzero(seen_losses < seen_losses.mean()))
    widened = math.ceil(Fraction(drop) / Fraction(repr(float(max_drop))))
    return min(losses.numel(), max(below_mean, widened))


def _prune_part(losses: Tensor, seen: Tensor, target: int, max_drop: float, rescale: bool,
                generator: torch.Generator) -> Selection:
    """Prune-policy selection of exactly ``target`` samples from one pool of finite or unseen losses.

    Example (SPEC.md §10b's tiny check: one of the two below the mean is dropped, the other weighs 2):
        >>> chosen = _prune_part(torch.tensor([0.1, 0.2, 0.9, 1.0]), torch.ones(4, dtype=torch.bool), 3, 0.5,
        ...                      True, torch.Generator().manual_seed(0))
        >>> len(chosen.indices), chosen.indices[-2:].tolist(), sorted(chosen.weights.tolist())
        (3, [2, 3], [1.0, 1.0, 2.0])
    """
    size = losses.numel()
    drop = size - target
    unseen = ~seen
    unseen_count = int(torch.count_nonzero(unseen))
    if drop <= 0:
        return Selection(torch.arange(size, device=losses.device), torch.ones(size, device=losses.device),
                         math.nan, unseen_count, 0)
    if target <= 0:  # the non-finite samples took the whole budget: nothing of this pool is kept, nothing weighs
        empty = torch.zeros(0, dtype=torch.int64, device=losses.device)
        return Selection(empty, torch.ones(0, device=losses.device), math.nan, 0, 0)
    pool_size = _well_learned_size(losses, seen, drop, max_drop)
    seen_count = size - unseen_count
    if pool_size <= seen_count:  # the lowest-loss seen samples, ties by index
        keys = losses if unseen_count == 0 else losses.clone().index_fill_(0, _nonzero(unseen), math.inf)
        (kth,) = _kth_smallest(keys, [pool_size])
        pool = _smallest_mask(keys, pool_size, kth)
        threshold = kth
    else:  # every seen sample, and unseen ones at random (they have no loss to rank by)
        pool = seen | _random_subset(unseen, pool_size - seen_count, generator)
        threshold = float(losses[seen].max()) if seen_count else math.nan
    dropped = _random_subset(pool, drop, generator)
    indices = _nonzero(~dropped)
    weights = torch.ones(indices.numel(), device=losses.device)
    if rescale:
        weights = weights.masked_fill(pool[indices], prune_weight(pool_size, drop))
    return Selection(indices, weights, threshold, int(torch.count_nonzero(unseen[indices])), 0)


def _prune_keeping_worst(losses: Tensor, seen: Tensor, nonfinite: Tensor | None, target: int, max_drop: float,
                         rescale: bool, generator: torch.Generator) -> Selection:
    """Prune over one pool; a sample whose latest loss was non-finite is the least learned there is: kept.

    Example:
        >>> losses, seen = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.ones(4, dtype=torch.bool)
        >>> marked = torch.tensor([True, False, False, False])   # sample 0's latest loss was NaN
        >>> _prune_keeping_worst(losses, seen, marked, 3, 0.5, True, torch.Generator()).indices[0].item()
        0
    """
    if nonfinite is None:
        return _prune_part(losses, seen, target, max_drop, rescale, generator)
    pool = _nonzero(~nonfinite)
    worst = _nonzero(nonfinite)
    if target < worst.numel():  # a budget smaller than the non-finite samples: a random share of them
        worst = _nonzero(_random_subset(nonfinite, target, generator))
    part = _prune_part(losses[pool], seen[pool], target - worst.numel(), max_drop, rescale, generator)
    indices, order = torch.sort(torch.cat([pool[part.indices], worst]))
    weights = torch.cat([part.weights, torch.ones(worst.numel(), device=part.weights.device)])[order]
    return Selection(indices, weights, part.threshold, part.unseen, 0)


def _keep_worst_last(losses: Tensor, seen: Tensor, nonfinite: Tensor | None, target: int, weighting: str,
                     refresh_fraction: float, mixture_ratio: float, generator: torch.Generator) -> Selection:
    """Keep mode over one pool with the non-finite samples ranked after every other (indices local to the pool).

    Example:
        >>> losses, seen = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.ones(4, dtype=torch.bool)
        >>> marked = torch.tensor([True, False, False, False])   # sample 0's latest loss was NaN
        >>> _keep_worst_last(losses, seen, marked, 2, "hard", 0.0, 0.5, torch.Generator()).indices.tolist()
        [1, 2]
    """
    if nonfinite is None:
        return _keep_part(losses, seen, target, weighting, refresh_fraction, mixture_ratio, generator)
    pool = _nonzero(~nonfinite)
    finite_target = min(target, pool.numel())
    part = _keep_part(losses[pool], seen[pool], finite_target, weighting, refresh_fraction, mixture_ratio,
                      generator)
    worst = _nonzero(_random_subset(nonfinite, target - finite_target, generator))  # only when the target needs them
    indices, order = torch.sort(torch.cat([pool[part.indices], worst]))
    weights = torch.cat([part.weights, torch.ones(worst.numel(), device=part.weights.device)])[order]
    return Selection(indices, weights, part.threshold, part.unseen, part.refreshed)


def _keep_per_class(losses: Tensor, seen: Tensor, keep: float, labels: Tensor,
                    choose: Callable[[Tensor, Tensor, Tensor | None, int], Selection],
                    nonfinite: Tensor | None = None) -> Selection:
    """Keep mode in every class separately (classes in ascending label order, one generator in ``choose``)."""
    _, counts = torch.unique(labels, return_counts=True)
    members = torch.argsort(labels, stable=True).split(counts.tolist())  # each class's indices, ascending
    parts = []
    for member in members:
        target = fraction_count(keep, member.numel(), round_up=True)
        marked = None if nonfinite is None else nonfinite[member]
        part = choose(losses[member], seen[member], marked, target)
        parts.append((member[part.indices], part))
    indices, order = torch.sort(torch.cat([global_indices for global_indices, _ in parts]))
    weights = torch.cat([part.weights for _, part in parts])[order]
    thresholds = [part.threshold for _, part in parts if not math.isnan(part.threshold)]
    return Selection(indices, weights, max(thresholds, default=math.nan), sum(part.unseen for _, part in parts),
                     sum(part.refreshed for _, part in parts))
