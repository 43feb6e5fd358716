"""Paired statistics against scipy on known inputs, and on synthetic tables with planted truth."""

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from distillqa.experiment.stats import adjust, compare, paired_p_value, rank_biserial, summarize_hypothesis


def test_p_values_equal_hand_computed_exact_values():
    # d = 1..7 and -8 (in 16ths). Ranks of |d| are the values themselves; R- = 8. Under the null
    # each rank's sign is a fair coin: P(R- <= 8) = #(subsets of {1..8} summing to <= 8) / 2^8.
    # Subsets by sum 0..8: 1, 1, 1, 2, 2, 3, 4, 5, 6 -> 25, so the exact two-sided p = 2 * 25/256.
    d = np.array([1, 2, 3, 4, 5, 6, 7, -8]) / 16
    assert paired_p_value(d, "wilcoxon") == pytest.approx(50 / 256)
    # Sign-flip permutation of the mean: |sum| >= 20/16 for a flip set of sum <= 8 or >= 28
    # (its complement <= 8): 25 + 25 of the 256 equally likely flips.
    assert paired_p_value(d, "permutation") == pytest.approx(50 / 256)
    # The same two counts by enumerating all 2^8 sign assignments.
    flips = np.array(list(itertools.product([1, -1], repeat=8)))
    signed = flips * np.abs(d)
    assert np.mean(np.abs(signed.sum(1)) >= abs(d.sum()) - 1e-12) == pytest.approx(50 / 256)
    r_minus = (np.where(signed < 0, np.arange(1, 9), 0)).sum(1)
    assert 2 * np.mean(r_minus <= 8) == pytest.approx(50 / 256)
    # t-test, d = (1, 2, 3): mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of freedom,
    # whose two-sided tail is 1 - t / sqrt(t^2 + 2).
    t = 2 * 3**0.5
    assert paired_p_value(np.array([1.0, 2.0, 3.0]), "ttest") == pytest.approx(1 - t / (t * t + 2) ** 0.5)
    # d = (1, 3): t = 2 with 1 degree of freedom (Cauchy): p = 1 - (2 / pi) arctan 2.
    assert paired_p_value(np.array([1.0, 3.0]), "ttest") == pytest.approx(1 - 2 / np.pi * np.arctan(2.0))


def test_rank_biserial_hand_worked():
    # ranks of |d| with the zero lowest: 0.0->1, 0.1->2, 0.2->3, 0.3->4, 0.4->5; R+ = 11, R- = 3, n(n+1)/2 = 15
    assert rank_biserial(np.array([0.1, -0.2, 0.3, 0.4, 0.0])) == pytest.approx((11 - 3) / 15)
    assert rank_biserial(np.array([0.0] * 99 + [-0.5])) == pytest.approx(-100 / 5050)  # one loss among ties is small
    assert rank_biserial(np.array([1.0, 2.0])) == 1.0 and rank_biserial(np.zeros(5)) == 0.0


def test_ties_and_all_zero_differences():
    assert paired_p_value(np.zeros(10), "wilcoxon") == 1.0 and paired_p_value(np.zeros(10), "ttest") == 1.0
    d = np.array([0.0, 0.0, 0.5, 0.5, 0.5, -0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5])  # heavy ties, some zeros
    assert 0 < paired_p_value(d, "wilcoxon") < 0.05
    assert paired_p_value(np.full(6, 0.3), "ttest") == 0.0


def test_holm_and_bh_match_the_textbook():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max-accumulated 0.06
    assert adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04
    assert adjust(p, "bh") == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert adjust(p, "bh") == pytest.approx(sps.false_discovery_control(p))


def table(rng, n, shift, metrics):
    a = {str(i): {m: float(rng.normal(0.5, 0.2)) for m in metrics} for i in range(n)}
    b = {i: {m: v + float(rng.normal(-shift, 0.1)) for m, v in row.items()} for i, row in a.items()}
    return a, b


@pytest.mark.parametrize("test", ["wilcoxon", "ttest"])
def test_planted_effects_are_found_and_null_ones_are_not(test):
    rng = np.random.default_rng(1)
    metrics = ["m1", "m2", "m3"]
    found = false_alarms = 0
    draws = 200
    for _ in range(draws):
        a, b = table(rng, 40, 0.08, metrics)  # A better by 0.08, noise sd 0.1, n 40: t ~ 5, power ~ 0.99 per metric
        found += all(r.rejected and r.direction == "A" for r in compare(a, b, metrics, test))
        a, b = table(rng, 40, 0.0, metrics)
        false_alarms += any(r.rejected for r in compare(a, b, metrics, test))
    assert found / draws > 0.9
    assert false_alarms / draws < 0.08  # Holm keeps the family-wise error near alpha = 0.05


def test_compare_drops_missing_pairs_and_summarizes_by_family():
    a = {"1": {"x": 1.0, "y": None}, "2": {"x": 0.5, "y": 0.2}, "3": {"x": 0.7, "y": 0.3}}
    b = {"1": {"x": 0.0, "y": 0.1}, "2": {"x": 0.5, "y": 0.2}, "4": {"x": 0.1, "y": 0.1}}
    res = {r.metric: r for r in compare(a, b, ["x", "y"])}
    assert res["x"].n == 2 and res["y"].n == 1 and res["y"].direction == "tie" and res["y"].p_value == 1.0
    assert res["x"].direction == "A" and res["x"].mean_a == 0.75
    text = summarize_hypothesis(list(res.values()), {"x": "ngram", "y": "embedding"})
    assert text == "null hypothesis rejected in 0 of 2 metrics (ngram 0/1, embedding 0/1)"
