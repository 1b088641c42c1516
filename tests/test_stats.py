"""Study statistics on hand-made numbers; expected values worked out by hand (t table: t(0.975, 2) = 4.303)."""

import math

import pytest

from experiments.stats import Estimate, estimate, paired_differences, verdict

T_2 = 4.303  # Student's t, 97.5% quantile, 2 degrees of freedom (printed tables round to 3 decimals)


def test_mean_sd_and_t_interval_of_three_values():
    # mean 4; squared deviations 4 + 0 + 4 = 8, / (n-1) = 4 -> sd 2; half-width t * 2 / sqrt(3)
    e = estimate([2.0, 4.0, 6.0])
    assert (e.n, e.mean, e.sd) == (3, 4.0, 2.0)
    assert e.half_width == pytest.approx(T_2 * 2 / math.sqrt(3), abs=1e-3)
    assert e.low == pytest.approx(4 - 4.968, abs=1e-3) and e.high == pytest.approx(4 + 4.968, abs=1e-3)


def test_one_value_has_no_spread_and_nan_values_are_dropped():
    e = estimate([3.0, math.nan])
    assert (e.n, e.mean) == (1, 3.0) and math.isnan(e.sd) and math.isnan(e.low)
    assert estimate([]).n == 0


def test_paired_differences_keep_matched_seeds_only():
    arm = {0: 5.0, 1: 7.0, 2: 6.0, 3: 9.0}
    baseline = {0: 4.0, 1: 5.0, 2: 5.0, 4: 1.0}
    assert paired_differences(arm, baseline) == {0: 1.0, 1: 2.0, 2: 1.0}
    # differences 1, 2, 1: mean 4/3, sd sqrt(1/3), half-width 4.303 * sqrt(1/3) / sqrt(3) = 1.434
    d = estimate(list(paired_differences(arm, baseline).values()))
    assert d.mean == pytest.approx(4 / 3) and d.sd == pytest.approx(math.sqrt(1 / 3))
    assert d.low == pytest.approx(4 / 3 - 1.434, abs=1e-3)  # -0.101: the interval holds 0


def test_verdicts():
    # differences 1.0, 1.1, 1.2: mean 1.1, sd 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.248 -> [0.852, 1.348]
    clear = estimate([1.0, 1.1, 1.2])
    assert clear.low == pytest.approx(0.852, abs=1e-3)
    assert verdict(clear, higher_is_better=True) == "better"
    assert verdict(clear, higher_is_better=False) == "worse"
    assert verdict(estimate([-1.0, -1.1, -1.2]), higher_is_better=False) == "better"
    assert verdict(estimate([1.0, 2.0, 1.0]), higher_is_better=True) == "no difference detected at n=3"
    assert verdict(estimate([0.0, 0.0, 0.0]), higher_is_better=True) == "no difference detected at n=3"
    assert verdict(Estimate(1, 1.0, math.nan, math.nan, math.nan), True).startswith("too few matched seeds")
