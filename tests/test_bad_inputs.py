"""The bad-input corpus (issue 11): bad data files, configs, models, predictions, run and output
directories, each given to the CLI as a user would.

Every case must end with exit code 2 and one error line that names the file, record and field
(the `expect` substrings), no traceback, and nothing of the user's removed, changed or added:
the case's directory is snapshotted before and compared after. The HTTP cases of `distillqa serve`
are in test_serve.py. Models are the tiny in-process ones of conftest.py (copied where a case
damages one)."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from typer.testing import CliRunner

from distillqa.cli import app

from conftest import write_jsonl

runner = CliRunner()

GOOD = [{"id": f"q{i}", "context": f"Context number {i} about the AMF.", "question": f"What is item {i}?", "answers": [f"item {i}"]}
        for i in range(10)]


@dataclass
class Case:
    name: str
    setup: Callable[[Path, dict], list[str]]  # (case dir, models) -> CLI arguments
    expect: list[str] = field(default_factory=list)  # substrings of the one error line ({d} = case dir)


def data_file(d: Path, name: str, content: bytes | str | list) -> str:
    p = d / name
    if isinstance(content, list):
        write_jsonl(p, content)
    elif isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return str(p)


def gen(d: Path, m: dict, source: str, *extra: str) -> list[str]:
    return ["generate", "--set", f"model.name={m['plain']}", "--set", f"data.source={source}",
            "--set", f"output_dir={d}/out", *extra]


def sft(d: Path, m: dict, source: str, *extra: str) -> list[str]:
    return ["sft", "--set", f"model.name={m['plain']}", "--set", f"data.source={source}", "--set", f"output_dir={d}/run",
            "--set", "train.max_steps=1", *extra]


def user_dir(d: Path, name: str = "mine") -> Path:
    """A directory holding the user's own files, which no command may touch."""
    p = d / name
    (p / "sub").mkdir(parents=True)
    (p / "sub" / "a.txt").write_text("the user's file\n")
    (p / "notes.md").write_text("keep me\n")
    return p


def copy_model(d: Path, m: dict, drop: tuple[str, ...] = (), name: str = "model") -> Path:
    p = d / name
    shutil.copytree(m["plain"], p)
    for f in drop:
        (p / f).unlink()
    return p


def predictions(d: Path, rows: list | bytes | str) -> str:
    (d / "preds").mkdir()
    data_file(d / "preds", "predictions.jsonl", rows)
    return str(d / "preds")


def damaged_experiment(d: Path) -> Path:
    exp = d / "exp"
    exp.mkdir()
    (exp / "experiment.yaml").write_text("preset: quick\n")
    (exp / "plan.json").write_text('{"rows": ')
    return exp


def finished_run(d: Path, name: str = "run", info: dict | str | None = None) -> Path:
    p = d / name
    p.mkdir()
    (p / "config.yaml").write_text("{}\n")
    text = info if isinstance(info, str) else json.dumps(info or {"kind": "sft", "status": "running", "base_model": "x"})
    (p / "run.json").write_text(text)
    return p


PRED = {"id": "a", "prediction": "The AMF", "references": ["AMF"]}
BAD_UTF8 = (json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1]) + "\n").encode() + b'{"id": "q9", "question": "caf\xe9?"}\n'
RATIONALE = {"id": "r1", "question": "Where?", "choices": ["home", "work"], "answer": "home", "rationale": "Because."}

CASES = [
    # --- data files -----------------------------------------------------------------------------
    Case("data-non-utf8-generate", lambda d, m: gen(d, m, data_file(d, "d.jsonl", BAD_UTF8)), ["d.jsonl", "line 3", "UTF-8"]),
    Case("data-non-utf8-sft", lambda d, m: sft(d, m, data_file(d, "d.jsonl", BAD_UTF8)), ["d.jsonl", "line 3", "UTF-8"]),
    Case("data-non-utf8-first-line", lambda d, m: gen(d, m, data_file(d, "d.jsonl", b'{"id": "\xff"}\n')), ["d.jsonl", "line 1", "UTF-8"]),
    Case("data-empty-file", lambda d, m: gen(d, m, data_file(d, "d.jsonl", b"")), ["d.jsonl", "empty"]),
    Case("data-whitespace-only", lambda d, m: sft(d, m, data_file(d, "d.jsonl", "\n \n")), ["d.jsonl", "whitespace"]),
    Case("data-is-a-directory", lambda d, m: gen(d, m, str(user_dir(d, "d.jsonl"))), ["d.jsonl", "is a directory"]),
    Case("data-missing", lambda d, m: gen(d, m, str(d / "nope.jsonl")), ["nope.jsonl", "no such file"]),
    Case("data-unknown-extension", lambda d, m: gen(d, m, data_file(d, "d.txt", GOOD)), ["d.txt", "unknown format"]),
    Case("data-invalid-json", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [GOOD[0], '{"id": "q1", '])), ["d.jsonl", "line 2", "invalid JSON"]),
    Case("data-line-not-object", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [GOOD[0], "[1, 2]"])), ["d.jsonl", "line 2", "JSON object"]),
    Case("data-missing-answers", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [GOOD[0], {"id": "x", "question": "q?"}])),
         ["d.jsonl", "line 2", "id 'x'", "field 'answers'"]),
    Case("data-empty-answers", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [{**GOOD[0], "answers": []}])), ["line 1", "field 'answers'"]),
    Case("data-duplicate-id", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [GOOD[0], GOOD[0]])), ["line 2", "field 'id'", "duplicate"]),
    Case("data-question-not-string", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [{**GOOD[0], "question": 5}])), ["line 1", "field 'question'"]),
    Case("data-metadata-not-object", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [{**GOOD[0], "metadata": [1]}])), ["line 1", "field 'metadata'"]),
    Case("data-choices-not-list", lambda d, m: gen(d, m, data_file(d, "d.jsonl", [{**GOOD[0], "choices": "a"}])), ["line 1", "field 'choices'"]),
    Case("squad-no-data-list", lambda d, m: gen(d, m, data_file(d, "s.json", '{"version": 2}')), ["s.json", "field 'data'"]),
    Case("squad-invalid-json", lambda d, m: gen(d, m, data_file(d, "s.json", '{"data": [\n{]}')), ["s.json", "line 2", "invalid JSON"]),
    Case("squad-non-utf8", lambda d, m: gen(d, m, data_file(d, "s.json", b'{"data": [\n"\xfe"]}')), ["s.json", "line 2", "UTF-8"]),
    Case("squad-bad-offset", lambda d, m: gen(d, m, data_file(d, "s.json", json.dumps({"data": [{"paragraphs": [{"context": "The AMF.", "qas": [
        {"id": "s1", "question": "Who?", "answers": [{"text": "AMF", "answer_start": 0}]}]}]}]})), "--set", "data.on_bad_answer=error"),
         ["s.json", "question id 's1'", "answers[0].answer_start"]),
    Case("cqa-bad-answer-key", lambda d, m: gen(d, m, data_file(d, "c.jsonl", [{"id": "c1", "question": {"stem": "Where?", "choices": [
        {"label": "A", "text": "home"}, {"label": "B", "text": "work"}]}, "answerKey": "E"}])), ["c.jsonl", "id 'c1'", "field 'answerKey'"]),
    Case("generate-empty-test-split", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", "data.split_fractions=[1, 0, 0]"),
         ["d.jsonl", "test split is empty"]),
    Case("data-no-usable-examples", lambda d, m: gen(d, m, data_file(d, "c.jsonl", [{"id": "c1", "question": {"stem": "Where?", "choices": [
        {"label": "A", "text": "home"}]}}])), ["c.jsonl", "no usable examples"]),
    Case("rationales-import-non-utf8", lambda d, m: ["rationales", "import", data_file(d, "r.jsonl", b'{"id": "\xff"}\n'), str(d / "o.jsonl")],
         ["r.jsonl", "line 1", "UTF-8"]),
    Case("rationales-import-bad-answer", lambda d, m: ["rationales", "import", data_file(d, "r.jsonl", [{**RATIONALE, "answer": "moon"}]),
                                                       str(d / "o.jsonl")], ["r.jsonl", "line 1", "field 'answer'"]),
    # --- configs -----------------------------------------------------------------------------------
    Case("config-is-a-directory", lambda d, m: ["sft", str(user_dir(d, "cfg.yaml"))], ["cfg.yaml", "is a directory"]),
    Case("config-missing", lambda d, m: ["generate", str(d / "nope.yaml")], ["nope.yaml", "not found"]),
    Case("config-invalid-yaml", lambda d, m: ["sft", data_file(d, "c.yaml", "train:\n  lr: [1e-4\n")], ["c.yaml", "invalid YAML", "line"]),
    Case("config-not-a-mapping", lambda d, m: ["sft", data_file(d, "c.yaml", "- a\n- b\n")], ["c.yaml", "mapping"]),
    Case("config-non-utf8", lambda d, m: ["sft", data_file(d, "c.yaml", b"train:\n  lr: \xff\n")], ["c.yaml", "UTF-8"]),
    Case("config-unknown-key", lambda d, m: ["sft", data_file(d, "c.yaml", "train:\n  lrate: 1\n")], ["c.yaml", "train.lrate", "unknown key"]),
    Case("config-bad-value", lambda d, m: ["sft", "--set", "train.lr=abc"], ["train.lr"]),
    Case("config-override-no-equals", lambda d, m: ["generate", "--set", "model.name"], ["model.name", "key=value"]),
    Case("config-override-bad-yaml", lambda d, m: ["generate", "--set", "data.split_fractions=[1, 0"], ["data.split_fractions", "YAML"]),
    Case("config-fractions", lambda d, m: ["generate", "--set", "data.split_fractions=[0.5, 0.1, 0.1]"], ["data.split_fractions"]),
    Case("config-unknown-command", lambda d, m: ["config", "bogus"], ["bogus"]),
    Case("prompt-chat-without-template", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", "prompt.template=chat"),
         ["prompt.template", "chat template"]),
    # --- models ------------------------------------------------------------------------------------
    Case("model-only-config", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set",
                                               f"model.name={copy_model(d, m, drop=('model.safetensors', 'tokenizer.json', 'tokenizer_config.json'))}"),
         ["model", "holds no tokenizer files"]),
    Case("model-no-weights", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"model.name={copy_model(d, m, drop=('model.safetensors',))}"),
         ["could not load model", "model"]),
    Case("model-no-tokenizer", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set",
                                                f"model.name={copy_model(d, m, drop=('tokenizer.json', 'tokenizer_config.json'))}"),
         ["tokenizer", "model", "holds no tokenizer files"]),
    Case("model-corrupt-safetensors", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"model.name={corrupt(copy_model(d, m))}"),
         ["could not load model", "model"]),
    Case("model-missing-dir", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"model.name={d}/none"), ["no such model directory"]),
    Case("model-dir-without-config", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"model.name={user_dir(d)}"),
         ["mine", "config.json"]),
    Case("model-unfinished-run", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"model.name={finished_run(d)}"),
         ["run", "not finished"]),
    Case("model-corrupt-run-json", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"model.name={finished_run(d, info='{oops')}"),
         ["run.json"]),
    Case("derive-bad-layer-spec", lambda d, m: ["derive-student", m["plain"], str(d / "s"), "--layers", "0-99"], ["layer spec"]),
    Case("merge-unfinished-run", lambda d, m: ["merge", str(finished_run(d)), str(d / "merged")], ["run", "not finished"]),
    # --- predictions -------------------------------------------------------------------------------
    Case("predictions-empty-file", lambda d, m: ["evaluate", predictions(d, b""), "--metrics", "rouge_l"], ["predictions.jsonl", "empty"]),
    Case("predictions-blank-lines", lambda d, m: ["evaluate", predictions(d, "\n\n"), "--metrics", "rouge_l"], ["predictions.jsonl", "empty"]),
    Case("predictions-invalid-json", lambda d, m: ["evaluate", predictions(d, [PRED, "{bad"]), "--metrics", "rouge_l"],
         ["predictions.jsonl", "line 2", "invalid JSON"]),
    Case("predictions-no-references", lambda d, m: ["evaluate", predictions(d, [{"id": "a", "prediction": "x"}]), "--metrics", "rouge_l"],
         ["predictions.jsonl", "line 1", "field 'references'"]),
    Case("predictions-empty-reference", lambda d, m: ["evaluate", predictions(d, [{**PRED, "references": [" "]}]), "--metrics", "rouge_l"],
         ["line 1", "field 'references'"]),
    Case("predictions-duplicate-id", lambda d, m: ["evaluate", predictions(d, [PRED, PRED]), "--metrics", "rouge_l"],
         ["line 2", "field 'id'", "duplicate"]),
    Case("predictions-prediction-not-string", lambda d, m: ["evaluate", predictions(d, [{**PRED, "prediction": 3}]), "--metrics", "rouge_l"],
         ["line 1", "field 'prediction'"]),
    Case("predictions-non-utf8", lambda d, m: ["evaluate", predictions(d, json.dumps(PRED).encode() + b"\n\xff\n"), "--metrics", "rouge_l"],
         ["predictions.jsonl", "line 2", "UTF-8"]),
    Case("predictions-missing", lambda d, m: ["evaluate", str(user_dir(d)), "--metrics", "rouge_l"], ["predictions.jsonl", "no such"]),
    Case("predictions-unknown-metric", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "rouge_x"], ["rouge_x"]),
    Case("predictions-judge-without-judge", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "faithfulness"], ["judge"]),
    Case("predictions-unset-key-variable", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "faithfulness", "--judge-url",
                                                         "http://127.0.0.1:9/v1", "--judge-model", "j", "--set", "judge.api_key_env=NOPE_KEY_11"],
         ["judge.api_key_env", "NOPE_KEY_11"]),
    Case("predictions-foreign-summary", lambda d, m: ["evaluate", predictions_with(d, "summary.json", '{"mine": 1}'), "--metrics", "rouge_l"],
         ["summary.json", "not written by distillqa evaluate"]),
    Case("predictions-foreign-scores", lambda d, m: ["evaluate", predictions_with(d, "scores.jsonl", "my,csv\n"), "--metrics", "rouge_l"],
         ["scores.jsonl", "not written by distillqa evaluate"]),
    # --- multiple choice and whole-file test sets (issue 15) ----------------------------------------
    Case("generate-unknown-split", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", "split=everything"), ["split"]),
    Case("loglikelihood-without-choices", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", "split=all", "--set",
                                                            "mcq.method=loglikelihood"), ["d.jsonl", "id 'q0'", "field 'choices'"]),
    Case("predictions-acc-without-logprobs", lambda d, m: ["evaluate", predictions(d, [{**PRED, "choices": ["AMF", "SMF"]}]),
                                                           "--metrics", "acc"], ["predictions.jsonl", "id 'a'", "field 'choice_logprobs'"]),
    Case("predictions-choice-accuracy-without-choices", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "choice_accuracy"],
         ["predictions.jsonl", "id 'a'", "field 'choices'", "choice_accuracy"]),
    Case("predictions-logprobs-wrong-length", lambda d, m: ["evaluate", predictions(d, [{**PRED, "choices": ["AMF", "SMF"],
                                                                                       "choice_logprobs": [-1.0]}]), "--metrics", "rouge_l"],
         ["predictions.jsonl", "line 1", "field 'choice_logprobs'"]),
    Case("predictions-no-correct-choice", lambda d, m: ["evaluate", predictions(d, [{**PRED, "choices": ["SMF", "UPF"]}]), "--metrics",
                                                        "choice_accuracy"], ["id 'a'", "field 'references'", "none of the choices"]),
    Case("held-out-acc-without-loglikelihood", lambda d, m: ["experiment", "run", "--set", f"output_dir={d}/exp", "--set",
                                                              "held_out=[{name: b, data: {source: b.jsonl}, metrics: acc}]"],
         ["held_out.0", "acc", "mcq.method=loglikelihood"]),
    Case("held-out-duplicate-names", lambda d, m: ["experiment", "run", "--set", f"output_dir={d}/exp", "--set",
                                                    "held_out=[{name: b, data: {source: b.jsonl}}, {name: b, data: {source: c.jsonl}}]"],
         ["held_out", "unique"]),
    Case("harness-export-without-choices", lambda d, m: ["harness", "export", data_file(d, "d.jsonl", GOOD), str(d / "task"), "--name", "t"],
         ["d.jsonl", "id 'q0'", "field 'choices'"]),
    Case("harness-export-bad-name", lambda d, m: ["harness", "export", data_file(d, "d.jsonl", GOOD), str(d / "task"), "--name", "a b"],
         ["--name", "a b"]),
    Case("harness-export-into-user-dir", lambda d, m: ["harness", "export", data_file(d, "d.jsonl", GOOD), str(user_dir(d)), "--name", "t"],
         ["mine", "--overwrite"]),
    Case("judge-calibrate-one-repeat", lambda d, m: ["judge-calibrate", predictions(d, [PRED]), "--out", str(d / "cal"), "--judge-url",
                                                      "http://127.0.0.1:9/v1", "--judge-model", "j", "--repeats", "1"], ["--repeats"]),
    Case("judge-calibrate-without-judge", lambda d, m: ["judge-calibrate", predictions(d, [PRED]), "--out", str(d / "cal")], ["judge"]),
    Case("judge-calibrate-not-judge-metrics", lambda d, m: ["judge-calibrate", predictions(d, [PRED]), "--out", str(d / "cal"),
                                                             "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "j", "--metrics",
                                                             "rouge_l"], ["--metrics", "rouge_l"]),
    Case("judge-calibrate-into-user-dir", lambda d, m: ["judge-calibrate", predictions(d, [PRED]), "--out", str(user_dir(d)), "--judge-url",
                                                         "http://127.0.0.1:9/v1", "--judge-model", "j"], ["mine", "--overwrite"]),
    # --- output and run directories: nothing the user has is removed, replaced or added to --------
    Case("derive-into-user-dir", lambda d, m: ["derive-student", m["plain"], str(user_dir(d)), "--layers", "0-1"], ["mine", "--overwrite"]),
    Case("derive-overwrite-user-dir", lambda d, m: ["derive-student", m["plain"], str(user_dir(d)), "--layers", "0-1", "--overwrite"],
         ["mine", "not written by distillqa derive-student"]),
    Case("derive-onto-user-file", lambda d, m: ["derive-student", m["plain"], data_file(d, "f.bin", "data"), "--layers", "0-1"], ["f.bin"]),
    Case("merge-into-user-dir", lambda d, m: ["merge", str(finished_run(d)), str(user_dir(d))], ["mine", "--overwrite"]),
    Case("import-into-user-dir", lambda d, m: ["rationales", "import", data_file(d, "r.jsonl", [RATIONALE]), str(user_dir(d))], ["mine"]),
    Case("import-onto-user-file", lambda d, m: ["rationales", "import", data_file(d, "r.jsonl", [RATIONALE]), data_file(d, "o.jsonl", "mine\n")],
         ["o.jsonl", "--overwrite"]),
    Case("import-overwrite-user-file", lambda d, m: ["rationales", "import", data_file(d, "r.jsonl", [RATIONALE]),
                                                     data_file(d, "o.jsonl", [{"id": 1}]), "--overwrite"], ["o.jsonl", "not written by"]),
    Case("generate-into-user-dir", lambda d, m: ["generate", "--set", f"model.name={m['plain']}", "--set",
                                                 f"data.source={data_file(d, 'd.jsonl', GOOD)}", "--set", f"output_dir={user_dir(d)}"],
         ["mine", "not empty"]),
    Case("generate-output-is-file", lambda d, m: ["generate", "--set", f"model.name={m['plain']}", "--set", f"output_dir={data_file(d, 'o', 'x')}"],
         ["o", "not a directory"]),
    Case("sft-into-user-dir", lambda d, m: sft(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"output_dir={user_dir(d)}"), ["mine", "not empty"]),
    Case("sft-resume-never-ran", lambda d, m: sft(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"output_dir={d}/fresh", "--resume"),
         ["fresh", "no run was started"]),
    Case("sft-corrupt-run-json", lambda d, m: sft(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"output_dir={finished_run(d, info='[1]')}"),
         ["run.json"]),
    Case("experiment-into-user-dir", lambda d, m: ["experiment", "run", "--set", f"output_dir={user_dir(d)}"], ["mine", "experiment"]),
    Case("rationales-experiment-into-user-dir", lambda d, m: ["rationales", "experiment", "--set", f"output_dir={user_dir(d)}",
                                                              "--set", "train_file=x.jsonl", "--set", "eval_file=y.jsonl"], ["mine"]),
    Case("experiment-report-not-an-experiment", lambda d, m: ["experiment", "report", str(user_dir(d))], ["mine", "not an experiment"]),
    Case("experiment-report-damaged-plan", lambda d, m: ["experiment", "report", str(damaged_experiment(d))], ["exp", "damaged"]),
    Case("derive-heal-corpus-missing", lambda d, m: ["derive-student", m["plain"], str(d / "s"), "--layers", "0-1",
                                                      "--heal-steps", "2", "--corpus", str(d / "nope.txt")], ["nope.txt", "not a file"]),
    Case("derive-heal-corpus-bad-line", lambda d, m: ["derive-student", m["plain"], str(d / "s"), "--layers", "0-1", "--heal-steps", "2",
                                                       "--corpus", data_file(d, "c.jsonl", [{"text": "ok"}, {"txt": "no"}])],
         ["c.jsonl", "line 2", "field 'text'"]),
    Case("sft-no-example-fits", lambda d, m: sft(d, m, data_file(d, "d.jsonl", [{**g, "question": "word " * 200} for g in GOOD]),
                                                 "--set", "prompt.max_length=64"), ["d.jsonl", "prompt.max_length"]),
    Case("judge-url-not-http", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "faithfulness", "--judge-url", "notaurl",
                                             "--judge-model", "j"], ["judge.url", "notaurl"]),
    Case("embedding-model-not-a-model", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "bertscore_f1", "--set",
                                                      f"embedding_model={data_file(d, 'em.json', '{}')}"], ["embedding_model", "em.json"]),
    Case("embedding-model-missing", lambda d, m: ["evaluate", predictions(d, [PRED]), "--metrics", "cosine", "--set",
                                                  f"embedding_model={d}/nope"], ["embedding_model", "nope"]),
    Case("cache-dir-is-a-file", lambda d, m: ["--cache-dir", data_file(d, "cachefile", "x"), "generate", "--set", "model.name=smollm2-135m",
                                              "--set", f"output_dir={d}/g"], ["cachefile", "Not a directory"]),
    Case("output-dir-under-a-file", lambda d, m: gen(d, m, data_file(d, "d.jsonl", GOOD), "--set", f"output_dir={data_file(d, 'f', 'x')}/sub"),
         ["f/sub", "Not a directory"]),
    Case("teacher-cache-into-user-dir", lambda d, m: ["teacher", "cache", "--set", f"teacher.name={m['plain']}", "--set",
                                                      f"output_dir={user_dir(d)}"], ["mine", "teacher cache"]),
    Case("teacher-cache-k-above-vocabulary", lambda d, m: ["teacher", "cache", "--set", f"teacher.name={m['plain']}", "--set",
                                                           "cache.k=100000", "--set", f"output_dir={d}/c"], ["cache.k", "100000"]),
    Case("distill-from-missing-teacher-cache", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set",
                                                             f"student.name={m['plain']}", "--set", f"kd.teacher_cache={d}/nope",
                                                             "--set", f"output_dir={d}/kd"], ["nope", "manifest.json"]),
    Case("seqkd-store-not-json", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set", f"student.name={m['plain']}",
                                               "--set", "kd.algorithm=seqkd", "--set", f"kd.teacher_answers={data_file(d, 'a.jsonl', 'x')}",
                                               "--set", f"output_dir={d}/kd"], ["a.jsonl", "line 1", "invalid JSON"]),
    Case("seqkd-store-of-other-rows", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set", f"student.name={m['plain']}",
                                                    "--set", "kd.algorithm=seqkd", "--set",
                                                    f"kd.teacher_answers={data_file(d, 'a.jsonl', json.dumps(GOOD[0]))}",
                                                    "--set", f"output_dir={d}/kd"], ["a.jsonl", "line 1", "prediction"]),
    Case("seqkd-teacher-endpoint-unreachable", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set",
                                                             f"student.name={m['plain']}", "--set", "kd.algorithm=seqkd", "--set",
                                                             "kd.teacher_endpoint.url=http://127.0.0.1:9/v1", "--set", f"output_dir={d}/kd"],
         ["kd.teacher_endpoint", "127.0.0.1:9", "cannot be reached"]),
    Case("teacher-endpoint-without-seqkd", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set",
                                                         f"student.name={m['plain']}", "--set", "kd.teacher_endpoint.url=http://x/v1",
                                                         "--set", f"output_dir={d}/kd"], ["kd.teacher_endpoint", "only 'seqkd'"]),
    Case("kd-loss-unknown", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set", f"student.name={m['plain']}",
                                          "--set", "kd.losses=[{name: ce, weight: 0.5}, {name: forward_kll, weight: 0.5}]",
                                          "--set", f"output_dir={d}/kd"], ["kd.losses.1", "unknown loss 'forward_kll'", "forward_kl"]),
    Case("kd-loss-foreign-parameter", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set", f"student.name={m['plain']}",
                                                    "--set", "kd.losses=[{name: reverse_kl, weight: 1, beta: 0.3}]",
                                                    "--set", f"output_dir={d}/kd"], ["kd.losses.0", "no parameter beta"]),
    Case("kd-loss-list-and-kd-rate", lambda d, m: ["distill", "--set", f"teacher.name={m['plain']}", "--set", f"student.name={m['plain']}",
                                                   "--set", "kd.losses=[{name: forward_kl, weight: 1}]", "--set", "kd.kd_rate=0.9",
                                                   "--set", f"output_dir={d}/kd"], ["kd", "shorthand"]),
    Case("grid-uld-with-a-token-divergence", lambda d, m: ["experiment", "run", "--set", f"output_dir={d}/exp", "--set",
                                                           "grid.teachers=[{name: gemma3-270m, algorithms: [uld]}]", "--set",
                                                           "distill.kd.losses=[{name: ce, weight: 0.5}, {name: js, weight: 0.5}]"],
         ["uld", "js"]),
    Case("rationales-generate-onto-user-file", lambda d, m: ["rationales", "generate", "--set", f"output={data_file(d, 'o.jsonl', 'mine')}",
                                                             "--set", f"teacher.local_model={m['chat']}"], ["o.jsonl", "not written by"]),
]


def corrupt(model: Path) -> Path:
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    return model


def predictions_with(d: Path, name: str, text: str) -> str:
    out = predictions(d, [PRED])
    (Path(out) / name).write_text(text)
    return out


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def models(tiny_model, tiny_chat_model) -> dict:
    return {"plain": tiny_model, "chat": tiny_chat_model}


def test_corpus_is_large_enough():
    assert len(CASES) >= 40 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, models, tmp_path, monkeypatch):
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    monkeypatch.setenv("DISTILLQA_CACHE", str(cache))
    monkeypatch.chdir(work)
    args = case.setup(work, models)
    before = snapshot(work)
    result = runner.invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output and len(errors) == 1, result.output
    for part in case.expect:
        assert part in errors[0], f"{part!r} not in {errors[0]!r}"
    assert snapshot(work) == before, "the command removed, changed or added files of the user's"
    assert not (cache / "judge.sqlite").exists()
