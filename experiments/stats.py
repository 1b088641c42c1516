"""Seed statistics for studies: mean, sample standard deviation, t-based 95% confidence intervals,
paired differences over matched seeds, a plain verdict, and the same verdict adjusted (Holm) for the
many comparisons a study makes.

A study has 3-5 seeds per arm, so the interval uses Student's t with n-1 degrees of freedom (a
normal interval would be too narrow at that n). Arms are compared *paired*: arm and baseline run
with the same seed share their initialisation, data order and masks, so the per-seed difference
removes the variance the two runs share.

A study compares up to 8 metrics x 4 arms: at 95% per comparison, some "better"/"worse" calls are
expected by chance alone. Holm's step-down adjustment keeps the chance of any false call over the
whole study at 5% (without assuming the comparisons independent); its verdict is reported beside
each comparison's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of `n` values with its sample standard deviation and confidence interval [low, high];
    sd and the interval are NaN when n < 2 (one value says nothing about the spread)."""

    n: int
    mean: float
    sd: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and t-based confidence interval of `values` (NaN values are dropped)."""
    kept = [float(v) for v in values if not math.isnan(v)]
    n = len(kept)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(kept) / n
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(n, mean, sd, mean - half, mean + half)


def paired_differences(arm: Mapping[int, float], baseline: Mapping[int, float]) -> dict[int, float]:
    """arm - baseline for every seed both have a (non-NaN) value for."""
    return {
        seed: arm[seed] - baseline[seed]
        for seed in sorted(set(arm) & set(baseline))
        if not (math.isnan(arm[seed]) or math.isnan(baseline[seed]))
    }


def verdict(difference: Estimate, higher_is_better: bool) -> str:
    """ "better" / "worse" when the interval of the paired difference excludes 0, else
    "no difference detected at n=<n>"."""
    if difference.n < 2:
        return f"too few matched seeds to tell (n={difference.n})"
    if difference.low > 0 or difference.high < 0:
        return "better" if (difference.mean > 0) == higher_is_better else "worse"
    return f"no difference detected at n={difference.n}"


def p_value(difference: Estimate) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is 0 (the test whose 95% interval
    `estimate` gives: p < 0.05 exactly when that interval excludes 0); NaN below 2 pairs. Differences
    without spread give 1 when all are 0, else 0."""
    if difference.n < 2 or math.isnan(difference.sd):
        return math.nan
    if difference.sd == 0:
        return 1.0 if difference.mean == 0 else 0.0
    t = difference.mean / (difference.sd / math.sqrt(difference.n))
    return float(2 * stats.t.sf(abs(t), difference.n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the given order: the k-th smallest of m is multiplied by m - k + 1,
    kept at least as large as the one before it, capped at 1. NaN values (comparisons that could not
    be made) stay NaN and do not count in m."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - k) * p))
        adjusted[i] = running
    return adjusted


def adjusted_verdict(difference: Estimate, adjusted_p: float, higher_is_better: bool, family: int) -> str:
    """ "better" / "worse" when the Holm-adjusted p-value is below 1 - CONFIDENCE, else "no difference
    detected" (naming the `family` of comparisons it was adjusted over)."""
    if math.isnan(adjusted_p):
        return f"too few matched seeds to tell (n={difference.n})"
    if adjusted_p < 1 - CONFIDENCE:
        return "better" if (difference.mean > 0) == higher_is_better else "worse"
    return f"no difference detected (Holm, {family} comparisons)"
