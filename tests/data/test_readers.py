import json

import pytest

from conftest import SHARED, write_jsonl
from distillqa.data import load_examples
from distillqa.errors import DataError

GOOD = {"id": "a", "context": "The AMF handles registration.", "question": "What handles registration?", "answers": ["The AMF"]}


def test_generic_jsonl_reads_all_fields(tmp_path):
    row = {**GOOD, "choices": ["x", "y"], "explanation": "because", "metadata": {"topic": "core"}}
    exs, report = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [row, {"id": 2, "question": "q", "answer": "a"}])))
    assert report.kept == 2
    assert exs[0].answers == ("The AMF",) and exs[0].choices == ("x", "y") and exs[0].source["topic"] == "core"
    assert exs[1].id == "2" and exs[1].answers == ("a",) and exs[1].context == ""


@pytest.mark.parametrize(
    "rows, match",
    [
        (['{"id": "a", "question": '], r"line 1: invalid JSON"),
        ([GOOD, {**GOOD, "id": "b", "question": "  "}], r"line 2 \(id 'b'\): field 'question': must be a non-empty string"),
        ([{k: v for k, v in GOOD.items() if k != "answers"}], r"line 1 \(id 'a'\): field 'answers'"),
        ([{**GOOD, "answers": []}], r"field 'answers': must be a non-empty list"),
        ([GOOD, GOOD], r"line 2 \(id 'a'\): field 'id': duplicate of line 1"),
        ([{**GOOD, "id": ""}], r"line 1: field 'id': missing or empty"),
        (["[1, 2]"], r"line 1: each line must be a JSON object"),
    ],
)
def test_generic_jsonl_errors_name_file_record_field(tmp_path, rows, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=match) as err:
        load_examples(str(path))
    assert str(path) in str(err.value)


def squad(tmp_path, qas, context="The gNB schedules uplink grants."):
    doc = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    return str(path)


def test_squad_offsets_checked_and_unanswerable_counted(tmp_path):
    qas = [
        {"id": "ok", "question": "Who schedules?", "answers": [{"text": "The gNB", "answer_start": 0}]},
        {"id": "imp", "question": "Why?", "answers": [], "is_impossible": True},
        {"id": "off", "question": "What?", "answers": [{"text": "uplink", "answer_start": 3}]},
    ]
    exs, report = load_examples(squad(tmp_path, qas))
    assert [e.id for e in exs] == ["ok"]
    assert report.skipped["unanswerable questions left out"] == ["imp"]
    assert report.skipped["questions without a valid answer left out"] == ["off"]
    with pytest.raises(DataError, match=r"question id 'off': field 'answers\[0\].answer_start': offset 3 does not point"):
        load_examples(squad(tmp_path, qas), on_bad_answer="error")
    exs, _ = load_examples(squad(tmp_path, qas[:2]), include_unanswerable=True)
    assert [e.id for e in exs] == ["ok", "imp"]


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown format"):
        load_examples(str(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="unknown bundled dataset"):
        load_examples("bundled:nope")


def test_bundled_sample_is_a_valid_extractive_set():
    exs, report = load_examples("bundled:telecom-sample")
    assert report.kept == len(exs) >= 150
    assert len({e.context for e in exs}) >= 50
    assert all(e.answers[0] in e.context for e in exs)


@pytest.mark.skipif(not (SHARED / "telequad").is_dir(), reason="needs ../shared/data")
def test_real_telequad_counts():
    exs, report = load_examples(str(SHARED / "telequad" / "TeleQuAD-v4-full.json"))
    assert len(report.skipped["unanswerable questions left out"]) == 223
    assert len(exs) + 223 + len(report.skipped.get("questions without a valid answer left out", [])) == 4485
    assert all(a and a in e.context for e in exs for a in e.answers)


@pytest.mark.skipif(not (SHARED / "cqa").is_dir(), reason="needs ../shared/data")
def test_real_cqa_joined_with_cose():
    exs, report = load_examples(str(SHARED / "cqa" / "dev_rand_split.jsonl"), explanations=str(SHARED / "cqa" / "cose_dev_v1.11.jsonl"))
    assert len(exs) == 1221 and all(len(e.choices) == 5 and e.answers[0] in e.choices for e in exs)
    assert sum(e.explanation is not None for e in exs) > 1200
    _, test_report = load_examples(str(SHARED / "cqa" / "test_rand_split_no_answers.jsonl"))
    assert test_report.kept == 0 and len(test_report.skipped["questions without answerKey left out"]) == 1140
