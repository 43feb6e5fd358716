"""Rationale records: a multiple-choice question with teacher-written explanations.

One JSONL row per question, in distillqa's own format (what `rationales generate` writes):

    {"id": "...", "question": "...", "choices": ["a", "b", ...], "answer": "b",
     "rationale": "...", "revised_rationale": "...", "counterfactuals": ["why a", "why b", ...],
     "provenance": {"teacher": "...", "template_version": "...", "decoding": {...}}}

`rationale`, `revised_rationale` and `counterfactuals` (one rationale per choice, arguing for
it) may be missing or empty where the teacher wrote none; such questions are skipped, and counted, by
the methods that need that text. The column layout of the Llama-2 teacher outputs of
Hendriks et al. (`few_shot_positive_rationale`, `few_shot_revision`,
`counterfactual_prompt_answer_{k}_rationale`, k = 1..len(choices)) is read as well, so those
files can be used as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from distillqa.data.readers import check_data_file, iter_json_lines
from distillqa.errors import DataError

RATIONALE_TYPES = ("unrevised", "revised")


@dataclass(frozen=True)
class RationaleExample:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: str
    rationale: str | None
    revised_rationale: str | None = None
    counterfactuals: tuple[str, ...] = ()
    provenance: dict = field(default_factory=dict, compare=False, hash=False)

    def explanation(self, kind: str) -> str | None:
        """The gold rationale of `kind` ('unrevised' or 'revised'); None if the teacher wrote none."""
        return self.revised_rationale if kind == "revised" else self.rationale

    def to_dict(self) -> dict:
        return {"id": self.id, "question": self.question, "choices": list(self.choices), "answer": self.answer,
                "rationale": self.rationale, "revised_rationale": self.revised_rationale,
                "counterfactuals": list(self.counterfactuals), "provenance": self.provenance}


def _text(row: dict, key: str, path: str, where: str, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DataError(path, where, key, "missing or empty" if value in (None, "") else "must be a non-empty string")
    return value.strip()


def _optional(row: dict, key: str, path: str, where: str) -> str | None:
    """A text the teacher may have failed to write: missing or empty is None (the question is
    then skipped where that text is needed, and counted)."""
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(path, where, key, "must be a string")
    return value.strip() if value and value.strip() else None


def parse_row(row: dict, path: str, where: str) -> RationaleExample:
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(path, where, "choices", "must be a list of at least two non-empty strings")
    answer = _text(row, "answer", path, where)
    if answer not in choices:
        raise DataError(path, where, "answer", f"'{answer}' is not one of the choices {choices}")
    if "few_shot_positive_rationale" in row:  # the Llama-2 teacher outputs' columns
        rationale = _optional(row, "few_shot_positive_rationale", path, where)
        revised = _optional(row, "few_shot_revision", path, where)
        keys = [f"counterfactual_prompt_answer_{k}_rationale" for k in range(1, len(choices) + 1)]
        counterfactuals = [_optional(row, k, path, where) or "" for k in keys] if keys[0] in row else []
        provenance = {"teacher": "Llama-2 (imported)", "file": path}
    else:
        rationale = _optional(row, "rationale", path, where)
        revised = _optional(row, "revised_rationale", path, where)
        counterfactuals = row.get("counterfactuals") or []
        if counterfactuals and (len(counterfactuals) != len(choices) or not all(isinstance(c, str) for c in counterfactuals)):
            raise DataError(path, where, "counterfactuals", "must hold one rationale (a string, empty if missing) per choice")
        provenance = row.get("provenance") or {}
    return RationaleExample(_text(row, "id", path, where), _text(row, "question", path, where),
                            tuple(c.strip() for c in choices), answer.strip(), rationale, revised,
                            tuple(c.strip() for c in counterfactuals), provenance)


LAYOUT_KEYS = frozenset(("id", "question", "choices", "answer", "rationale", "revised_rationale", "counterfactuals", "provenance"))


def imported_layout(path: Path) -> str | None:
    """None if `path` is a JSONL file in exactly the layout `rationales import` writes (a previous
    import it may replace with --overwrite), else why it is not."""
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                row = json.loads(raw)
                if not isinstance(row, dict) or set(row) != LAYOUT_KEYS:
                    return f"line {lineno} is not a row of distillqa's rationale layout"
    except (OSError, ValueError) as e:
        return f"not a JSONL file ({type(e).__name__})"
    return None


def read_rationales(path: str | Path, limit: int | None = None) -> list[RationaleExample]:
    """Read a rationale file (either layout); errors name the file, line and field."""
    path = Path(path)
    check_data_file(path)
    out, seen = [], set()
    for lineno, row in iter_json_lines(path):
        ex = parse_row(row, str(path), f"line {lineno} (id '{row.get('id')}')")
        if ex.id in seen:
            raise DataError(str(path), f"line {lineno}", "id", f"duplicate id '{ex.id}'")
        seen.add(ex.id)
        out.append(ex)
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(str(path), None, None, "no rationale rows")
    return out
