"""Multiple-choice scores, as lm-evaluation-harness computes them, per example.

Log-likelihood (rows written by `generate` with `mcq.method: loglikelihood`, which hold each
choice's summed log-probability after the prompt, `choice_logprobs`, and the length in characters
of the text scored, `choice_lengths`):
- `acc`: the choice with the highest log-likelihood is a reference answer;
- `acc_norm`: the same after dividing each log-likelihood by its length in characters, so long
  choices are not penalised for having more tokens.

Generated answers (`choice_accuracy`) are mapped to one choice by this rule, first match wins:
1. a label: the whole answer, after an optional "Answer:" / "The answer is", is a letter (A, B,
   ...) or a number (1, 2, ...) of one of the choices, alone, or followed by `.`, `)` or `:` and
   any text, or alone on the answer's first line with anything after it (a model that goes on to
   write the next question), optionally in parentheses ("B", "(b)", "2.", "C) Paris",
   "D\n\nQuestion: ..."); unless the answer is
   exactly one choice's text (choices that are numbers: "3" is the choice "3", not the third);
2. the text: the answer equals one choice after SQuAD normalisation (case, punctuation,
   articles, white space);
3. the best overlap: the choice with the highest token F1 against the answer, if that F1 is
   above 0 and no other choice ties with it.
An answer that maps to no choice (a refusal, an empty answer, a tie) counts as wrong and is
counted apart by `unmapped_choice`.
"""

from __future__ import annotations

import re

from distillqa.data.prompts import LETTERS
from distillqa.metrics.squad import _f1, normalize

_ANSWER_LEAD = re.compile(r"^\s*(?:the\s+)?(?:correct\s+)?answer(?:\s+is)?\b\s*[:\-]?\s*", re.IGNORECASE)
_LABEL = re.compile(r"^\(?([A-Za-z]|\d{1,2})\)?(?:[.):](?:\s.*)?|[ \t]*\n.*)?$", re.DOTALL)


def map_choice(answer: str, choices: list[str]) -> int | None:
    """The index of the choice `answer` names by the module's rule, or None."""
    text = _ANSWER_LEAD.sub("", answer.strip(), count=1).strip()
    target = normalize(text)
    exact = [i for i, c in enumerate(choices) if normalize(c) == target]
    if len(exact) == 1:  # checked first only so that choices that are numbers ("3") are not read as labels
        return exact[0]
    if match := _LABEL.match(text):
        mark = match.group(1)
        index = int(mark) - 1 if mark.isdigit() else LETTERS.find(mark.upper())
        if 0 <= index < len(choices):
            return index
    overlaps = [_f1(text, c) for c in choices]
    best = max(overlaps, default=0.0)
    if best > 0 and overlaps.count(best) == 1:
        return overlaps.index(best)
    return None


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _correct(row: dict, index: int | None) -> float:
    return float(index is not None and row["choices"][index] in row["references"])


# Rows reach these functions checked: evaluate makes sure every row has the fields a metric needs
# (`Metric.needs`), and read_predictions that they are consistent.
def acc(rows: list[dict], settings=None) -> list[float]:
    return [_correct(row, _argmax(row["choice_logprobs"])) for row in rows]


def acc_norm(rows: list[dict], settings=None) -> list[float]:
    return [_correct(row, _argmax([lp / max(1, n) for lp, n in zip(row["choice_logprobs"], row["choice_lengths"])]))
            for row in rows]


def choice_accuracy(rows: list[dict], settings=None) -> list[float]:
    return [_correct(row, map_choice(row["prediction"], row["choices"])) for row in rows]


def unmapped_choice(rows: list[dict], settings=None) -> list[float]:
    return [float(map_choice(row["prediction"], row["choices"]) is None) for row in rows]
