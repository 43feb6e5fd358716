"""Multiple choice with the real bundled smollm2-135m, offline (issue 15): log-likelihood scoring
of easy cloze questions must beat chance by far, batched scores must equal one-question batches,
and generated answers to lettered options must map to choices.

Measured: cloze (`mcq.options=hidden`) acc 6/8; with the choices listed inline the 135M model
mostly picks the first one listed (3/8), so the cloze form is what shows it knowing the answers."""

import json

import pytest

from distillqa.config import EvaluateConfig, GenerateConfig, load_config
from distillqa.generate import run_generate
from distillqa.metrics.evaluate import evaluate_predictions

from conftest import write_jsonl

pytestmark = pytest.mark.real_models

# Questions a 135M instruction model knows; the answer sits at every position in turn.
EASY = [
    ("What color is the sky on a clear day?", "blue", ["green", "purple", "brown"]),
    ("How many legs does a dog have?", "four", ["two", "six", "ten"]),
    ("Which animal says meow?", "a cat", ["a cow", "a duck", "a horse"]),
    ("What do bees make?", "honey", ["milk", "silk", "wool"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "glass"]),
    ("Which planet do we live on?", "Earth", ["Mars", "Jupiter", "Venus"]),
    ("What do you use to write on paper?", "a pen", ["a spoon", "a shoe", "a cup"]),
    ("What is the opposite of hot?", "cold", ["loud", "tall", "heavy"]),
]


def easy_file(path):
    rows = []
    for i, (question, answer, wrong) in enumerate(EASY):
        choices = list(wrong)
        choices.insert(i % 4, answer)
        rows.append({"id": f"e{i}", "question": question, "answers": [answer], "choices": choices})
    return str(write_jsonl(path, rows))


def answer(data, out, *extra):
    cfg = load_config(GenerateConfig, None, ["model.name=smollm2-135m", f"data.source={data}", "split=all",
                                             f"output_dir={out}", "prompt.instruction=Answer the question.", *extra])
    run_generate(cfg)
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_smollm2_multiple_choice_by_loglikelihood_and_generation(tmp_path):
    data = easy_file(tmp_path / "easy.jsonl")
    cloze = ["mcq.method=loglikelihood", "mcq.options=hidden"]
    batched = answer(data, tmp_path / "ll", *cloze, "generation.batch_size=8")
    single = answer(data, tmp_path / "ll1", *cloze, "generation.batch_size=1")
    for b, s in zip(batched, single):  # padding changes no score
        assert b["choice_logprobs"] == pytest.approx(s["choice_logprobs"], abs=2e-3)
    summary = evaluate_predictions(tmp_path / "ll", EvaluateConfig(metrics="acc,acc_norm"))
    assert summary["metrics"]["acc"]["mean"] >= 0.6 and summary["metrics"]["acc_norm"]["mean"] >= 0.6  # chance: 0.25

    generated = answer(data, tmp_path / "gen", "mcq.options=lettered", "generation.max_new_tokens=8")
    summary = evaluate_predictions(tmp_path / "gen", EvaluateConfig(metrics="choice_accuracy,unmapped_choice"))
    assert summary["metrics"]["unmapped_choice"]["mean"] <= 0.5, [r["prediction"] for r in generated]
