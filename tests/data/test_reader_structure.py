"""Structure errors of SQuAD-style and CommonsenseQA / CoS-E files: each is a DataError whose
message names the file, the record and the field, never a Python exception from inside the reader."""

from __future__ import annotations

import json
import re

import pytest

from conftest import write_jsonl
from distillqa.data import load_examples
from distillqa.errors import DataError


def qa(qid: str) -> dict:
    return {"id": qid, "question": "Who schedules?", "answers": [{"text": "The gNB", "answer_start": 0}]}


def para(*qids: str) -> dict:
    return {"context": "The gNB schedules uplink grants.", "qas": [qa(q) for q in qids]}


@pytest.mark.parametrize("doc, message", [
    ({"version": "1.1"}, "s.json: field 'data': expected a SQuAD-style object with a 'data' list"),
    ({"data": {"paragraphs": []}}, "s.json: field 'data': expected a SQuAD-style object with a 'data' list"),
    ([para("a")], "s.json: field 'data': expected a SQuAD-style object with a 'data' list"),
    ({"data": [{"paragraphs": [{"qas": [qa("b")]}]}]},
     "s.json: data[0].paragraphs[0]: field 'context': missing or empty"),
    ({"data": [{"paragraphs": [para("a"), {"context": "  ", "qas": [qa("b")]}]}]},
     "s.json: data[0].paragraphs[1]: field 'context': missing or empty"),
    ({"data": [{"paragraphs": [para("a", "b")]}, {"paragraphs": [para("c", "a")]}]},
     "s.json: question id 'a': field 'id': duplicate question id"),
    ({"data": [{"paragraphs": [{**para(), "qas": [{**qa("x"), "id": ""}]}]}]},
     "s.json: data[0].paragraphs[0].qas[0]: field 'id': missing or empty"),
    ({"data": [{"paragraphs": [{**para(), "qas": [{**qa("x"), "answers": "The gNB"}]}]}]},
     "s.json: question id 'x': field 'answers': must be a non-empty list for an answerable question"),
    # Wrong types where objects and lists belong are structure errors too, not AttributeError/TypeError.
    ({"data": [5]}, "s.json: data[0]: must be an object with a 'paragraphs' list"),
    ({"data": [{"paragraphs": {"context": "c"}}]}, "s.json: data[0]: field 'paragraphs': must be a list"),
    ({"data": [{"paragraphs": ["The gNB"]}]}, "s.json: data[0].paragraphs[0]: must be an object with 'context' and 'qas'"),
    ({"data": [{"paragraphs": [{**para(), "qas": {"id": "a"}}]}]}, "s.json: data[0].paragraphs[0]: field 'qas': must be a list"),
    ({"data": [{"paragraphs": [{**para(), "qas": ["Who?"]}]}]}, "s.json: data[0].paragraphs[0].qas[0]: must be a JSON object"),
])
def test_squad_structure_errors_name_file_record_and_field(tmp_path, doc, message):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert str(err.value) == f"{tmp_path}/{message}"


CHOICES = [{"label": label, "text": text} for label, text in zip("ABC", ("river", "desert", "ocean"))]


def cqa(qid: str, **change) -> dict:
    return {"id": qid, "question": {"stem": f"Where is {qid}?", "choices": CHOICES}, "answerKey": "B", **change}


@pytest.mark.parametrize("rows, message", [
    ([cqa("a"), cqa("b", question="Where?")],
     "line 2 (id 'b'): field 'question': must be an object with 'stem' and 'choices'"),
    ([cqa("a", question={"choices": CHOICES})], "line 1 (id 'a'): field 'stem': missing"),
    ([cqa("a", question={"stem": "s", "choices": []})], "line 1 (id 'a'): field 'question.choices': must be a non-empty list"),
    ([cqa("a"), cqa("b", answerKey="E")],
     "line 2 (id 'b'): field 'answerKey': 'E' is not one of the choice labels ['A', 'B', 'C']"),
    ([cqa("a", question={"stem": "s", "choices": ["river", "desert"]})],
     "line 1 (id 'a'): field 'question.choices[0]': must be an object with 'label' and 'text'"),
    ([cqa("a"), {k: v for k, v in cqa("b").items() if k != "id"}], "line 2: field 'id': missing or empty"),
    ([cqa("a"), cqa("b"), cqa("a")], "line 3 (id 'a'): field 'id': duplicate of line 1"),
])
def test_cqa_structure_errors_name_file_record_and_field(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "cqa.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert str(err.value) == f"{path}: {message}"


@pytest.mark.parametrize("rows, message", [
    ([{"id": "a", "explanation": {"open-ended": "rivers hold water"}}, {"id": "b", "explanation": "because"}],
     "line 2: field 'explanation.open-ended': missing or not a string"),
    ([{"id": "a", "explanation": {"open-ended": 3}}], "line 1: field 'explanation.open-ended': missing or not a string"),
    ([{"explanation": {"open-ended": "x"}}], "line 1: field 'id': missing or empty"),
    ([{"id": "a", "explanation": {"open-ended": "x"}}, {"id": "a", "explanation": {"open-ended": "y"}}],
     "line 2 (id 'a'): field 'id': duplicate of line 1"),
])
def test_cose_structure_errors_name_file_record_and_field(tmp_path, rows, message):
    data = write_jsonl(tmp_path / "cqa.jsonl", [cqa("a"), cqa("b")])
    cose = write_jsonl(tmp_path / "cose.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(str(data), explanations=str(cose))
    assert str(err.value) == f"{cose}: {message}"


def test_cqa_with_cose_reads_what_is_there(tmp_path):
    data = write_jsonl(tmp_path / "cqa.jsonl", [cqa("a"), cqa("b", answerKey="C")])
    cose = write_jsonl(tmp_path / "cose.jsonl", [{"id": "b", "explanation": {"open-ended": "oceans are wide"}}])
    exs, report = load_examples(str(data), explanations=str(cose))
    assert [(e.id, e.answers, e.choices, e.explanation) for e in exs] == [
        ("a", ("desert",), ("river", "desert", "ocean"), None), ("b", ("ocean",), ("river", "desert", "ocean"), "oceans are wide")]
    assert re.fullmatch(r"2 examples", report.summary())
