"""Checks that an experiment shows the tool working, not only running: every row answers in
words, the student starts as a working model, distillation gets somewhere near the teacher, and
the teacher's SFT shows through distillation. Computed from results/ and the predictions;
`distillqa demo` prints them, the report lists them.

"Answers in words": at least 80% of a row's predictions are non-empty and have at least half of
their words in the experiment's own text (every context, question and reference of the data),
a vocabulary that real answers draw on and gibberish ("Likeactlyactly", "Hastσring(mist")
does not.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from distillqa.io import read_jsonl

WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
IN_WORDS_SHARE = 0.8  # of a row's predictions
KNOWN_WORDS_SHARE = 0.5  # of one prediction's words


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def in_words(prediction: str, vocabulary: set[str]) -> bool:
    found = words(prediction)
    return bool(found) and sum(w in vocabulary for w in found) >= KNOWN_WORDS_SHARE * len(found)


def data_vocabulary(examples) -> set[str]:
    return {w for ex in examples for text in (ex.context, ex.question, *ex.answers) for w in words(text)}


def row_in_words(exp: Path, row: str, vocabulary: set[str]) -> float:
    """Share of the row's predictions that answer in words."""
    preds = [r["prediction"] for r in read_jsonl(exp / "rows" / row / "predictions.jsonl")]
    return sum(in_words(p, vocabulary) for p in preds) / len(preds) if preds else 0.0


def _metric_mean(row: dict, metric: str) -> float:
    return row["metrics"][metric]["mean"]


def _direction_count(hyp: dict, side: str) -> tuple[int, int]:
    """(metrics where the null is rejected with `side` higher, metrics tested)."""
    results = hyp["results"]
    return sum(r["rejected"] and r["direction"] == side for r in results), len(results)


def experiment_checks(exp: Path, results: dict, vocabulary: set[str], metric: str = "rouge_l") -> list[Check]:
    """The four checks of the tool working, and `kd_vs_sft` (reported, with no pass mark: it is the finding)."""
    rows = {r["name"]: r for r in results["rows"]}
    hyps = {h["name"]: h for h in results["hypotheses"]}
    checks = []
    shares = {name: row_in_words(exp, name, vocabulary) for name in rows}
    worst = min(shares, key=shares.get)
    checks.append(Check("every row answers in words", shares[worst] >= IN_WORDS_SHARE,
                        f"lowest: {worst} with {shares[worst]:.0%} of answers in words (needs {IN_WORDS_SHARE:.0%})"))
    if metric not in results["metrics"]:
        return checks + [Check(f"{metric} scored", False, f"{metric} is not among the experiment's metrics")]
    if "student-base" in rows:
        base = _metric_mean(rows["student-base"], metric)
        checks.append(Check("student base works", base >= 0.07, f"student base {metric} {base:.3f} (needs >= 0.070)"))
    cells = [r for r in rows.values() if r["kind"] == "cell"]
    teachers = [r for r in rows.values() if r["kind"] == "teacher" and r["factors"]["teacher_state"] == "sft"]
    if cells and teachers:
        best_cell = max(cells, key=lambda r: _metric_mean(r, metric))
        best_teacher = max(teachers, key=lambda r: _metric_mean(r, metric))
        c, t = _metric_mean(best_cell, metric), _metric_mean(best_teacher, metric)
        checks.append(Check("best distilled cell reaches half the best SFT'd teacher", c >= 0.5 * t,
                            f"{best_cell['label']}: {metric} {c:.3f} vs {best_teacher['label']}: {t:.3f} "
                            f"({c / t if t else float('nan'):.2f}x, needs >= 0.50x)"))
    if "teacher_sft" in hyps:
        higher, tested = _direction_count(hyps["teacher_sft"], "A")
        need = min(6, tested)
        checks.append(Check("teacher SFT shows through distillation", higher >= need,
                            f"null rejected with the SFT'd teacher's students higher in {higher} of {tested} metrics "
                            f"(needs {need})"))
    return checks


def kd_vs_sft_line(results: dict) -> str | None:
    hyp = next((h for h in results["hypotheses"] if h["name"] == "kd_vs_sft"), None)
    if hyp is None:
        return None
    a, tested = _direction_count(hyp, "A")
    b, _ = _direction_count(hyp, "B")
    return (f"distilled vs SFT alone (kd_vs_sft): null rejected with the distilled students higher in {a} of {tested} "
            f"metrics, with SFT alone higher in {b}")


def as_dicts(checks: list[Check]) -> list[dict]:
    return [asdict(c) for c in checks]
