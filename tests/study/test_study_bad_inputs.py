"""Bad inputs to `distillqa study create | serve | analyze`, held to the project's rule (see
tests/test_bad_inputs.py): exit 2, one error line naming what is wrong, no traceback, and none of
the user's files removed, changed or added. The wrong admin password on the web is in test_app.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from study_helpers import PASSWORD, make_study, write_rationale_experiment

from distillqa.cli import app  # noqa: E402  (study_helpers skips the module without the extra)

ROW = {"id": "q1", "question": "Where?", "choices": ["a", "b"], "gold": "a", "predicted": "a", "explanation": "Because."}


def rows_file(d: Path, cell: str, lines: list) -> str:
    (d / "answers" / cell).mkdir(parents=True, exist_ok=True)
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (d / "answers" / cell / "study.jsonl").write_text(text)
    return str(d / "answers" / cell)


def non_utf8_cell(d: Path) -> str:
    cell = Path(rows_file(d, "a_seed0", []))
    (cell / "study.jsonl").write_bytes(b'{"id": "caf\xe9"}\n')
    return str(cell)


def password_file(d: Path, text: str = PASSWORD) -> str:
    (d / "pw.txt").write_text(text + "\n")
    return str(d / "pw.txt")


def create(d: Path, *sources: str, password: str | None = PASSWORD, extra: tuple = ()) -> list[str]:
    pw = ["--admin-password-file", password_file(d, password)] if password is not None else []
    return ["study", "create", *sources, "--out", str(d / "study"), *pw, *extra]


def user_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's notes\n")
    return path


def good_cells(d: Path) -> tuple[str, str]:
    return rows_file(d, "mt_unrevised_seed0", [ROW]), rows_file(d, "cf_unrevised_seed0", [ROW])


def ratings_db(d: Path, content: bytes | None) -> str:
    study = make_study(d / "made", questions=4, items_per_condition=2, items_per_rater=3)
    if content is not None:
        (study.path / "study.sqlite").write_bytes(content)
    return str(study.path)


def empty_db(d: Path) -> str:
    from distillqa.study.store import Store
    from distillqa.study.design import Study

    path = ratings_db(d, None)
    Store(Study.load(path))
    return path


CASES = {
    "create-no-study-jsonl": (lambda d: (d / "cell").mkdir() or create(d, str(d / "cell"), good_cells(d)[0]),
                              ["cell/study.jsonl", "no such file"]),
    "create-damaged-jsonl": (lambda d: create(d, rows_file(d, "a_seed0", [ROW, '{"id": "q2", ']), good_cells(d)[1]),
                             ["a_seed0/study.jsonl", "line 2", "invalid JSON"]),
    "create-non-utf8": (lambda d: create(d, non_utf8_cell(d), good_cells(d)[1]), ["a_seed0/study.jsonl", "line 1", "UTF-8"]),
    "create-missing-explanation": (lambda d: create(d, rows_file(d, "a", [{k: v for k, v in ROW.items() if k != "explanation"}]),
                                                    good_cells(d)[1]), ["line 1", "field 'explanation'", "missing"]),
    "create-choices-not-list": (lambda d: create(d, rows_file(d, "a", [{**ROW, "choices": "a, b"}]), good_cells(d)[1]),
                                ["line 1", "field 'choices'"]),
    "create-experiment-without-answers": (lambda d: (d / "exp" / "answers").mkdir(parents=True) or create(d, str(d / "exp")),
                                          ["exp", "no answers/CELL/study.jsonl"]),
    "create-one-condition": (lambda d: create(d, good_cells(d)[0]), ["at least two"]),
    "create-too-few-questions": (lambda d: create(d, *good_cells(d), extra=("--items-per-condition", "5", "--items-per-rater", "2")),
                                 ["has 1 question(s)", "5 are needed"]),
    "create-bad-completion-code": (lambda d: create(d, *good_cells(d), extra=("--completion-code", "<x>")), ["completion-code"]),
    "create-short-password": (lambda d: create(d, *good_cells(d), password="short"), ["admin password", "at least 8"]),
    "create-no-password": (lambda d: create(d, *good_cells(d), password=None), ["--admin-password-file", "DISTILLQA_STUDY_PASSWORD"]),
    "create-password-file-missing": (lambda d: [*create(d, *good_cells(d), password=None), "--admin-password-file", str(d / "nope.txt")],
                                     ["nope.txt", "No such file"]),
    "create-output-exists": (lambda d: user_file(d / "study" / "notes.md") and create(d, *good_cells(d)), ["study", "already exists"]),
    "analyze-not-a-study": (lambda d: ["study", "analyze", str(d)], ["not a study directory"]),
    "analyze-damaged-study": (lambda d: (Path(ratings_db(d, None)) / "study.json").write_text("{") and
                              ["study", "analyze", str(d / "made" / "study")], ["damaged"]),
    "analyze-no-ratings-yet": (lambda d: ["study", "analyze", ratings_db(d, None)], ["no ratings yet", "study serve"]),
    "analyze-damaged-database": (lambda d: ["study", "analyze", ratings_db(d, b"not a database" * 100)],
                                 ["study.sqlite", "damaged"]),
    "analyze-too-few-ratings": (lambda d: ["study", "analyze", empty_db(d)], ["too few ratings"]),
    "serve-not-a-study": (lambda d: ["study", "serve", str(d)], ["not a study directory"]),
}


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", CASES)
def test_bad_study_input(name, tmp_path, monkeypatch):
    monkeypatch.delenv("DISTILLQA_STUDY_PASSWORD", raising=False)
    setup, expect = CASES[name]
    args = setup(tmp_path)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for part in expect:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    assert snapshot(tmp_path) == before, "the command removed, changed or added files of the user's"


def test_create_on_a_rationale_experiment(tmp_path):
    """The README's command: every cell of the experiment, seeds pooled into their method's condition."""
    exp = write_rationale_experiment(tmp_path / "exp")
    result = CliRunner().invoke(app, ["study", "create", str(exp), "--out", str(tmp_path / "study"), "--items-per-condition", "10",
                                      "--admin-password-file", password_file(tmp_path), "--tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "30 items in 3 conditions" in result.output and "8 raters needed" in result.output
    conditions = json.loads((tmp_path / "study" / "conditions.json").read_text())
    assert sorted(c["name"] for c in conditions.values()) == ["cf_unrevised", "mt-cf_unrevised", "mt_unrevised"]
    items = [json.loads(line) for line in (tmp_path / "study" / "items.jsonl").read_text().splitlines()]
    assert all(set(i) == {"id", "condition", "question_id", "question", "choices", "predicted", "explanation"} for i in items)
    assert not any(c["name"] in json.dumps(items) for c in conditions.values())  # blinded
    by_condition = {}
    for i in items:
        by_condition.setdefault(i["condition"], set()).add(i["question_id"])
    assert len(set(map(frozenset, by_condition.values()))) == 1  # the same questions in every condition
    assert len((tmp_path / "study" / "links.txt").read_text().split()) == 2
