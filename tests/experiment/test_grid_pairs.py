"""Every hypothesis of the plan, as the exact set of (A, B) row pairs written out by hand, for
the default grid, a one-teacher grid and a three-algorithm grid; each pair differs only in the
factors the hypothesis varies, and A holds the level the hypothesis names first."""

from __future__ import annotations

import json

import pytest

from distillqa.config import load_config
from distillqa.experiment.config import ExperimentConfig
from distillqa.experiment.grid import plan_hypotheses, plan_rows

T1, T2 = "smollm2-135m", "gemma3-270m"  # same vocabulary as the student; a different one
SLUG = {T1: "smollm2-135m", T2: "gemma3-270m"}
STATES = ("base", "sft")


def c(alg: str, teacher: str, ts: str, ss: str) -> str:
    """A cell's row name, spelled out here rather than taken from grid.kd_cell_name."""
    return f"kd-{alg}_teacher-{SLUG[teacher]}-{ts}_student-{ss}"


def plan(**grid) -> tuple[dict, dict[str, set]]:
    overrides = [f"{k}={json.dumps(v)}" for k, v in grid.items()]
    cfg = load_config(ExperimentConfig, None, overrides)
    rows = plan_rows(cfg, {T1: True, T2: False})
    hyps = plan_hypotheses(cfg, rows)
    assert len({h.name for h in hyps}) == len(hyps)
    for h in hyps:  # no pair twice within a hypothesis
        assert len(set(h.pairs)) == len(h.pairs), h.name
    return {r.name: r for r in rows}, {h.name: set(h.pairs) for h in hyps}


def check_factors(rows: dict, pairs: set, varied: set[str], a_levels: dict[str, str]) -> None:
    """Within every pair only `varied` factors differ, and A takes `a_levels`."""
    for a, b in pairs:
        fa, fb = rows[a].factors, rows[b].factors
        assert {k for k in fa if fa[k] != fb[k]} == varied, (a, b)
        assert all(fa[k] == v for k, v in a_levels.items()), (a, b)


STUDY_TEACHERS = [{"name": T1, "algorithms": ["vanilla", "dskd"]}, {"name": T2, "algorithms": ["dskd-cma", "uld"]}]


def two_teacher_pairs(cells: list[tuple[str, str]]) -> dict[str, set]:
    """The pairs every two-teacher, two-state grid has, written out for its (algorithm, teacher) cells."""
    teacher_sft = {(c(a, t, "sft", ss), c(a, t, "base", ss)) for a, t in cells for ss in STATES}
    both_sft = {(c(a, t, "sft", "sft"), c(a, t, "base", "base")) for a, t in cells}
    return {
        "teacher_sft": teacher_sft,
        "student_sft": {(c(a, t, ts, "sft"), c(a, t, ts, "base")) for a, t in cells for ts in STATES},
        "both_sft": both_sft,
        "teacher_sft_same_vocabulary": {p for p in teacher_sft if SLUG[T1] in p[0]},
        "teacher_sft_different_vocabulary": {p for p in teacher_sft if SLUG[T2] in p[0]},
        "both_sft_same_vocabulary": {p for p in both_sft if SLUG[T1] in p[0]},
        "both_sft_different_vocabulary": {p for p in both_sft if SLUG[T2] in p[0]},
        "kd_vs_sft": {(c(a, t, ts, ss), f"sft-only_student-{ss}") for a, t in cells for ts in STATES for ss in STATES},
        "teacher_model_sft": {(f"teacher-{SLUG[t]}-sft", f"teacher-{SLUG[t]}-base") for t in (T1, T2)},
        "student_model_sft": {("student-sft", "student-base")},
    }


def test_default_grid_pairs_every_hypothesis_exactly():
    cfg = load_config(ExperimentConfig, None, [])
    assert [(t.name, t.algorithms) for t in cfg.grid.teachers] == [(T1, ["vanilla"]), (T2, ["seqkd"])]
    assert (cfg.grid.teacher_states, cfg.grid.student_states) == (["base", "sft"], ["base", "sft"])
    rows, hyps = plan()
    cells = [("vanilla", T1), ("seqkd", T2)]
    # No algorithm pair: each teacher has one algorithm. No vocabulary pair: vanilla KD (logits) and
    # sequence-level KD (text) are of different families.
    assert hyps == two_teacher_pairs(cells)
    check_factors(rows, hyps["teacher_sft"], {"teacher_state"}, {"teacher_state": "sft"})
    check_factors(rows, hyps["student_sft"], {"student_state"}, {"student_state": "sft"})
    check_factors(rows, hyps["both_sft"], {"teacher_state", "student_state"}, {"teacher_state": "sft", "student_state": "sft"})


def test_study_grid_pairs_every_hypothesis_exactly():
    rows, hyps = plan(**{"grid.teachers": STUDY_TEACHERS})
    cells = [(alg, t) for t, algs in ((T1, ("vanilla", "dskd")), (T2, ("dskd-cma", "uld"))) for alg in algs]
    expected = {
        **two_teacher_pairs(cells),
        "dskd_vs_vanilla": {(c("dskd", T1, ts, ss), c("vanilla", T1, ts, ss)) for ts in STATES for ss in STATES},
        "dskd-cma_vs_uld": {(c("dskd-cma", T2, ts, ss), c("uld", T2, ts, ss)) for ts in STATES for ss in STATES},
        "vocabulary": {(c(same, T1, ts, ss), c(other, T2, ts, ss)) for same, other in (("vanilla", "uld"), ("dskd", "dskd-cma"))
                       for ts in STATES for ss in STATES},
    }
    assert hyps == expected
    assert [len(expected[k]) for k in ("teacher_sft", "student_sft", "both_sft", "vocabulary", "kd_vs_sft")] == [8, 8, 4, 8, 16]
    check_factors(rows, hyps["teacher_sft"], {"teacher_state"}, {"teacher_state": "sft"})
    check_factors(rows, hyps["student_sft"], {"student_state"}, {"student_state": "sft"})
    check_factors(rows, hyps["both_sft"], {"teacher_state", "student_state"}, {"teacher_state": "sft", "student_state": "sft"})
    check_factors(rows, hyps["dskd_vs_vanilla"], {"algorithm", "family"}, {"algorithm": "dskd"})
    check_factors(rows, hyps["dskd-cma_vs_uld"], {"algorithm", "family"}, {"algorithm": "dskd-cma"})
    # vocabulary: the teacher and the algorithm necessarily change with it, the family does not
    check_factors(rows, hyps["vocabulary"], {"vocabulary", "teacher", "algorithm"}, {"vocabulary": "same"})
    check_factors(rows, hyps["teacher_model_sft"], {"teacher_state"}, {"teacher_state": "sft"})
    check_factors(rows, hyps["student_model_sft"], {"student_state"}, {"student_state": "sft"})
    for a, b in hyps["kd_vs_sft"]:  # the same student state, distilled vs trained alone
        assert rows[a].kind == "cell" and rows[b].kind == "sft-only"
        assert rows[a].factors["student_state"] == rows[b].factors["student_state"]


def test_one_teacher_grid_has_no_vocabulary_or_cross_vocabulary_hypotheses():
    rows, hyps = plan(**{"grid.teachers": [{"name": T1, "algorithms": ["vanilla", "dskd"]}]})
    algs = ("vanilla", "dskd")
    assert hyps == {
        "teacher_sft": {(c(a, T1, "sft", ss), c(a, T1, "base", ss)) for a in algs for ss in STATES},
        "student_sft": {(c(a, T1, ts, "sft"), c(a, T1, ts, "base")) for a in algs for ts in STATES},
        "both_sft": {(c(a, T1, "sft", "sft"), c(a, T1, "base", "base")) for a in algs},
        "dskd_vs_vanilla": {(c("dskd", T1, ts, ss), c("vanilla", T1, ts, ss)) for ts in STATES for ss in STATES},
        "kd_vs_sft": {(c(a, T1, ts, ss), f"sft-only_student-{ss}") for a in algs for ts in STATES for ss in STATES},
        "teacher_model_sft": {(f"teacher-{SLUG[T1]}-sft", f"teacher-{SLUG[T1]}-base")},
        "student_model_sft": {("student-sft", "student-base")},
    }
    check_factors(rows, hyps["dskd_vs_vanilla"], {"algorithm", "family"}, {"algorithm": "dskd"})


def test_three_algorithm_grid_pairs_within_teacher_and_family():
    rows, hyps = plan(**{
        "grid.teachers": [{"name": T1, "algorithms": ["vanilla", "dskd", "uld"]}, {"name": T2, "algorithms": ["uld"]}],
        "grid.student_states": ["sft"], "stats.algorithm_pairs": [["dskd", "vanilla"], ["vanilla", "uld"]]})
    cells = [("vanilla", T1), ("dskd", T1), ("uld", T1), ("uld", T2)]
    teacher_sft = {(c(a, t, "sft", "sft"), c(a, t, "base", "sft")) for a, t in cells}
    assert hyps == {
        # one student state: no student_sft, both_sft or student_model_sft
        "teacher_sft": teacher_sft,
        "dskd_vs_vanilla": {(c("dskd", T1, ts, "sft"), c("vanilla", T1, ts, "sft")) for ts in STATES},
        # ULD with the other teacher is not a pair: the teacher must match
        "vanilla_vs_uld": {(c("vanilla", T1, ts, "sft"), c("uld", T1, ts, "sft")) for ts in STATES},
        # logit-level with logit-level only: T1's vanilla and T1's ULD each against T2's ULD; DSKD has no partner
        "vocabulary": {(c(a, T1, ts, "sft"), c("uld", T2, ts, "sft")) for a in ("vanilla", "uld") for ts in STATES},
        "teacher_sft_same_vocabulary": {p for p in teacher_sft if SLUG[T1] in p[0]},
        "teacher_sft_different_vocabulary": {p for p in teacher_sft if SLUG[T2] in p[0]},
        "kd_vs_sft": {(c(a, t, ts, "sft"), "sft-only_student-sft") for a, t in cells for ts in STATES},
        "teacher_model_sft": {(f"teacher-{SLUG[t]}-sft", f"teacher-{SLUG[t]}-base") for t in (T1, T2)},
    }
    check_factors(rows, hyps["vanilla_vs_uld"], {"algorithm"}, {"algorithm": "vanilla"})  # same family: only the algorithm
    check_factors(rows, hyps["vocabulary"] - {(c("uld", T1, ts, "sft"), c("uld", T2, ts, "sft")) for ts in STATES},
                  {"vocabulary", "teacher", "algorithm"}, {"vocabulary": "same"})
    check_factors(rows, {(c("uld", T1, ts, "sft"), c("uld", T2, ts, "sft")) for ts in STATES},
                  {"vocabulary", "teacher"}, {"vocabulary": "same"})


def test_sequence_kd_cells_pair_within_their_family_and_share_one_answers_store_per_teacher_state(tmp_path):
    from distillqa.experiment.runner import cell_kd

    rows, hyps = plan(**{"grid.teachers": [{"name": T1, "algorithms": ["vanilla"]}, {"name": T2, "algorithms": ["seqkd"]}]})
    assert "vocabulary" not in hyps  # vanilla vs seqkd would change the algorithm family with the vocabulary
    rows, hyps = plan(**{"grid.teachers": [{"name": T1, "algorithms": ["seqkd"]}, {"name": T2, "algorithms": ["seqkd"]}]})
    assert hyps["vocabulary"] == {(c("seqkd", T1, ts, ss), c("seqkd", T2, ts, ss)) for ts in STATES for ss in STATES}
    stores = {name: cell_kd(tmp_path, row.factors, None, 0.0)["teacher_answers"] for name, row in rows.items() if row.kind == "cell"}
    for teacher in (T1, T2):
        for ts in STATES:
            assert stores[c("seqkd", teacher, ts, "base")] == stores[c("seqkd", teacher, ts, "sft")]
        assert stores[c("seqkd", teacher, "base", "base")] != stores[c("seqkd", teacher, "sft", "base")]
    assert len(set(stores.values())) == 4


def test_on_policy_cells_pair_with_the_supervised_algorithm_and_sample_with_the_grids_lmbda(tmp_path):
    from distillqa.errors import ConfigError
    from distillqa.experiment.runner import cell_kd

    one_state = {"grid.teacher_states": ["base"], "grid.student_states": ["base"], "distill.kd.lmbda": 0.5}
    rows, hyps = plan(**one_state, **{
        "grid.teachers": [{"name": T1, "algorithms": ["vanilla", "vanilla-onpolicy"]}, {"name": T2, "algorithms": ["uld-onpolicy"]}],
        "stats.algorithm_pairs": [["vanilla-onpolicy", "vanilla"]]})
    on, off, cross = c("vanilla-onpolicy", T1, "base", "base"), c("vanilla", T1, "base", "base"), c("uld-onpolicy", T2, "base", "base")
    assert hyps["vanilla-onpolicy_vs_vanilla"] == {(on, off)}
    assert hyps["vocabulary"] == {(on, cross)}  # on-policy with on-policy: the family does not change with the vocabulary
    check_factors(rows, hyps["vanilla-onpolicy_vs_vanilla"], {"algorithm", "family"}, {"family": "logit on-policy"})
    # every cell's KD settings: the algorithm itself, on-policy with the grid's lmbda or on the references
    assert {name: cell_kd(tmp_path, rows[name].factors, None, 0.5) for name in (on, off, cross)} == {
        on: {"algorithm": "vanilla", "lmbda": 0.5, "teacher_endpoint": None},
        off: {"algorithm": "vanilla", "lmbda": 0.0, "teacher_endpoint": None},
        cross: {"algorithm": "uld", "lmbda": 0.5, "teacher_endpoint": None}}
    with pytest.raises(ConfigError, match="needs a teacher with the student's tokenizer"):
        plan(**one_state, **{"grid.teachers": [{"name": T2, "algorithms": ["vanilla-onpolicy"]}]})
    with pytest.raises(ConfigError, match=r"\['dskd-onpolicy'\] sample the student's answers .* distill.kd.lmbda"):
        plan(**{"grid.teachers": [{"name": T1, "algorithms": ["dskd-onpolicy"]}]})
