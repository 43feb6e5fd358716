"""Readers that turn QA files into `QAExample` records.

Formats:
- `jsonl`: the generic hand-written format, one JSON object per line with `id`, `question`,
  `answers` (list of strings; `answer`, a single string, is accepted too), and optional
  `context`, `choices`, `explanation`, `metadata`.
- `squad`: SQuAD-style JSON (TeleQuAD): `data[].paragraphs[].{context, qas[]}`.
- `cqa`: CommonsenseQA jsonl, optionally joined with CoS-E explanations on `id`.

Every problem is reported as a `DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Literal

from distillqa.data.records import QAExample
from distillqa.errors import DataError

log = logging.getLogger(__name__)

BUNDLED = {"telecom-sample": "telecom_sample.jsonl"}
Format = Literal["auto", "jsonl", "squad", "cqa"]


@dataclass
class LoadReport:
    """What a reader kept and what it left out, so that callers can report it."""

    kept: int = 0
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, record: str) -> None:
        self.skipped.setdefault(reason, []).append(record)

    def summary(self) -> str:
        parts = [f"{self.kept} examples"]
        parts += [f"{len(ids)} {reason}" for reason, ids in self.skipped.items()]
        return ", ".join(parts)


def bundled_path(name: str) -> Path:
    if name not in BUNDLED:
        raise DataError(f"bundled:{name}", None, None, f"unknown bundled dataset; known: {', '.join(BUNDLED)}")
    return Path(str(files("distillqa.data").joinpath("bundled", BUNDLED[name])))


def load_examples(
    source: str,
    format: Format = "auto",
    include_unanswerable: bool = False,
    on_bad_answer: Literal["error", "skip"] = "skip",
    explanations: str | None = None,
) -> tuple[list[QAExample], LoadReport]:
    """Load examples from `source`: a path, or `bundled:<name>` for a dataset shipped with distillqa."""
    path = bundled_path(source.removeprefix("bundled:")) if source.startswith("bundled:") else Path(source)
    check_data_file(path)
    if explanations:
        check_data_file(Path(explanations))
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "jsonl":
        examples, report = read_qa_jsonl(path)
    elif fmt == "squad":
        examples, report = read_squad(path, include_unanswerable=include_unanswerable, on_bad_answer=on_bad_answer)
    elif fmt == "cqa":
        examples, report = read_cqa(path, explanations=explanations)
    else:
        raise DataError(str(path), None, None, f"unknown format '{fmt}'; use one of jsonl, squad, cqa")
    return examples, report


def check_data_file(path: Path) -> None:
    """A data file must be a readable, non-empty file; errors say which of these it is not."""
    if path.is_dir():
        raise DataError(str(path), None, None, "is a directory, not a data file")
    if not path.exists():
        raise DataError(str(path), None, None, "no such file")
    if not path.is_file():
        raise DataError(str(path), None, None, "is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise DataError(str(path), None, None, f"cannot be read: {e.strerror or e}") from None
    if not head.strip():
        raise DataError(str(path), None, None, "the file is empty" if not head else "the file holds only whitespace")


def decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(str(path), f"line {lineno}", None, f"not UTF-8 text (byte {e.start + 1} of the line); "
                        "save the file as UTF-8") from None


def read_text(path: Path) -> str:
    """The whole file as UTF-8; an invalid byte is reported with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(str(path), f"line {line}", None, "not UTF-8 text; save the file as UTF-8") from None


def detect_format(path: Path) -> str:
    """Guess the format from the file name and its first record."""
    if path.suffix == ".json":
        return "squad"
    if path.suffix != ".jsonl":
        raise DataError(str(path), None, None, "unknown format: expected a .json (SQuAD-style) or .jsonl file, or set data.format")
    with open(path, "rb") as f:
        lineno, first = next(((n, raw) for n, raw in enumerate(f, 1) if raw.strip()), (1, b""))
    try:
        row = json.loads(decode_line(first, path, lineno))
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"line {lineno}", None, f"invalid JSON: {e.msg}") from None
    return "cqa" if isinstance(row, dict) and isinstance(row.get("question"), dict) else "jsonl"


def iter_json_lines(path: Path):
    """(line number, object) for each non-blank line; invalid JSON or a non-object names the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            line = decode_line(raw, path, lineno)
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), f"line {lineno}", None, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(str(path), f"line {lineno}", None, "each line must be a JSON object")
            yield lineno, row


def _text(row: dict, key: str, path: Path, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        problem = "missing" if value is None else "must be a non-empty string"
        raise DataError(str(path), where, key, problem)
    return value


def read_qa_jsonl(path: Path) -> tuple[list[QAExample], LoadReport]:
    """Read the generic QA format (see the module docstring and the README); for JSONL files distillqa
    wrote itself, see `distillqa.io.read_jsonl`."""
    examples, seen, report = [], {}, LoadReport()
    for lineno, row in iter_json_lines(path):
        where = f"line {lineno}"
        ex_id = row.get("id")
        if not isinstance(ex_id, (str, int)) or str(ex_id).strip() == "":
            raise DataError(str(path), where, "id", "missing or empty")
        ex_id = str(ex_id)
        where = f"line {lineno} (id '{ex_id}')"
        if ex_id in seen:
            raise DataError(str(path), where, "id", f"duplicate of line {seen[ex_id]}")
        seen[ex_id] = lineno
        answers = row.get("answers", [row["answer"]] if "answer" in row else None)
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(str(path), where, "answers", "must be a non-empty list of non-empty strings")
        choices = row.get("choices", [])
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(str(path), where, "choices", "must be a list of strings")
        metadata = row.get("metadata", {})
        if not isinstance(metadata, dict):
            raise DataError(str(path), where, "metadata", "must be a JSON object")
        examples.append(
            QAExample(
                id=ex_id,
                question=_text(row, "question", path, where),
                answers=tuple(answers),
                context=_text(row, "context", path, where, required=False),
                choices=tuple(choices),
                explanation=_text(row, "explanation", path, where, required=False) or None,
                source={"file": str(path), "line": lineno, **metadata},
            )
        )
    report.kept = len(examples)
    return examples, report


def read_squad(
    path: Path, include_unanswerable: bool = False, on_bad_answer: Literal["error", "skip"] = "skip"
) -> tuple[list[QAExample], LoadReport]:
    """Read SQuAD-style JSON. Unanswerable questions are left out unless asked for, and counted.

    A bad answer (empty text, or an `answer_start` that does not point at its text in the
    context) is an error with `on_bad_answer="error"`; with `"skip"` (the default, since real
    files contain a few) that answer is dropped and a question left with no answer is skipped,
    both counted in the report and logged.
    """
    try:
        doc = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"line {e.lineno}", None, f"invalid JSON: {e.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(str(path), None, "data", "expected a SQuAD-style object with a 'data' list")
    examples, seen, report = [], set(), LoadReport()
    for a_i, article in enumerate(doc["data"]):
        if not isinstance(article, dict):
            raise DataError(str(path), f"data[{a_i}]", None, "must be an object with a 'paragraphs' list")
        if not isinstance(article.get("paragraphs", []), list):
            raise DataError(str(path), f"data[{a_i}]", "paragraphs", "must be a list")
        for p_i, para in enumerate(article.get("paragraphs", [])):
            where_p = f"data[{a_i}].paragraphs[{p_i}]"
            if not isinstance(para, dict):
                raise DataError(str(path), where_p, None, "must be an object with 'context' and 'qas'")
            if not isinstance(para.get("qas", []), list):
                raise DataError(str(path), where_p, "qas", "must be a list")
            context = para.get("context")
            if not isinstance(context, str) or not context.strip():
                raise DataError(str(path), where_p, "context", "missing or empty")
            for q_i, qa in enumerate(para.get("qas", [])):
                if not isinstance(qa, dict):
                    raise DataError(str(path), f"{where_p}.qas[{q_i}]", None, "must be a JSON object")
                qid = qa.get("id")
                if not qid or not isinstance(qid, (str, int)):
                    raise DataError(str(path), f"{where_p}.qas[{q_i}]", "id", "missing or empty")
                where = f"question id '{qid}'"
                if qid in seen:
                    raise DataError(str(path), where, "id", "duplicate question id")
                seen.add(qid)
                question = _text(qa, "question", path, where)
                if qa.get("is_impossible"):
                    if not include_unanswerable:
                        report.skip("unanswerable questions left out", qid)
                        continue
                    answers = [""]
                else:
                    answers = _checked_answers(qa, context, path, where, on_bad_answer, report)
                    if not answers:
                        report.skip("questions without a valid answer left out", qid)
                        continue
                examples.append(
                    QAExample(
                        id=str(qid),
                        question=question,
                        answers=tuple(dict.fromkeys(answers)),
                        context=context,
                        source={"file": str(path), "title": article.get("title", ""), "paragraph": where_p},
                    )
                )
    report.kept = len(examples)
    for reason, ids in report.skipped.items():
        if not reason.startswith("unanswerable"):
            log.warning("%s: %d %s: %s", path, len(ids), reason, "; ".join(ids[:3]))
    return examples, report


def _checked_answers(qa, context, path, where, on_bad_answer, report) -> list[str]:
    answers = qa.get("answers")
    if not isinstance(answers, list) or not answers:
        raise DataError(str(path), where, "answers", "must be a non-empty list for an answerable question")
    kept = []
    for i, ans in enumerate(answers):
        text, start = ans.get("text") if isinstance(ans, dict) else None, ans.get("answer_start") if isinstance(ans, dict) else None
        if not isinstance(text, str) or not text.strip():
            problem, field = "missing or empty", f"answers[{i}].text"
        elif not isinstance(start, int):
            problem, field = "missing or not an integer", f"answers[{i}].answer_start"
        elif context[start : start + len(text)] != text:
            problem, field = f"offset {start} does not point at the answer text {text[:40]!r} in the context", f"answers[{i}].answer_start"
        else:
            kept.append(text)
            continue
        if on_bad_answer == "error":
            raise DataError(str(path), where, field, problem)
        report.skip("bad answers dropped", f"{where} {field}: {problem}")
    return kept


def read_cqa(path: Path, explanations: str | None = None) -> tuple[list[QAExample], LoadReport]:
    """Read CommonsenseQA jsonl; join CoS-E explanations (`explanation.open-ended`) on `id` if given."""
    cose, cose_lines = {}, {}
    if explanations:
        for lineno, row in iter_json_lines(Path(explanations)):
            exp = row.get("explanation")
            if not isinstance(exp, dict) or not isinstance(exp.get("open-ended"), str):
                raise DataError(explanations, f"line {lineno}", "explanation.open-ended", "missing or not a string")
            cose_id = _record_id(row, Path(explanations), lineno, cose_lines)
            cose[cose_id] = exp["open-ended"]
    examples, report, seen = [], LoadReport(), {}
    for lineno, row in iter_json_lines(path):
        _record_id(row, path, lineno, seen)
        where = f"line {lineno} (id '{row.get('id')}')"
        q = row.get("question")
        if not isinstance(q, dict):
            raise DataError(str(path), where, "question", "must be an object with 'stem' and 'choices'")
        stem = _text(q, "stem", path, where)
        choices = q.get("choices")
        if not isinstance(choices, list) or not choices:
            raise DataError(str(path), where, "question.choices", "must be a non-empty list")
        for i, c in enumerate(choices):
            if not isinstance(c, dict) or not isinstance(c.get("label"), str) or not isinstance(c.get("text"), str):
                raise DataError(str(path), where, f"question.choices[{i}]", "must be an object with 'label' and 'text'")
        labels = {c["label"]: c["text"] for c in choices}
        key = row.get("answerKey")
        if key is None:  # the official test file has no answers; it cannot be scored
            report.skip("questions without answerKey left out", str(row.get("id")))
            continue
        if key not in labels:
            raise DataError(str(path), where, "answerKey", f"'{key}' is not one of the choice labels {sorted(labels)}")
        examples.append(
            QAExample(
                id=str(row["id"]),
                question=stem,
                answers=(labels[key],),
                choices=tuple(labels.values()),
                explanation=cose.get(str(row["id"])),
                source={"file": str(path), "line": lineno, "concept": q.get("question_concept", "")},
            )
        )
    report.kept = len(examples)
    return examples, report


def _record_id(row: dict, path: Path, lineno: int, seen: dict[str, int]) -> str:
    """A line's `id` as a string; missing, empty or repeated ids are errors naming the line."""
    rid = row.get("id")
    if not isinstance(rid, (str, int)) or str(rid).strip() == "":
        raise DataError(str(path), f"line {lineno}", "id", "missing or empty")
    rid = str(rid)
    if rid in seen:
        raise DataError(str(path), f"line {lineno} (id '{rid}')", "id", f"duplicate of line {seen[rid]}")
    seen[rid] = lineno
    return rid
