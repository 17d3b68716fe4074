"""The analysis every suite table carries, fixed before any run: paired differences by seed with 95%
t-intervals, paired t-tests Holm-corrected across the suite's comparisons, an equivalence test (TOST) before
anything is called "no effect", and the smallest difference the suite could detect.

A comparison's verdict (:func:`verdict`), at α = 0.05 after Holm:

* ``better`` / ``worse``: the paired difference is significant in that direction;
* ``equivalent``: not significant, and TOST shows it lies within ±margin (0.3 points of accuracy);
* ``inconclusive``: neither; the detection limit says how large an effect could have hidden.

Example:
    >>> diffs = [0.004, 0.006, 0.002, 0.005, 0.003, 0.004, 0.006, 0.005]
    >>> result = paired(diffs)
    >>> round(result["mean"], 4), round(result["ci95"], 4), result["p"] < 0.001
    (0.0044, 0.0012, True)
    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

__all__ = ["ALPHA", "EQUIVALENCE_MARGIN", "POWER", "detection_limit", "holm", "paired", "tost", "verdict"]

ALPHA = 0.05
POWER = 0.8
EQUIVALENCE_MARGIN = 0.003  # ±0.3 points of accuracy (fractions, as the metrics are logged)


def _t(q: float, df: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(q, df))


def _t_sf(x: float, df: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.sf(x, df))


def detection_limit(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true paired difference a two-sided paired t-test on ``n`` pairs with spread ``sd`` finds with
    probability ``power``: ``(t_{1−α/2, n−1} + t_{power, n−1}) · sd / √n``.

    Example:
        >>> round(detection_limit(0.01, 20), 5)
        0.00661
    """
    if n < 2 or math.isnan(sd):
        return math.nan
    return (_t(1 - alpha / 2, n - 1) + _t(power, n - 1)) * sd / math.sqrt(n)


def tost(differences: Sequence[float], margin: float = EQUIVALENCE_MARGIN) -> float:
    """The p-value of two one-sided t-tests that the mean paired difference lies within ±``margin``: small means
    equivalent. (The larger of the two one-sided p-values; 1 when the spread is zero and the mean is outside.)

    Example:
        >>> tost([0.0005, -0.0005, 0.001, -0.001, 0.0, 0.0002]) < 0.001   # within ±0.3 points
        True
    """
    n = len(differences)
    if n < 2:
        return math.nan
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(n)
    lower = _t_sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
    upper = _t_sf((margin - mean) / se, n - 1)  # H0: mean >= +margin
    return max(lower, upper)


def paired(differences: Sequence[float], margin: float = EQUIVALENCE_MARGIN) -> dict[str, float]:
    """Mean paired difference, its 95% t-interval half-width, the two-sided paired t-test's p-value, the TOST
    p-value against ±``margin`` and the detection limit (all NaN below two pairs)."""
    n = len(differences)
    mean = statistics.fmean(differences) if differences else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "sd": math.nan, "ci95": math.nan, "p": math.nan, "tost_p": math.nan,
                "detectable": math.nan}
    sd = statistics.stdev(differences)
    se = sd / math.sqrt(n)
    p = (2 * _t_sf(abs(mean) / se, n - 1)) if se > 0 else (0.0 if mean != 0 else 1.0)
    return {"n": n, "mean": mean, "sd": sd, "ci95": _t(0.975, n - 1) * se, "p": min(1.0, p),
            "tost_p": tost(differences, margin), "detectable": detection_limit(sd, n)}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (same order; NaN stays NaN and does not count as a test)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running, tests = 0.0, len(order)
    for rank, (p, index) in enumerate(order):
        running = max(running, min(1.0, (tests - rank) * p))
        adjusted[index] = round(running, 12)
    return adjusted


def verdict(mean: float, p_holm: float, tost_p_holm: float, alpha: float = ALPHA) -> str:
    """``better``, ``worse``, ``equivalent`` or ``inconclusive`` (see the module docstring)."""
    if math.isnan(p_holm):
        return "n/a"
    if p_holm < alpha:
        return "better" if mean > 0 else "worse"
    if not math.isnan(tost_p_holm) and tost_p_holm < alpha:
        return "equivalent"
    return "inconclusive"
