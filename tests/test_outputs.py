"""Outputs at paths the user names (issue 11): nothing a command did not create is ever removed;
`--overwrite` replaces only a previous output of the same command; empty input is an error, and
questions generate could not ask are counted as missing, never scored."""

from __future__ import annotations

import json
import logging
import os

import pytest
from typer.testing import CliRunner

from distillqa.cli import app
from distillqa.errors import RunDirError
from distillqa.io import OUTPUT_MARKER, atomic_path, claim_output, write_text

from conftest import write_jsonl

runner = CliRunner()


def test_atomic_path_never_removes_a_directory_it_was_not_told_it_owns(tmp_path):
    user = tmp_path / "v"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "a").write_text("x")
    with pytest.raises(RunDirError, match="not empty"):
        write_text(user, "replaced")
    with pytest.raises(RunDirError, match="not empty"):
        with atomic_path(user) as tmp:
            tmp.mkdir()
    assert (user / "sub" / "a").read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["v"]
    # An empty directory holds nothing to lose; one of our own is replaced whole when asked.
    (tmp_path / "empty").mkdir()
    write_text(tmp_path / "empty", "file now")
    assert (tmp_path / "empty").read_text() == "file now"
    with atomic_path(user, replace_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("n")
    assert [p.name for p in user.iterdir()] == ["new"]
    # A directory is never renamed onto a file.
    with pytest.raises(RunDirError, match="not a directory"):
        with atomic_path(tmp_path / "empty") as tmp:
            tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "v"]


def test_claim_output_replaces_only_its_own_unchanged_output(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, "cmd") as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("1")
    assert json.loads((out / OUTPUT_MARKER).read_text())["files"] == ["w.bin"]
    with pytest.raises(RunDirError, match="--overwrite"):
        with claim_output(out, "cmd") as tmp:
            pass
    with pytest.raises(RunDirError, match="not written by distillqa other"):
        with claim_output(out, "other", overwrite=True) as tmp:
            pass
    with claim_output(out, "cmd", overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_text("2")
    assert (out / "w.bin").read_text() == "2"
    (out / "mine.txt").write_text("user")
    with pytest.raises(RunDirError, match=r"did not write \(mine.txt\)"):
        with claim_output(out, "cmd", overwrite=True) as tmp:
            pass
    assert (out / "mine.txt").read_text() == "user" and (out / "w.bin").read_text() == "2"


def test_derive_student_overwrite_replaces_its_own_output_only(tiny_model, tmp_path):
    out = tmp_path / "student"
    assert runner.invoke(app, ["derive-student", tiny_model, str(out), "--layers", "0-1"]).exit_code == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    refused = runner.invoke(app, ["derive-student", tiny_model, str(out), "--layers", "0-2"])
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr
    again = runner.invoke(app, ["derive-student", tiny_model, str(out), "--layers", "0-2", "--overwrite"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_rationales_import_overwrite_recognises_a_previous_import(tmp_path):
    row = {"id": "r1", "question": "Where?", "choices": ["home", "work"], "answer": "home", "rationale": "Because."}
    src, out = write_jsonl(tmp_path / "in.jsonl", [row]), tmp_path / "out.jsonl"
    assert runner.invoke(app, ["rationales", "import", str(src), str(out)]).exit_code == 0
    first = out.read_text()
    assert runner.invoke(app, ["rationales", "import", str(src), str(out)]).exit_code == 2
    write_jsonl(src, [{**row, "rationale": "Since."}])
    assert runner.invoke(app, ["rationales", "import", str(src), str(out), "--overwrite"]).exit_code == 0
    assert out.read_text() != first and "Since." in out.read_text()


def _generate(model: str, source, out, *extra: str):
    return runner.invoke(app, ["generate", "--set", f"model.name={model}", "--set", f"data.source={source}",
                               "--set", f"output_dir={out}", "--set", "generation.max_new_tokens=4", *extra])


def test_a_failed_generate_leaves_nothing_and_a_corrected_rerun_runs(tiny_model, tiny_chat_model, tmp_path):
    rows = [{"id": f"q{i}", "context": f"The AMF handles case {i}.", "question": f"Who handles {i}?", "answers": ["AMF"]}
            for i in range(10)]
    source, out = write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "g"
    failed = _generate(tiny_model, source, out, "--set", "prompt.template=chat")
    assert failed.exit_code == 2 and not out.exists()
    ok = _generate(tiny_chat_model, source, out, "--set", "prompt.template=chat")
    assert ok.exit_code == 0, ok.output
    # Predictions exist now: another config is refused, the same one is a no-op.
    assert _generate(tiny_chat_model, source, out, "--set", "prompt.template=plain").exit_code == 2
    assert _generate(tiny_chat_model, source, out, "--set", "prompt.template=chat").exit_code == 0


def test_prompt_field_is_what_the_model_saw_and_too_long_questions_are_missing(tiny_model, tmp_path, caplog):
    huge = {"id": "huge", "context": "The AMF. " * 50, "question": "Which function? " * 60, "answers": ["AMF"]}
    long_ctx = {"id": "long", "context": "The SMF handles sessions. " * 60, "question": "Who handles sessions?", "answers": ["SMF"]}
    short = [{"id": f"s{i}", "question": f"Short {i}?", "answers": ["x"]} for i in range(3)]
    source, out = write_jsonl(tmp_path / "d.jsonl", [huge, long_ctx, *short]), tmp_path / "g"
    with caplog.at_level(logging.WARNING):
        result = _generate(tiny_model, source, out, "--set", "data.split_fractions=[1, 0, 0]",
                           "--set", "prompt.max_length=128", "--set", "split=train")
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert rows["huge"]["skipped"] is True and rows["huge"]["prediction"] == "" and rows["huge"]["prompt"] == ""
    assert len(rows["long"]["prompt"]) < 1000 < len(long_ctx["context"])  # the truncated prompt, not the whole context
    assert "do not fit prompt.max_length" in caplog.text
    summary = runner.invoke(app, ["evaluate", str(out), "--metrics", "rouge_l,exact_match"])
    assert summary.exit_code == 0, summary.output
    data = json.loads((out / "summary.json").read_text())
    assert data["skipped_too_long"] == 1 and data["metrics"]["rouge_l"]["missing"] == 1
    assert data["metrics"]["rouge_l"]["n"] == len(rows) - 1
    scores = {r["id"]: r for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    assert scores["huge"]["rouge_l"] is None


def test_evaluate_rescores_changed_predictions(tmp_path):
    rows = [{"id": "a", "prediction": "The AMF", "references": ["AMF"]}, {"id": "b", "prediction": "x", "references": ["SMF"]}]
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    assert runner.invoke(app, ["evaluate", str(tmp_path), "--metrics", "exact_match"]).exit_code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["exact_match"]["mean"] == 0.5
    write_jsonl(tmp_path / "predictions.jsonl", [rows[0], {**rows[1], "prediction": "SMF"}])  # same ids, new answers
    assert runner.invoke(app, ["evaluate", str(tmp_path), "--metrics", "exact_match"]).exit_code == 0
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["exact_match"]["mean"] == 1.0


def test_output_dirs_in_use_by_the_same_command_are_resumed(tmp_path):
    from distillqa.io import check_claimed_dir

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / ".lock").write_text(str(os.getpid()))  # a start killed before its config was written
    check_claimed_dir(tmp_path / "exp", "experiment.yaml", "experiment")
    (tmp_path / "exp" / "notes").write_text("x")
    with pytest.raises(RunDirError, match="holds no experiment.yaml"):
        check_claimed_dir(tmp_path / "exp", "experiment.yaml", "experiment")
    (tmp_path / "exp" / "experiment.yaml").write_text("{}")
    check_claimed_dir(tmp_path / "exp", "experiment.yaml", "experiment")
