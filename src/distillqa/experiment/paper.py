"""What the telecom study (Sen et al. 2025, arXiv 2504.20000) found for each hypothesis it
tests, for the report to set next to a run's own result.

Each finding says which side the study found better and how strongly; `agreement` reads a
run's counts (metrics where the null is rejected with A higher, with B higher) against it.
"""

from __future__ import annotations

from dataclasses import dataclass

PAPER_NOTE = ("Sen et al. tested 14 metrics (11 offline + 3 LLM-judge) on TeleQuAD with Llama-family models on GPUs; "
              "a run on other models, data or budgets need not agree. 'Agree' reads this run's significant "
              "metrics against the study's stated direction and strength.")


@dataclass(frozen=True)
class Finding:
    text: str
    better: str | None  # "A" or "B" as the study found; None: it claims no effect; "?": it states no result we hold
    most_metrics: bool = False  # the study rejected the null in most metrics (else in some, or significance varied)

    def agreement(self, a_wins: int, b_wins: int, tested: int) -> str:
        if self.better == "?":
            return "not compared"
        if self.better is None:
            return "yes" if a_wins + b_wins == 0 else "no: this run finds a difference"
        ours, theirs = (a_wins, b_wins) if self.better == "A" else (b_wins, a_wins)
        if theirs:
            return "no: this run finds the opposite direction in some metrics"
        if ours == 0:
            return "no: no significant difference here"
        if self.most_metrics and ours <= tested / 2:
            return f"partly: same direction, significant in fewer metrics ({ours} of {tested})"
        return "yes"


NOT_IN_ABSTRACT = "No result we hold: the abstract states none for this comparison (see the paper's tables)."

PAPER_FINDINGS: dict[str, Finding] = {
    "teacher_sft_same_vocabulary": Finding(
        "SFT of the teacher improves the distilled student when both share a vocabulary, irrespective of algorithm "
        "and metric: null rejected in 13 of 14 metrics.", "A", most_metrics=True),
    "teacher_sft_different_vocabulary": Finding(
        "The teacher-SFT gain is claimed for the same vocabulary only, not for a different-vocabulary teacher.", None),
    "teacher_sft": Finding("Pooled over vocabularies: not reported as one test (see the two rows per vocabulary).", "?"),
    "student_sft": Finding(NOT_IN_ABSTRACT, "?"),
    "both_sft": Finding(
        "SFT of both teacher and student gives better students across all metrics; whether the difference is "
        "significant depends on the teacher's vocabulary.", "A"),
    "both_sft_same_vocabulary": Finding("Better across all metrics; significance depends on the vocabulary.", "A"),
    "both_sft_different_vocabulary": Finding("Better across all metrics; significance depends on the vocabulary.", "A"),
    "dskd_vs_vanilla": Finding(NOT_IN_ABSTRACT, "?"),
    "dskd-cma_vs_uld": Finding(
        "Across vocabularies, dual-space KD helps when SFT is not possible (the study compared DSKD variants, "
        "not ULD).", "A"),
    "vocabulary": Finding(NOT_IN_ABSTRACT, "?"),
}
