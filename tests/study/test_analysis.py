"""`distillqa study analyze` on synthetic studies: a planted condition effect is found (Kruskal-Wallis,
Dunn, Vargha-Delaney A, OLS and the mixed model agree), no effect is found where none was planted,
and excluded raters are left out."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from study_helpers import make_study, simulate_raters

from distillqa.cli import app  # noqa: E402  (study_helpers skips the module without the extra)
from distillqa.study.analysis import vargha_delaney
from distillqa.study.store import Store

pytest.importorskip("scikit_posthocs", reason="the study extra is not installed (pip install -e '.[study]')")
BEST = "mt-cf_unrevised"


def analyzed(tmp_path, effects: dict[str, float]) -> dict:
    study = make_study(tmp_path, questions=30, items_per_condition=20, target_ratings=3, items_per_rater=12)
    simulate_raters(Store(study), effects, raters=15, careless=2)
    result = CliRunner().invoke(app, ["study", "analyze", str(study.path)])
    assert result.exit_code == 0, result.output
    assert (study.path / "report.html").is_file() and (study.path / "plots" / "quality.png").is_file()
    html = (study.path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    return json.loads((study.path / "results" / "analysis.json").read_text())


def test_planted_effect_is_found(tmp_path):
    res = analyzed(tmp_path, {BEST: 1.0})
    assert res["summary"]["excluded"] == 2 and res["ratings"] == 180 and res["raters"] == 15
    tests = {t["outcome"]: t for t in res["rank_tests"]}
    assert all(t["significant"] for t in tests.values())
    pairs = tests["quality"]["pairs"]
    for pair in pairs:
        involves_best = BEST in (pair["a"], pair["b"])
        assert pair["significant"] == involves_best, pair
        if involves_best:  # A > 0.5 when the first of the pair is the better one, and a large effect
            a = pair["vargha_delaney_a"] if pair["a"] == BEST else 1 - pair["vargha_delaney_a"]
            assert a > 0.71 and pair["magnitude"] == "large"
    ols, mixed = res["models"]["ols"], res["models"]["mixed"]
    assert ols["condition_p"] < 1e-6
    for fit in (ols, mixed):
        best = next(c for c in fit["coefficients"] if BEST in c["term"])
        assert 0.6 < best["estimate"] < 1.4 and best["p"] < 1e-4
    alpha = {a["outcome"]: a["alpha"] for a in res["agreement"]}
    assert alpha["quality"] > 0.2  # raters agree where the conditions differ


def test_no_effect_is_found_when_none_was_planted(tmp_path):
    res = analyzed(tmp_path, {})
    assert not any(t["significant"] for t in res["rank_tests"])
    assert not any(p["significant"] for t in res["rank_tests"] for p in t["pairs"])
    assert res["models"]["ols"]["condition_p"] > 0.05
    assert all(abs(p["vargha_delaney_a"] - 0.5) < 0.14 for t in res["rank_tests"] for p in t["pairs"])


def test_vargha_delaney_a_by_hand():
    assert vargha_delaney([3, 4], [1, 2]) == 1.0
    assert vargha_delaney([1, 2], [3, 4]) == 0.0
    assert vargha_delaney([2, 2], [2, 2]) == 0.5
    assert vargha_delaney([1, 3], [2]) == 0.5  # one pair higher, one lower
    assert vargha_delaney([2, 3], [2, 1]) == pytest.approx((1 + 0.5 + 1 + 1) / 4)


def test_identical_ratings_give_no_difference():
    import pandas as pd

    from distillqa.study.analysis import analyze_ratings

    rows = [{"rater": f"r{k % 4}", "item": f"i{k}", "condition": "AB"[k % 2], "s": 3, "quality": 3.0, "length_words": 5 + k % 3}
            for k in range(16)]
    res = analyze_ratings(pd.DataFrame(rows), ["s"])
    assert all(t["h"] == 0 and t["p"] == 1 and not t["significant"] for t in res["rank_tests"])
    assert all(p["vargha_delaney_a"] == 0.5 and p["p_bonferroni"] == 1 for t in res["rank_tests"] for p in t["pairs"])
