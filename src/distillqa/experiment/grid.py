"""The experiment's plan: which models are trained, which are answered and scored, and which
pairs of them each hypothesis compares. Pure functions of the config (no models loaded), so
the plan, the runner and the report always agree.

Rows (each answered on the same test questions and scored per example):
- references: every teacher base and SFT, the student base and SFT;
- SFT-only baselines: the student in each state fine-tuned with the distillation stage's own
  training budget (same examples, steps, batch and learning rate) and no teacher, so that
  `kd_vs_sft` asks what the teacher added;
- cells: teacher x teacher state x student state x algorithm, the student distilled from that
  teacher (its SFT run when the state is `sft`) starting from the student in that state.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from distillqa.config import ON_POLICY
from distillqa.errors import ConfigError
from distillqa.experiment.config import ExperimentConfig

# Vanilla KD and ULD both match output distributions; DSKD and DSKD-CMA both distil in the
# two models' representation spaces; sequence-level KD learns the teacher's answers as text, with any
# vocabulary. An algorithm on-policy (`-onpolicy`: trained on the student's own samples) is a family of
# its own. The vocabulary hypothesis pairs algorithms of one family.
ALGORITHM_FAMILY = {"vanilla": "logit", "uld": "logit", "dskd": "dual-space", "dskd-cma": "dual-space", "seqkd": "sequence"}
SAME_VOCAB_ONLY = ("vanilla", "dskd")


def base_algorithm(algorithm: str) -> str:
    """The `kd.algorithm` of a grid algorithm: `vanilla-onpolicy` -> `vanilla`."""
    return algorithm.removesuffix(ON_POLICY)


def is_on_policy(algorithm: str) -> bool:
    return algorithm.endswith(ON_POLICY)


def algorithm_family(algorithm: str) -> str:
    family = ALGORITHM_FAMILY[base_algorithm(algorithm)]
    return f"{family} on-policy" if is_on_policy(algorithm) else family


def slug(name: str) -> str:
    """A directory-safe short form of a model name (`org/Model-7B` -> `Model-7B`)."""
    base = name.rstrip("/").split("/")[-1] or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "model"


@dataclass(frozen=True)
class Row:
    """One system answered and scored: a reference model or a distilled cell."""

    name: str  # directory name under rows/ and label in the report
    kind: str  # "teacher" | "student" | "sft-only" | "cell"
    factors: dict = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class Hypothesis:
    name: str
    question: str  # "A vs B" in words
    pairs: tuple[tuple[str, str], ...]  # (row A, row B), A is the treatment


def teacher_sft_dir(teacher: str) -> str:
    return f"sft/teacher-{slug(teacher)}"


def teacher_cache_dir(teacher: str, state: str) -> str:
    """Where `grid.teacher_cache` keeps a teacher state's cache, read by every vanilla cell of that state."""
    return f"teacher_cache/teacher-{slug(teacher)}-{state}"


STUDENT_SFT_DIR = "sft/student"


def held_out_dir(name: str) -> str:
    """Where the rows' answers to an extra test set (`held_out`) go; rows/ holds the main test split's."""
    return f"held_out/{name}"


def sft_only_name(student_state: str) -> str:
    return f"sft-only_student-{student_state}"


def kd_cell_name(teacher: str, t_state: str, s_state: str, algorithm: str) -> str:
    return f"kd-{algorithm}_teacher-{slug(teacher)}-{t_state}_student-{s_state}"


def plan_rows(cfg: ExperimentConfig, same_vocab: dict[str, bool]) -> list[Row]:
    """All rows in run order; `same_vocab[teacher]` says whether it shares the student's tokenizer."""
    grid = cfg.grid
    slugs = [slug(t.name) for t in grid.teachers]
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"grid.teachers: names {slugs} collide as directory names; rename one model directory")
    rows: list[Row] = []
    for t in grid.teachers:
        for state in grid.teacher_states:
            rows.append(Row(f"teacher-{slug(t.name)}-{state}", "teacher", {"teacher": t.name, "teacher_state": state}))
    for state in grid.student_states:
        rows.append(Row(f"student-{state}", "student", {"student_state": state}))
    for state in grid.student_states:
        rows.append(Row(sft_only_name(state), "sft-only", {"student_state": state}))
    for t in grid.teachers:
        vocab = "same" if same_vocab[t.name] else "different"
        for algorithm in t.algorithms:
            if base_algorithm(algorithm) in SAME_VOCAB_ONLY and vocab == "different":
                raise ConfigError(
                    f"grid.teachers: '{algorithm}' needs a teacher with the student's tokenizer, but {t.name} and "
                    f"{grid.student.name} map tokens to ids differently; use 'dskd-cma', 'uld' or 'seqkd' (or their "
                    "-onpolicy variants) for this teacher")
            for t_state in grid.teacher_states:
                for s_state in grid.student_states:
                    rows.append(Row(kd_cell_name(t.name, t_state, s_state, algorithm), "cell", {
                        "teacher": t.name, "teacher_state": t_state, "student_state": s_state, "algorithm": algorithm,
                        "family": algorithm_family(algorithm), "vocabulary": vocab}))
    return rows


def _pairs(cells: list[Row], changed: dict[str, tuple[str, str]], matched: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Cells whose `changed` factors take level A, each paired with the cell that takes level B
    and equals it on every `matched` factor."""
    out = []
    for a in cells:
        if not all(a.factors[f] == levels[0] for f, levels in changed.items()):
            continue
        for b in cells:
            if all(b.factors[f] == levels[1] for f, levels in changed.items()) and all(
                    a.factors[m] == b.factors[m] for m in matched):
                out.append((a.name, b.name))
    return tuple(out)


def plan_hypotheses(cfg: ExperimentConfig, rows: list[Row]) -> list[Hypothesis]:
    """The study's questions as families of paired comparisons; those the grid cannot answer are left out."""
    cells = [r for r in rows if r.kind == "cell"]
    specs = [
        ("teacher_sft", "teacher SFT vs teacher base", {"teacher_state": ("sft", "base")},
         ("teacher", "student_state", "algorithm")),
        ("student_sft", "student SFT vs student base", {"student_state": ("sft", "base")},
         ("teacher", "teacher_state", "algorithm")),
        ("both_sft", "both SFT vs neither", {"teacher_state": ("sft", "base"), "student_state": ("sft", "base")},
         ("teacher", "algorithm")),
    ]
    for a, b in cfg.stats.algorithm_pairs:
        specs.append((f"{a}_vs_{b}", f"{a} vs {b}", {"algorithm": (a, b)}, ("teacher", "teacher_state", "student_state")))
    specs.append(("vocabulary", "same-vocabulary teacher vs different-vocabulary teacher",
                  {"vocabulary": ("same", "different")}, ("teacher_state", "student_state", "family")))
    out = []
    for name, question, changed, matched in specs:
        pairs = _pairs(cells, changed, matched)
        if pairs:
            out.append(Hypothesis(name, question, pairs))
    # The study reports the SFT effects per teacher vocabulary: split them when the grid has both.
    if {c.factors["vocabulary"] for c in cells} == {"same", "different"}:
        for name, question, changed, matched in [sp for sp in specs if sp[0] in ("teacher_sft", "both_sft")]:
            for vocab in ("same", "different"):
                pairs = _pairs([c for c in cells if c.factors["vocabulary"] == vocab], changed, matched)
                if pairs:  # e.g. both_sft in a grid with one student state has none
                    out.append(Hypothesis(f"{name}_{vocab}_vocabulary", f"{question} ({vocab}-vocabulary teacher)", pairs))
    # What the teacher adds: each cell against the same student trained as long without one.
    baselines = {r.factors["student_state"]: r.name for r in rows if r.kind == "sft-only"}
    kd_pairs = tuple((c.name, baselines[c.factors["student_state"]]) for c in cells if c.factors["student_state"] in baselines)
    if kd_pairs:
        out.append(Hypothesis("kd_vs_sft", "distilled vs SFT alone (same student, examples and steps)", kd_pairs))
    # The reference models themselves: does SFT help the teachers and the student before any KD?
    for kind, factor, matched in (("teacher", "teacher_state", ("teacher",)), ("student", "student_state", ())):
        pairs = _pairs([r for r in rows if r.kind == kind], {factor: ("sft", "base")}, matched)
        if pairs:
            out.append(Hypothesis(f"{kind}_model_sft", f"{kind} model alone: SFT vs base", pairs))
    return out
