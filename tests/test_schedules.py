"""Golden values (SPEC.md §1.6), invariants and pickling of the cyclical coefficient and schedules."""

from __future__ import annotations

import math
import pickle
from fractions import Fraction as F

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cycdata
from cycdata.clock import Clock
from cycdata.schedules import (
    SCHEDULES,
    SHAPES,
    Clamp,
    Constant,
    Cosine,
    Cyclical,
    Join,
    Linear,
    Piecewise,
    Quantize,
    Warmup,
    cosine_xi,
    make_schedule,
    triangle_xi,
    xi,
)

# SPEC.md §1.6a: reference-code ξ for E = 10, factors 1..4, e = 0..9.
TABLE_1_6A = {
    1: [F(1), F(8, 9), F(7, 9), F(2, 3), F(5, 9), F(4, 9), F(1, 3), F(2, 9), F(1, 9), F(0)],
    2: [F(1), F(7, 9), F(5, 9), F(1, 3), F(1, 9), F(1, 9), F(1, 3), F(5, 9), F(7, 9), F(1)],
    3: [F(1), F(2, 3), F(1, 3), F(0), F(1, 6), F(1, 3), F(1, 2), F(2, 3), F(5, 6), F(1)],
    4: [F(1), F(5, 9), F(1, 9), F(1, 9), F(7, 27), F(11, 27), F(5, 9), F(19, 27), F(23, 27), F(1)],
}
VALUES_1_6A = {
    1: [1.0, 1.111111, 1.222222, 1.333333, 1.444444, 1.555556, 1.666667, 1.777778, 1.888889, 2.0],
    2: [1.0, 1.222222, 1.444444, 1.666667, 1.888889, 1.888889, 1.666667, 1.444444, 1.222222, 1.0],
    3: [1.0, 1.333333, 1.666667, 2.0, 1.833333, 1.666667, 1.5, 1.333333, 1.166667, 1.0],
    4: [1.0, 1.444444, 1.888889, 1.888889, 1.740741, 1.592593, 1.444444, 1.296296, 1.148148, 1.0],
}

# SPEC.md §1.6c: (E, f) -> {e: ξ}. Values e >= E are past the end: the reference extrapolates
# above 1 there (1.010050 for E=200, f=2, e=200); we clamp to 1 (documented deviation).
TABLE_1_6C = {
    (200, 2): {0: 1, 1: 0.989950, 49: 0.507538, 50: 0.497487, 99: 0.005025, 100: 0.005025, 199: 1},
    (201, 2): {0: 1, 1: 0.99, 49: 0.51, 50: 0.5, 99: 0.01, 100: 0, 199: 0.99, 200: 1},
    (200, 4): {0: 1, 1: 0.979899, 49: 0.015075, 50: 0.001675, 99: 0.329983, 100: 0.336683, 199: 1},
    (201, 4): {0: 1, 1: 0.98, 49: 0.02, 50: 0, 99: 0.326667, 100: 0.333333, 199: 0.993333, 200: 1},
    (200, 1): {0: 1, 1: 0.994975, 49: 0.753769, 50: 0.748744, 99: 0.502513, 100: 0.497487, 199: 0, 200: 0},
    (201, 1): {0: 1, 1: 0.995, 49: 0.755, 50: 0.75, 99: 0.505, 100: 0.5, 199: 0.005, 200: 0},
}


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_xi_reproduces_spec_table_1_6a(factor: int) -> None:
    for epoch, expected in enumerate(TABLE_1_6A[factor]):
        assert xi(epoch, 10, factor) == pytest.approx(float(expected), abs=1e-9)
        value = Cyclical(easy=1.0, hard=2.0, factor=factor)(Clock(10).progress(epoch))
        assert value == pytest.approx(VALUES_1_6A[factor][epoch], abs=5e-7)


@pytest.mark.parametrize(("epochs", "factor"), list(TABLE_1_6C))
def test_xi_reproduces_spec_table_1_6c(epochs: int, factor: int) -> None:
    for epoch, expected in TABLE_1_6C[(epochs, factor)].items():
        # The table prints 6 decimals; the exact values differ from them by < 5e-7.
        assert xi(epoch, epochs, factor) == pytest.approx(expected, abs=5e-7)


def test_xi_exact_values_to_1e9() -> None:
    assert xi(99, 200, 2) == pytest.approx(1 / 199, abs=1e-12)
    assert xi(50, 200, 4) == pytest.approx((200 / 199 - 1) / 3, abs=1e-12)
    assert xi(100, 201, 2) == 0.0
    assert xi(200, 201, 4) == pytest.approx(1.0, abs=1e-12)


def test_xi_clamps_reference_bugs() -> None:
    # Non-integer factor: the reference gives -0.0667 at E=10, f=3.2, e=3 (SPEC §1.5).
    assert xi(3, 10, 3.2) == 0.0
    # Past the end: the reference extrapolates to 1.01005 at E=200, f=2, e=200.
    assert xi(200, 200, 2) == 1.0
    assert xi(250, 200, 1) == 0.0


def test_xi_paper_normalization_matches_table_1_6b() -> None:
    assert [round(xi(e, 10, 2, normalization="paper"), 6) for e in range(11)] == [
        1.0,
        0.8,
        0.6,
        0.4,
        0.2,
        0.0,
        0.2,
        0.4,
        0.6,
        0.8,
        1.0,
    ]
    assert [round(xi(e, 10, 4, normalization="paper"), 6) for e in range(11)] == [
        1.0,
        0.6,
        0.2,
        0.066667,
        0.2,
        0.333333,
        0.466667,
        0.6,
        0.733333,
        0.866667,
        1.0,
    ]
    assert Clock(10, normalization="paper").progress(5) == 0.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1, 2), "epochs must be an integer >= 2"),
        ((0, 10, 0.5), "factor must be >= 1"),
        ((0, 10, math.nan), "factor must be a finite number"),
        ((math.inf, 10, 2), "epoch must be a finite number"),
        ((-1, 10, 2), "epoch must be >= 0"),
        ((0, 10.0, 2), "epochs must be an integer"),
    ],
)
def test_xi_rejects_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        xi(*args)


def test_spec_1_6d_derived_values() -> None:
    clock = Clock(10)
    wd2 = [Cyclical(1e-5, 8e-5, factor=2)(clock.progress(e)) for e in range(10)]
    assert wd2 == pytest.approx(
        [
            1.0e-5,
            2.555556e-5,
            4.111111e-5,
            5.666667e-5,
            7.222222e-5,
            7.222222e-5,
            5.666667e-5,
            4.111111e-5,
            2.555556e-5,
            1.0e-5,
        ],
        abs=1e-11,
    )
    wd4 = [Cyclical(1e-5, 8e-5, factor=4)(clock.progress(e)) for e in range(10)]
    assert wd4 == pytest.approx(
        [
            1.0e-5,
            4.111111e-5,
            7.222222e-5,
            7.222222e-5,
            6.185185e-5,
            5.148148e-5,
            4.111111e-5,
            3.074074e-5,
            2.037037e-5,
            1.0e-5,
        ],
        abs=1e-11,
    )
    temperature = [Cyclical(0.5, 2.0, factor=2)(clock.progress(e)) for e in range(10)]
    assert temperature == pytest.approx(
        [0.5, 0.833333, 1.166667, 1.5, 1.833333, 1.833333, 1.5, 1.166667, 0.833333, 0.5], abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Invariants
# ---------------------------------------------------------------------------------------------

factors = st.floats(min_value=1.0, max_value=16.0, allow_nan=False)
progress = st.floats(min_value=0.0, max_value=1.5, allow_nan=False)


@given(t=progress, factor=factors)
def test_every_shape_stays_in_unit_interval(t: float, factor: float) -> None:
    for shape in SHAPES.values():
        assert 0.0 <= shape(t, factor) <= 1.0


@given(factor=factors)
def test_triangle_starts_easy_peaks_hard_at_one_over_factor(factor: float) -> None:
    assert triangle_xi(0.0, factor) == 1.0
    assert triangle_xi(1.0 / factor, factor) == pytest.approx(0.0, abs=1e-12)
    if factor > 1:
        assert triangle_xi(1.0, factor) == pytest.approx(1.0, abs=1e-12)
        assert cosine_xi(1.0 / factor, factor) == pytest.approx(0.0, abs=1e-12)


@given(epochs=st.integers(min_value=2, max_value=400), factor=st.integers(min_value=1, max_value=8), data=st.data())
def test_xi_equals_triangle_on_reference_clock_for_integer_factors(epochs: int, factor: int, data) -> None:
    epoch = data.draw(st.integers(min_value=0, max_value=epochs - 1))
    assert xi(epoch, epochs, factor) == pytest.approx(triangle_xi(Clock(epochs).progress(epoch), factor), abs=1e-12)


@given(easy=st.floats(-1e3, 1e3), hard=st.floats(-1e3, 1e3), t=progress, factor=factors)
def test_cyclical_value_lies_between_its_ends(easy: float, hard: float, t: float, factor: float) -> None:
    value = Cyclical(easy, hard, factor)(t)
    assert min(easy, hard) - 1e-9 <= value <= max(easy, hard) + 1e-9


@given(factor=factors, t=st.floats(0.0, 1.0))
def test_triangle_is_monotone_on_each_leg(factor: float, t: float) -> None:
    peak = 1.0 / factor
    step = 1e-3
    if t + step <= peak:
        assert triangle_xi(t + step, factor) <= triangle_xi(t, factor) + 1e-12
    if t >= peak and factor > 1:
        assert triangle_xi(t + step, factor) >= triangle_xi(t, factor) - 1e-12


# ---------------------------------------------------------------------------------------------
# Schedules, combinators, registry, pickling
# ---------------------------------------------------------------------------------------------

ALL_SCHEDULES = [
    Constant(0.3),
    Cyclical(0.5, 2.0),
    Cyclical(256, 64, factor=4, shape="cosine"),
    Linear(0.0, 1.0),
    Cosine(0.1, 0.0),
    Piecewise(((0.0, 1.0), (0.5, 2.0), (1.0, 0.0))),
    Warmup(Cosine(0.1), until=0.1, start_value=0.01),
    Join((Cyclical(0.0, 1.0), Constant(0.5)), boundaries=(0.7,)),
    Clamp(Linear(-1.0, 2.0), low=0.0, high=1.0),
    Quantize(Cyclical(256.0, 64.0), step=8),
]


@pytest.mark.parametrize("schedule", ALL_SCHEDULES, ids=lambda s: type(s).__name__)
def test_schedule_contract_pure_picklable_finite(schedule) -> None:
    ts = [i / 20 for i in range(21)]
    first = [schedule(t) for t in ts]
    again = [schedule(t) for t in reversed(ts)][::-1]  # any order, any number of times: no hidden state
    assert first == again
    assert all(math.isfinite(v) for v in first)
    restored = pickle.loads(pickle.dumps(schedule))
    assert restored == schedule
    assert [restored(t) for t in ts] == first
    assert isinstance(schedule, cycdata.Schedule)


def test_combinators() -> None:
    warm = Warmup(Constant(1.0), until=0.5, start_value=0.0)
    assert [warm(t) for t in (0.0, 0.25, 0.5, 1.0)] == [0.0, 0.5, 1.0, 1.0]
    assert Quantize(Linear(64.0, 256.0), step=32)(0.3) == 128.0
    assert Clamp(Linear(0.0, 10.0), low=1.0, high=5.0)(0.0) == 1.0
    joined = Join((Linear(0.0, 1.0), Linear(10.0, 20.0)), boundaries=(0.5,))
    assert joined(0.25) == 0.5 and joined(0.75) == 15.0
    assert Piecewise(((0.2, 1.0), (0.4, 3.0)))(0.0) == 1.0
    assert Piecewise(((0.2, 1.0), (0.4, 3.0)))(0.3) == pytest.approx(2.0)
    assert Piecewise(((0.2, 1.0), (0.4, 3.0)))(0.9) == 3.0


def test_registry_resolves_names_and_rejects_unknown() -> None:
    assert set(SCHEDULES) >= {"constant", "cyclical", "linear", "cosine", "piecewise"}
    assert make_schedule("cyclical", easy=1.0, hard=2.0)(0.5) == 2.0
    with pytest.raises(ValueError, match="unknown schedule 'cyclic'"):
        make_schedule("cyclic", easy=1.0, hard=2.0)


def test_cyclical_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="factor must be >= 1"):
        Cyclical(1.0, 2.0, factor=0.5)
    with pytest.raises(ValueError, match="unknown shape"):
        Cyclical(1.0, 2.0, shape="zigzag")
    with pytest.raises(ValueError, match="easy must be a finite number"):
        Cyclical(math.nan, 2.0)
    with pytest.raises(ValueError, match="sorted"):
        Piecewise(((0.5, 1.0), (0.1, 2.0)))


def test_clock_per_step_counts_sample_fraction() -> None:
    per_epoch = Clock(epochs=5)
    per_step = Clock(epochs=5, unit="step")
    assert per_epoch.progress(2, 0.75) == per_epoch.progress(2) == 0.5
    assert per_step.progress(2, 0.5) == pytest.approx(2.5 / 4)
    assert per_step.run_fraction(4, 1.0) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        per_step.progress(1, 1.5)
    with pytest.raises(ValueError, match="epochs must be an integer >= 2"):
        Clock(epochs=1)

