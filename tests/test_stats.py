"""Study statistics on hand-made numbers; expected values worked out by hand (t table: t(0.975, 2) = 4.303)."""

import math

import pytest
from scipy import stats

from experiments.stats import Estimate, adjusted_verdict, estimate, holm, p_value, paired_differences, verdict

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


def test_p_value_is_the_paired_t_test_whose_interval_the_verdict_reads():
    # differences 1.0, 1.1, 1.2: t = 1.1 / (0.1 / sqrt(3)) = 19.05 on 2 degrees of freedom -> p = 0.00274
    clear = estimate([1.0, 1.1, 1.2])
    assert p_value(clear) == pytest.approx(0.00274, abs=1e-5)
    assert p_value(clear) == pytest.approx(stats.ttest_1samp([1.0, 1.1, 1.2], 0.0).pvalue, rel=1e-9)  # reference
    # 1.0, 1.5, 2.0: t = 1.5 / (0.5 / sqrt(3)) = 5.196 -> p = 0.0351, below 0.05 as the interval excludes 0
    borderline = estimate([1.0, 1.5, 2.0])
    assert p_value(borderline) == pytest.approx(0.0351, abs=1e-4) and borderline.low > 0
    assert p_value(estimate([0.0, 0.0, 0.0])) == 1.0 and p_value(estimate([2.0, 2.0])) == 0.0
    assert math.isnan(p_value(estimate([1.0])))


def test_holm_on_hand_numbers():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # R's p.adjust(c(.01, .02, .03, .04, .05), "holm") = .05 .08 .09 .09 .09
    assert holm([0.01, 0.02, 0.03, 0.04, 0.05]) == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09])
    assert holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    adjusted = holm([0.02, math.nan, 0.04])  # a comparison that could not be made does not count in m
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)


def test_an_adjusted_verdict_can_withdraw_a_call_the_single_comparison_makes():
    borderline = estimate([1.0, 1.5, 2.0])  # p = 0.0351 alone: "better"
    assert verdict(borderline, higher_is_better=True) == "better"
    twice = holm([p_value(borderline)] * 2)  # two such comparisons: 2 x 0.0351 = 0.0702
    assert twice[0] == pytest.approx(0.0702, abs=1e-4)
    assert adjusted_verdict(borderline, twice[0], True, 2) == "no difference detected (Holm, 2 comparisons)"
    assert adjusted_verdict(borderline, p_value(borderline), False, 1) == "worse"
    assert adjusted_verdict(estimate([1.0]), math.nan, True, 2).startswith("too few matched seeds")
