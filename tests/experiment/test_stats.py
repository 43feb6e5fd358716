"""Paired statistics against scipy on known inputs, and on synthetic tables with planted truth."""

import numpy as np
import pytest
from scipy import stats as sps

from distillqa.experiment.stats import adjust, compare, paired_p_value, rank_biserial, summarize_hypothesis


def test_tests_agree_with_scipy_on_known_inputs():
    rng = np.random.default_rng(0)
    d = rng.normal(0.1, 1.0, 40)
    assert paired_p_value(d, "wilcoxon") == pytest.approx(sps.wilcoxon(d).pvalue)
    assert paired_p_value(d, "ttest") == pytest.approx(sps.ttest_rel(d, np.zeros_like(d)).pvalue)
    # with 2^n sign flips enumerated exactly, the permutation p equals scipy's exact value
    small = np.array([0.5, 1.2, -0.3, 0.8, 0.9, 1.1, -0.2, 0.7])
    exact = sps.permutation_test((small,), np.mean, permutation_type="samples", n_resamples=np.inf).pvalue
    assert paired_p_value(small, "permutation") == pytest.approx(exact)


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
