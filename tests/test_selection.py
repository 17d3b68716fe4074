"""Self-paced weights (SPEC.md §10 vectors) and the per-epoch selection policies."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from cycdata.ledger import LossLedger
from cycdata.selection import WEIGHTINGS, Selection, _kth_smallest, loss_quantile, select, spl_weights

NAN = math.nan
SPEC_LOSSES = [0.1, 0.5, 1.0, 2.0, 4.0]

# SPEC.md §10: λ_e = 0.6·1.5^e, hard and linear weights.
SPEC_TABLE = [
    (0, [1, 1, 0, 0, 0], [0.833333, 0.166667, 0, 0, 0]),
    (1, [1, 1, 0, 0, 0], [0.888889, 0.444444, 0, 0, 0]),
    (2, [1, 1, 1, 0, 0], [0.925926, 0.629630, 0.259259, 0, 0]),
    (3, [1, 1, 1, 1, 0], [0.950617, 0.753086, 0.506173, 0.012346, 0]),
    (4, [1, 1, 1, 1, 0], [0.967078, 0.835391, 0.670782, 0.341564, 0]),
]
SPEC_LOG = [
    (0.3, [0.806567, 0.625622, 0.295396, 0, 0]),
    (0.6, [0.871457, 0.756471, 0.557493, 0.114986, 0]),
    (0.9, [0.823909, 0.698970, 0.522879, 0.221849, 0.045757]),
]


def everything_seen(count: int) -> torch.Tensor:
    return torch.ones(count, dtype=torch.bool)


# --------------------------------------------------------------------------------------------
# spl_weights
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("epoch", "hard", "linear"), SPEC_TABLE)
def test_spec_hard_and_linear_table(epoch: int, hard: list[int], linear: list[float], dtype: torch.dtype) -> None:
    threshold = 0.6 * 1.5**epoch
    losses = torch.tensor(SPEC_LOSSES, dtype=dtype)
    assert spl_weights(losses, threshold, "hard").tolist() == hard
    assert spl_weights(losses, threshold, "linear").tolist() == pytest.approx(linear, abs=1e-6)
    assert spl_weights(losses, threshold).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("threshold", "expected"), SPEC_LOG)
def test_spec_log_table(threshold: float, expected: list[float], dtype: torch.dtype) -> None:
    losses = torch.tensor([0.05, 0.1, 0.2, 0.5, 0.8], dtype=dtype)
    assert spl_weights(losses, threshold, "log").tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spec_mixture_vector(dtype: torch.dtype) -> None:
    losses = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 4.0], dtype=dtype)
    weights = spl_weights(losses, 2.0, "mixture", mixture_ratio=0.25)  # λ1 = 2, λ2 = 0.5, ζ = 2/3
    assert weights.tolist() == pytest.approx([1, 1, 0.333333, 0.111111, 0, 0], abs=1e-6)


def test_spec_kumar_form_gives_the_hard_selections() -> None:
    losses = torch.tensor(SPEC_LOSSES, dtype=torch.float64)
    k = 1 / 0.6
    for _, hard, _ in SPEC_TABLE:
        assert spl_weights(losses, 1 / k, "hard").tolist() == hard
        k /= 1.5


def test_hard_is_strict_and_edge_losses() -> None:
    assert spl_weights(torch.tensor([0.5, 0.4999]), 0.5).tolist() == [0.0, 1.0]
    for weighting in WEIGHTINGS:
        weights = spl_weights(torch.tensor([NAN, -1.0, 0.0]), 0.5, weighting)
        assert weights.tolist() == [0.0, 1.0, 1.0], weighting  # NaN -> 0, negative counts as 0 -> 1
    assert spl_weights(torch.tensor([1, 2]), 1.5).dtype == torch.float32


@settings(max_examples=80, deadline=None)
@given(losses=st.lists(st.floats(0.0, 50.0), min_size=1, max_size=30), threshold=st.floats(0.01, 0.99),
       weighting=st.sampled_from(WEIGHTINGS), ratio=st.floats(0.05, 0.95))
def test_weights_lie_in_unit_interval_and_fall_with_the_loss(losses: list[float], threshold: float, weighting: str,
                                                             ratio: float) -> None:
    ordered = torch.tensor(sorted(losses), dtype=torch.float64)
    weights = spl_weights(ordered, threshold, weighting, mixture_ratio=ratio)
    assert bool(((weights >= 0) & (weights <= 1)).all())
    assert bool((weights[1:] <= weights[:-1] + 1e-12).all())
    assert bool((weights[ordered >= threshold] == 0).all())  # nothing at or above λ (= λ1) counts


@pytest.mark.parametrize(
    ("threshold", "weighting", "ratio", "message"),
    [
        (0.0, "hard", 0.5, "> 0"),
        (-1.0, "linear", 0.5, "> 0"),
        (NAN, "hard", 0.5, "> 0"),
        (math.inf, "hard", 0.5, "> 0"),
        (1.0, "log", 0.5, "below 1.*threshold mode.*another weighting"),
        (1.5, "log", 0.5, "below 1"),
        (0.5, "cubic", 0.5, "unknown weighting 'cubic'.*hard, linear, log, mixture"),
        (0.5, "mixture", 1.0, "mixture_ratio"),
        (0.5, "mixture", 0.0, "mixture_ratio"),
    ],
)
def test_spl_weights_refuses_bad_arguments(threshold: float, weighting: str, ratio: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spl_weights(torch.tensor([0.1]), threshold, weighting, mixture_ratio=ratio)


# --------------------------------------------------------------------------------------------
# loss_quantile and the bracketed selection behind it
# --------------------------------------------------------------------------------------------


def test_loss_quantile_small() -> None:
    losses = torch.tensor([4.0, 0.1, NAN, 2.0, 0.5, 1.0])
    assert loss_quantile(losses, 0.4) == 0.5  # 2 of the 5 recorded losses
    assert loss_quantile(losses, 1.0) == 4.0
    assert loss_quantile(losses, 0.01) == pytest.approx(0.1)
    assert math.isnan(loss_quantile(torch.full((3,), NAN), 0.5))
    assert loss_quantile(torch.arange(10.0), 0.7) == 6.0  # 0.7·10 is 7 samples, not 8
    for bad in (0.0, 1.5, NAN):
        with pytest.raises(ValueError, match="fraction"):
            loss_quantile(losses, bad)


@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "periodic", "ties"])
def test_bracketed_kth_matches_kthvalue(layout: str) -> None:
    count = 600_000  # above the direct-kthvalue size, so the sampled bracket is used
    generator = torch.Generator().manual_seed(1)
    data = {
        "random": torch.rand(count, generator=generator),
        "sorted": torch.arange(count, dtype=torch.float32),
        "reversed": torch.arange(count, 0, -1, dtype=torch.float32),
        # Adversarial for a strided sample: the sampled positions all hold the largest values.
        "periodic": torch.where(torch.arange(count) % (count // 32768) == 0, 1e6,
                                torch.rand(count, generator=generator)),
        "ties": torch.randint(0, 4, (count,), generator=generator).float(),
    }[layout]
    ordered = torch.sort(data).values  # not torch.kthvalue: quadratic on descending input
    ranks = [1, 17, count // 3, count // 2, count - 5, count]
    assert _kth_smallest(data, ranks) == [float(ordered[r - 1]) for r in ranks]
    assert loss_quantile(data, 0.25) == float(ordered[count // 4 - 1])


# --------------------------------------------------------------------------------------------
# select: keep mode
# --------------------------------------------------------------------------------------------


def test_keep_picks_exactly_the_lowest_losses_when_all_seen() -> None:
    generator = torch.Generator().manual_seed(0)
    losses = torch.randperm(1000, generator=generator).float() / 100
    chosen = select(losses, everything_seen(1000), keep=0.3, refresh_fraction=0.0)
    expected = torch.sort(torch.argsort(losses)[:300]).values
    assert torch.equal(chosen.indices, expected)
    assert chosen.indices.dtype == torch.int64 and chosen.weights.dtype == torch.float32
    assert torch.equal(chosen.weights, torch.ones(300))
    assert chosen.threshold == float(losses[expected].max()) and chosen.unseen == 0 and chosen.refreshed == 0


def test_keep_breaks_ties_by_lower_index() -> None:
    losses = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    chosen = select(losses, everything_seen(6), keep=0.5, refresh_fraction=0.0)
    assert chosen.indices.tolist() == [0, 1, 5] and chosen.threshold == 1.0


def test_keep_count_reads_the_fraction_as_written() -> None:
    chosen = select(torch.arange(10.0), everything_seen(10), keep=0.7, refresh_fraction=0.0)
    assert len(chosen.indices) == 7  # ceil(0.7·10) in binary floating point would be 8


def test_first_epoch_is_a_seeded_random_keep_share_of_unseen() -> None:
    losses, seen = torch.full((100,), NAN), torch.zeros(100, dtype=torch.bool)
    state = torch.random.get_rng_state()
    draws = [select(losses, seen, keep=0.25, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(torch.random.get_rng_state(), state)  # never the global RNG
    first, again, other = draws
    assert len(first.indices) == 25 and first.unseen == 25 and math.isnan(first.threshold)
    assert torch.equal(first.indices, again.indices)
    assert not torch.equal(first.indices, other.indices)
    assert torch.equal(first.indices, torch.sort(first.indices).values) and len(set(first.indices.tolist())) == 25
    assert torch.equal(first.weights, torch.ones(25))
    default = [select(losses, seen, keep=0.25).indices for _ in range(2)]
    assert torch.equal(*default)  # the default generator has a fixed seed
    assert first.indices.tolist() != list(range(25))  # random, not the first indices


def test_unseen_admitted_before_any_seen_sample() -> None:
    losses = torch.tensor([0.1, 0.2, NAN, 0.3, NAN, 0.4, 0.5, 0.6, NAN, 0.7])
    seen = ~losses.isnan()
    chosen = select(losses, seen, keep=0.5, refresh_fraction=0.0)
    assert chosen.indices.tolist() == [0, 1, 2, 4, 8]  # the 3 unseen, then the 2 lowest seen
    assert chosen.unseen == 3 and chosen.threshold == pytest.approx(0.2)
    few = select(losses, seen, keep=0.2, refresh_fraction=0.0)  # target 2 < 3 unseen: 2 of the unseen only
    assert len(few.indices) == 2 and set(few.indices.tolist()) <= {2, 4, 8} and few.unseen == 2


def test_per_class_keep_keeps_every_class() -> None:
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2)
    losses = torch.cat([torch.arange(8.0) / 10, torch.arange(4.0) + 5, torch.tensor([9.0, 8.0])])
    chosen = select(losses, everything_seen(14), keep=0.5, labels=labels, refresh_fraction=0.0)
    assert chosen.indices.tolist() == [0, 1, 2, 3, 8, 9, 13]  # 4 of class 0, 2 of class 1, 1 of class 2
    assert chosen.threshold == 8.0  # the largest per-class λ
    global_choice = select(losses, everything_seen(14), keep=0.5, refresh_fraction=0.0)
    assert set(labels[global_choice.indices].tolist()) == {0}  # without labels classes 1 and 2 vanish


def test_per_class_with_unseen_and_labels_in_any_order() -> None:
    labels = torch.tensor([3, 1, 3, 1, 3, 1, 3, 1])
    losses = torch.tensor([0.4, NAN, 0.3, 0.2, 0.1, 0.5, 0.9, 0.6])
    chosen = select(losses, ~losses.isnan(), keep=0.5, labels=labels, refresh_fraction=0.0)
    assert chosen.indices.tolist() == [1, 2, 3, 4]  # class 1: unseen 1 + lowest 3; class 3: 4 and 2
    assert chosen.unseen == 1


def test_refresh_readmits_excluded_samples_budget_neutral() -> None:
    count = 1000
    losses = torch.arange(count, dtype=torch.float32)  # the loss rank is the index
    chosen = select(losses, everything_seen(count), keep=0.5, refresh_fraction=0.1,
                    generator=torch.Generator().manual_seed(3))
    assert len(chosen.indices) == 500  # exactly the target
    assert chosen.refreshed == 50  # floor(0.1 · 500 excluded)
    kept = chosen.indices.tolist()
    assert kept[:450] == list(range(450))  # the 450 easiest by rank; 450..499 make room for the refresh
    refreshed = kept[450:]
    assert len(refreshed) == 50 and all(index >= 500 for index in refreshed)  # previously excluded ones
    assert chosen.threshold == 449.0
    again = select(losses, everything_seen(count), keep=0.5, refresh_fraction=0.1,
                   generator=torch.Generator().manual_seed(4))
    assert again.indices.tolist()[450:] != refreshed


def test_refresh_rounds_down_and_zero_turns_it_off() -> None:
    losses = torch.arange(10.0)
    assert select(losses, everything_seen(10), keep=0.5, refresh_fraction=0.19).refreshed == 0  # floor(0.95)
    assert select(losses, everything_seen(10), keep=0.5, refresh_fraction=0.2).refreshed == 1
    assert select(losses, everything_seen(10), keep=0.5, refresh_fraction=0.0).indices.tolist() == [0, 1, 2, 3, 4]


def test_refresh_cannot_exceed_the_seen_budget() -> None:
    losses = torch.tensor([0.1, NAN, NAN, 0.4, 0.5, 0.6, 0.7, 0.8])
    chosen = select(losses, ~losses.isnan(), keep=0.375, refresh_fraction=1.0)  # target 3 = 2 unseen + 1 seen
    assert len(chosen.indices) == 3 and chosen.refreshed == 1 and math.isnan(chosen.threshold)
    assert {1, 2} < set(chosen.indices.tolist()) and 0 not in chosen.indices.tolist()


@pytest.mark.parametrize("weighting", ["linear", "log", "mixture"])
def test_keep_soft_weights_use_the_next_loss_above(weighting: str) -> None:
    losses = torch.tensor([0.05, 0.1, 0.2, 0.5, 0.8, 0.9])
    chosen = select(losses, everything_seen(6), keep=0.5, weighting=weighting, refresh_fraction=0.0)
    assert chosen.indices.tolist() == [0, 1, 2] and chosen.threshold == pytest.approx(0.2)
    expected = spl_weights(losses[:3], float(losses[3]), weighting)  # λ' = 0.5, the next loss up
    assert torch.allclose(chosen.weights, expected) and bool((chosen.weights > 0).all())


def test_keep_soft_weights_when_nothing_is_excluded() -> None:
    losses = torch.tensor([0.2, 0.4])
    chosen = select(losses, everything_seen(2), keep=1.0, weighting="linear")
    assert chosen.threshold == pytest.approx(0.4)
    assert chosen.weights.tolist() == pytest.approx([1 - 0.2 / (0.4 * (1 + 1e-6)), 1 - 1 / (1 + 1e-6)], abs=1e-7)
    assert bool((chosen.weights > 0).all())


def test_keep_soft_weights_give_unseen_and_refreshed_weight_one() -> None:
    losses = torch.tensor([NAN, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])
    chosen = select(losses, ~losses.isnan(), keep=0.5, weighting="linear", refresh_fraction=0.5)
    # Target 6 = 1 unseen + 5 seen; 6 seen excluded by rank, floor(0.5·6) = 3 refreshed in their place.
    assert len(chosen.indices) == 6 and chosen.refreshed == 3 and chosen.unseen == 1
    weights = dict(zip(chosen.indices.tolist(), chosen.weights.tolist()))
    assert weights[0] == 1.0  # unseen
    ranked = [i for i in chosen.indices.tolist() if 1 <= i <= 5]
    assert ranked == [1, 2] and all(0 < weights[i] < 1 for i in ranked)
    assert [weights[i] for i in chosen.indices.tolist() if i > 5] == [1.0, 1.0, 1.0]


def test_keep_log_weighting_with_losses_too_large_says_what_to_do() -> None:
    with pytest.raises(ValueError, match=r"log weighting needs a loss threshold below 1.*threshold mode"):
        select(torch.tensor([0.5, 1.5, 2.5]), everything_seen(3), keep=0.5, weighting="log")


# --------------------------------------------------------------------------------------------
# select: threshold mode
# --------------------------------------------------------------------------------------------


def test_threshold_mode_hard_and_soft() -> None:
    losses = torch.tensor([0.1, 2.0, NAN, 0.5, 1.0, 4.0])
    seen = ~losses.isnan()
    hard = select(losses, seen, threshold=0.9, refresh_fraction=0.0)
    assert hard.indices.tolist() == [0, 2, 3] and hard.threshold == 0.9 and hard.unseen == 1
    linear = select(losses, seen, threshold=1.35, weighting="linear", refresh_fraction=0.0)
    assert linear.indices.tolist() == [0, 2, 3, 4]
    assert linear.weights.tolist() == pytest.approx([1 - 0.1 / 1.35, 1.0, 1 - 0.5 / 1.35, 1 - 1 / 1.35])


def test_threshold_mode_refresh_adds_excluded_samples() -> None:
    losses = torch.arange(100.0) / 10  # 0.0 .. 9.9
    chosen = select(losses, everything_seen(100), threshold=5.0, refresh_fraction=0.1,
                    generator=torch.Generator().manual_seed(0))
    assert chosen.refreshed == 5 and len(chosen.indices) == 55  # 50 below λ, plus floor(0.1·50)
    extra = [i for i in chosen.indices.tolist() if i >= 50]
    assert len(extra) == 5
    assert chosen.weights[chosen.indices >= 50].tolist() == [1.0] * 5


def test_threshold_mode_ignores_labels() -> None:
    losses = torch.tensor([0.1, 0.9, 0.2, 0.8])
    labels = torch.tensor([0, 1, 0, 1])
    with_labels = select(losses, everything_seen(4), threshold=0.5, labels=labels, refresh_fraction=0.0)
    assert with_labels.indices.tolist() == [0, 2]


def test_select_from_a_ledger() -> None:
    ledger = LossLedger(6)
    ledger.record(torch.tensor([0, 1, 2, 3]), torch.tensor([0.4, 0.3, 0.2, 0.1]))
    ledger.synchronize()
    chosen = select(ledger.losses, ledger.seen, keep=0.5, refresh_fraction=0.0)
    assert isinstance(chosen, Selection) and chosen.indices.tolist() == [3, 4, 5]


def test_weights_align_with_indices_at_scale() -> None:
    count = 400_000  # the bracketed selection path
    generator = torch.Generator().manual_seed(5)
    losses = (torch.rand(count, generator=generator) * 8).round() / 8  # heavy ties
    seen = torch.rand(count, generator=generator) < 0.95
    losses[~seen] = NAN
    chosen = select(losses, seen, keep=0.6, weighting="linear", refresh_fraction=0.0)
    assert len(chosen.indices) == math.ceil(0.6 * count)
    assert bool(torch.isin((~seen).nonzero().squeeze(1), chosen.indices).all())  # all unseen admitted
    picked = chosen.indices[seen[chosen.indices]]
    key = (losses.double() * 8).round() * count + torch.arange(count)  # (loss, index) order: losses are k/8
    key[~seen] = math.inf
    budget = math.ceil(0.6 * count) - int((~seen).sum())
    assert torch.equal(picked, torch.sort(torch.argsort(key)[:budget]).values)
    soft = float(losses[seen][losses[seen] > chosen.threshold].min())
    assert torch.allclose(chosen.weights[seen[chosen.indices]], spl_weights(losses[picked], soft, "linear"))


@settings(max_examples=60, deadline=None)
@given(
    losses=st.lists(st.floats(0.0, 5.0) | st.just(NAN), min_size=1, max_size=60),
    keep=st.floats(0.01, 1.0),
    refresh=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    weighting=st.sampled_from(["hard", "linear", "mixture"]),
    classes=st.integers(0, 3),
    seed=st.integers(0, 3),
)
def test_keep_mode_invariants(losses: list[float], keep: float, refresh: float, weighting: str, classes: int,
                              seed: int) -> None:
    values = torch.tensor(losses)
    seen = ~values.isnan()
    labels = None if classes == 0 else torch.arange(len(losses)) % classes
    chosen = select(values, seen, keep=keep, weighting=weighting, labels=labels, refresh_fraction=refresh,
                    generator=torch.Generator().manual_seed(seed))
    if labels is None:
        target = math.ceil(round(keep * len(losses), 9))
    else:
        target = sum(math.ceil(round(keep * int((labels == c).sum()), 9)) for c in range(classes))
    indices = chosen.indices.tolist()
    assert len(indices) == target
    assert indices == sorted(set(indices))
    assert chosen.weights.shape == chosen.indices.shape
    assert bool(((chosen.weights > 0) & (chosen.weights <= 1)).all())
    unseen = (~seen).nonzero().squeeze(1).tolist()
    if labels is None and len(unseen) <= target:
        assert set(unseen) <= set(indices)
    assert chosen.unseen == sum(1 for i in indices if not seen[i])


# --------------------------------------------------------------------------------------------
# select: bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of keep"),
        ({"keep": 0.5, "threshold": 1.0}, "exactly one of keep"),
        ({"keep": 0.0}, r"keep must be a fraction in \(0, 1\]"),
        ({"keep": 1.5}, r"keep must be a fraction in \(0, 1\]"),
        ({"keep": NAN}, "keep must be"),
        ({"threshold": 0.0}, "> 0"),
        ({"threshold": 1.5, "weighting": "log"}, "below 1"),
        ({"keep": 0.5, "weighting": "steep"}, "unknown weighting"),
        ({"keep": 0.5, "refresh_fraction": 1.5}, "refresh_fraction"),
        ({"keep": 0.5, "mixture_ratio": 1.5, "weighting": "mixture"}, "mixture_ratio"),
        ({"keep": 0.5, "labels": torch.tensor([0.0, 1.0, 0.0])}, "labels"),
        ({"keep": 0.5, "labels": torch.tensor([0, 1])}, "labels"),
    ],
)
def test_select_refuses_bad_arguments(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        select(torch.tensor([0.1, 0.2, 0.3]), everything_seen(3), **kwargs)


def test_select_refuses_bad_tensors() -> None:
    with pytest.raises(ValueError, match="seen must be a bool"):
        select(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]), keep=0.5)
    with pytest.raises(ValueError, match="seen must be a bool"):
        select(torch.tensor([0.1, 0.2]), everything_seen(3), keep=0.5)
    with pytest.raises(ValueError, match="1-D floating"):
        select(torch.tensor([1, 2]), everything_seen(2), keep=0.5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        select(torch.tensor([0.1, NAN]), everything_seen(2), keep=0.5)
    with pytest.raises(ValueError, match="NaN or infinite"):
        select(torch.tensor([0.1, math.inf, NAN]), torch.tensor([True, True, False]), keep=0.5)


def test_keep_soft_weights_with_zero_or_negative_losses() -> None:
    losses = torch.tensor([-2.0, -1.0, 0.0, 0.0])
    chosen = select(losses, everything_seen(4), keep=0.5, weighting="linear", refresh_fraction=0.0)
    assert chosen.indices.tolist() == [0, 1] and chosen.weights.tolist() == [1.0, 1.0]
    zeros = select(torch.zeros(3), everything_seen(3), keep=1.0, weighting="mixture")
    assert zeros.weights.tolist() == [1.0, 1.0, 1.0] and zeros.threshold == 0.0


# --------------------------------------------------------------------------------------------
# The numpy passes over a CPU ledger give what torch's kernels give
# --------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    losses=st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(0.0, 5.0, width=32) | st.just(NAN),
                    min_size=1, max_size=80),
    keep=st.sampled_from([None, 0.01, 0.3, 0.5, 0.99, 1.0]),
    refresh=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    weighting=st.sampled_from(["hard", "linear", "mixture"]),
    classes=st.integers(0, 3),
    seed=st.integers(0, 3),
)
def test_numpy_and_torch_passes_select_the_same(losses: list[float], keep: float | None, refresh: float,
                                                weighting: str, classes: int, seed: int) -> None:
    import cycdata.selection as selection

    values = torch.tensor(losses)
    seen = ~values.isnan()
    labels = None if classes == 0 or keep is None else torch.arange(len(losses)) % classes
    mode = {"threshold": 0.9} if keep is None else {"keep": keep}

    def run() -> Selection:
        return select(values, seen, weighting=weighting, labels=labels, refresh_fraction=refresh,
                      generator=torch.Generator().manual_seed(seed), **mode)

    fast = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(selection, "_host_array", lambda tensor: None)  # every pass on torch's kernels
        reference = run()
    assert torch.equal(fast.indices, reference.indices) and fast.indices.dtype == torch.int64
    assert torch.equal(fast.weights, reference.weights)
    assert (fast.threshold, fast.unseen, fast.refreshed) == pytest.approx(
        (reference.threshold, reference.unseen, reference.refreshed), nan_ok=True, rel=0, abs=0)


def test_numpy_and_torch_passes_agree_on_large_random_subsets(monkeypatch: pytest.MonkeyPatch) -> None:
    import cycdata.selection as selection

    count = 150_000  # unseen pool above the small-permutation size: random keys and the bracketed selection
    generator = torch.Generator().manual_seed(9)
    losses = torch.rand(count, generator=generator)
    seen = torch.rand(count, generator=generator) < 0.3
    losses[~seen] = NAN
    fast = select(losses, seen, keep=0.4, refresh_fraction=0.05, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(selection, "_host_array", lambda tensor: None)
    reference = select(losses, seen, keep=0.4, refresh_fraction=0.05, generator=torch.Generator().manual_seed(1))
    assert torch.equal(fast.indices, reference.indices) and fast.unseen == reference.unseen
