"""Welch's two-sample t-test from summary statistics: the one significance test change points and comparisons share."""

from __future__ import annotations

import dataclasses
import math


def preload_scipy() -> None:
    """Import the parts of scipy the significance tests use. scipy.stats takes 1-2 s to import on a busy
    machine, so this package imports scipy on first use, not when the server starts; call this off the event
    loop (in a worker thread at start-up) so that the first comparison does not stall it."""
    import scipy.special
    import scipy.stats  # noqa: F401


@dataclasses.dataclass(frozen=True, slots=True)
class WelchResult:
    tstatistic: float  # (mean_after - mean_before) / standard error; +-inf when both sides are constant and differ
    degrees_of_freedom: float  # Welch-Satterthwaite; nan when a side has fewer than 2 points
    pvalue: float  # two-sided


def welch_t_test(n1: int, mean1: float, var1: float, n2: int, mean2: float, var2: float) -> WelchResult:
    """Two-sided Welch test of mean2 != mean1 from sample sizes, means and sample variances (n - 1).

    Unlike Student's test it does not assume equal variances, which a benchmark's noise often breaks after a
    change. Edge cases answer instead of returning nan: fewer than 2 points a side cannot be tested (p = 1);
    two constant sides are certainly different when their means differ (p = 0) and not when equal (p = 1).
    """
    if n1 < 2 or n2 < 2:
        return WelchResult(0.0, math.nan, 1.0)
    var1, var2 = max(var1, 0.0), max(var2, 0.0)  # prefix-sum rounding can give -1e-12
    per1, per2 = var1 / n1, var2 / n2
    standard_error_squared = per1 + per2
    delta = mean2 - mean1
    if standard_error_squared <= 0.0:
        if delta == 0:
            return WelchResult(0.0, math.nan, 1.0)
        return WelchResult(math.copysign(math.inf, delta), math.nan, 0.0)
    t = delta / math.sqrt(standard_error_squared)
    df = standard_error_squared**2 / (per1**2 / (n1 - 1) + per2**2 / (n2 - 1))
    from scipy import special  # imported on first use: see preload_scipy

    pvalue = float(2.0 * special.stdtr(df, -abs(t)))
    return WelchResult(t, df, min(pvalue, 1.0))
