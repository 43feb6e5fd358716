"""A hypothesis' paired test on a hand-made experiment directory: per question, the A rows are
averaged, the B rows are averaged, and the test sees one difference per question.

Scores are multiples of 1/16 so every mean below is exact in floating point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from distillqa.experiment.config import ExperimentConfig
from distillqa.experiment.report import compute_results

Q = ["q1", "q2", "q3", "q4"]
# rouge_l per row and question; None = that row's score is missing for that question.
ROUGE = {
    "a1": [14, 8, 6, 13], "a2": [12, 4, 10, None],
    "b1": [4, 10, 2, 5], "b2": [6, 2, 8, 2],
}
# token_f1: B better on every question.
F1 = {"a1": [1, 2, 3, 4], "a2": [1, 2, 3, 4], "b1": [5, 6, 7, 9], "b2": [7, 8, 9, 11]}


def make_experiment(tmp_path: Path) -> Path:
    exp = tmp_path / "exp"
    exp.mkdir()
    cfg = ExperimentConfig().model_dump(mode="json")  # every key the report may read
    cfg["evaluate"]["metrics"] = "rouge_l,token_f1"
    cfg["stats"].update(test="wilcoxon", correction="none", alpha=0.2)
    (exp / "experiment.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"name": n, "kind": "cell", "factors": {"teacher": "t", "teacher_state": s, "student_state": "base",
                                                      "algorithm": a}} for n, (s, a) in
            {"a1": ("sft", "x"), "a2": ("sft", "y"), "b1": ("base", "x"), "b2": ("base", "y")}.items()]
    hyps = [{"name": "forward", "question": "A vs B", "pairs": [["a1", "b1"], ["a2", "b2"]]},
            {"name": "swapped", "question": "B vs A", "pairs": [["b1", "a1"], ["b2", "a2"]]}]
    (exp / "plan.json").write_text(json.dumps({"rows": rows, "hypotheses": hyps}))
    for name in ROUGE:
        out = exp / "rows" / name
        out.mkdir(parents=True)
        lines = [{"id": q, "rouge_l": None if ROUGE[name][i] is None else ROUGE[name][i] / 16, "token_f1": F1[name][i] / 16}
                 for i, q in enumerate(Q)]
        if name == "a1":  # a question only one row answered is not a paired observation
            lines.append({"id": "q5", "rouge_l": 1.0, "token_f1": 1.0})
        (out / "scores.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (out / "predictions.jsonl").write_text("".join(json.dumps({"id": x["id"], "prediction": "the AMF", "references": ["AMF"]})
                                                       + "\n" for x in lines))
    return exp


def test_pairs_are_averaged_per_question_before_one_paired_test(tmp_path):
    res = compute_results(make_experiment(tmp_path))
    by = {h["name"]: {r["metric"]: r for r in h["results"]} for h in res["hypotheses"]}
    rouge = by["forward"]["rouge_l"]
    # Per question, A = mean of a1, a2 (a2's missing q4 left out); B = mean of b1, b2:
    #   A = [13, 6, 8, 13] / 16, B = [5, 6, 5, 3.5] / 16, d = [8, 0, 3, 9.5] / 16.
    assert rouge["n"] == 4  # q1..q4 once each: not 8 pair-differences, and not q5
    assert rouge["mean_a"] == pytest.approx((13 + 6 + 8 + 13) / 4 / 16)
    assert rouge["mean_b"] == pytest.approx((5 + 6 + 5 + 3.5) / 4 / 16)
    # Rank-biserial with the zero ranked lowest: |d| ranks 0->1, 3->2, 8->3, 9.5->4; R+ = 9, R- = 0, sum 10.
    assert rouge["effect_size"] == pytest.approx(9 / 10)
    # Wilcoxon drops the zero; 3 positive differences, no ties: exact two-sided p = 2 * (1/2)^3.
    assert rouge["p_value"] == pytest.approx(0.25) and rouge["direction"] == "A"
    f1 = by["forward"]["token_f1"]
    # d = [1-6, 2-7, 3-8, 4-10] / 16 = [-5, -5, -5, -6] / 16: all negative, B higher.
    assert f1["effect_size"] == pytest.approx(-1.0) and f1["direction"] == "B"
    assert f1["mean_a"] == pytest.approx(10 / 4 / 16) and f1["mean_b"] == pytest.approx((6 + 7 + 8 + 10) / 4 / 16)
    # 4 differences of one sign, no ties: exact p = 2 / 2^4 = 0.125 < alpha 0.2 (uncorrected); rouge_l's 0.25 is not.
    assert f1["p_value"] == pytest.approx(0.125) and f1["rejected"] and not rouge["rejected"]
    summary = {h["name"]: h["summary"] for h in res["hypotheses"]}["forward"]
    assert summary == "null hypothesis rejected in 1 of 2 metrics (ngram 0/1, lexical 1/1)"


def test_swapping_a_and_b_flips_every_difference(tmp_path):
    res = compute_results(make_experiment(tmp_path))
    by = {h["name"]: {r["metric"]: r for r in h["results"]} for h in res["hypotheses"]}
    for metric in ("rouge_l", "token_f1"):
        fwd, rev = by["forward"][metric], by["swapped"][metric]
        assert rev["effect_size"] == pytest.approx(-fwd["effect_size"]) and fwd["effect_size"] != 0
        assert (rev["mean_a"], rev["mean_b"]) == pytest.approx((fwd["mean_b"], fwd["mean_a"]))
        assert rev["p_value"] == pytest.approx(fwd["p_value"]) and rev["n"] == fwd["n"]
        assert {fwd["direction"], rev["direction"]} == {"A", "B"}
