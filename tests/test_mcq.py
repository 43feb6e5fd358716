"""Multiple choice (issue 15): `split: all`, log-likelihood scoring (acc, acc_norm) against a hand
computation, the documented rule that maps generated answers to choices, and a tiny model whose
right answers are planted by training on them."""

from __future__ import annotations

import json

import pytest
import torch

from distillqa.config import EvaluateConfig, GenerateConfig, SFTConfig, load_config
from distillqa.generate import run_generate
from distillqa.metrics.choices import map_choice
from distillqa.metrics.evaluate import evaluate_predictions
from distillqa.models.registry import load_model, load_tokenizer

from conftest import write_jsonl

CHOICES = ["the AMF", "the SMF", "the UPF", "the PCF"]
FUNCTIONS = ["terminates NAS signalling", "manages PDU sessions", "forwards user plane packets", "provides policy rules"]
# Eight questions, each answer a different position among the same four choices.
MCQ = [{"id": f"m{i}", "question": f"Which function {FUNCTIONS[i % 4]} (case {i})?", "answers": [CHOICES[i % 4]],
        "choices": CHOICES} for i in range(8)]


@pytest.fixture
def mcq_file(tmp_path):
    return str(write_jsonl(tmp_path / "mcq.jsonl", MCQ))


def generate(model: str, data: str, out, *extra: str):
    cfg = load_config(GenerateConfig, None, [f"model.name={model}", f"data.source={data}", "split=all",
                                             f"output_dir={out}", "generation.max_new_tokens=6", *extra])
    return [json.loads(line) for line in run_generate(cfg).read_text().splitlines()]


def test_split_all_answers_every_question_in_file_order(tiny_model, mcq_file, tmp_path):
    rows = generate(tiny_model, mcq_file, tmp_path / "g")
    assert [r["id"] for r in rows] == [q["id"] for q in MCQ]
    assert all(r["choices"] == CHOICES for r in rows)
    assert "Choices: the AMF; the SMF" in rows[0]["prompt"]


def test_loglikelihood_equals_a_hand_computation(tiny_model, mcq_file, tmp_path):
    rows = generate(tiny_model, mcq_file, tmp_path / "ll", "mcq.method=loglikelihood", "generation.batch_size=3")
    model, tok = load_model(tiny_model), load_tokenizer(tiny_model)
    for row in rows[:3]:
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]  # the decoded prompt holds its BOS
        for choice, logged in zip(row["choices"], row["choice_logprobs"]):
            cont = tok(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + cont])).logits[0].float(), -1)
            by_hand = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(cont))
            assert logged == pytest.approx(by_hand, abs=1e-4)
        assert row["choice_lengths"] == [len(c) for c in CHOICES]
        assert row["prediction"] == CHOICES[max(range(4), key=row["choice_logprobs"].__getitem__)]
    summary = evaluate_predictions(tmp_path / "ll", EvaluateConfig(metrics="acc,acc_norm"))
    by_hand = sum(r["prediction"] in r["references"] for r in rows) / len(rows)
    assert summary["metrics"]["acc"]["mean"] == pytest.approx(by_hand)
    scores = [json.loads(line) for line in (tmp_path / "ll" / "scores.jsonl").read_text().splitlines()]
    norm = [max(range(4), key=lambda k: r["choice_logprobs"][k] / r["choice_lengths"][k]) for r in rows]
    assert [s["acc_norm"] for s in scores] == [float(CHOICES[k] in r["references"]) for k, r in zip(norm, rows)]


def test_lettered_prompt_scores_the_letters(tiny_model, mcq_file, tmp_path):
    rows = generate(tiny_model, mcq_file, tmp_path / "ll", "mcq.method=loglikelihood", "mcq.options=lettered")
    assert "A. the AMF\nB. the SMF\nC. the UPF\nD. the PCF" in rows[0]["prompt"]
    assert rows[0]["choice_lengths"] == [1, 1, 1, 1] and rows[0]["prediction"] in CHOICES
    hidden = generate(tiny_model, mcq_file, tmp_path / "h", "mcq.options=hidden")
    assert "the SMF" not in hidden[0]["prompt"]


@pytest.mark.parametrize("answer, expected", [
    ("B", 1), ("(c)", 2), ("D.", 3), ("2", 1), ("A) the AMF", 0), ("Answer: C", 2), ("The answer is b", 1),
    ("D\n\nQuestion: Which function", 3), ("C \nQuestion: next", 2),         # a label line, then more text
    ("the UPF", 2), ("The PCF.", 3), ("UPF", 2),                           # option text, normalised
    ("It is the session management function, the SMF", 1),                   # best overlap
    ("I don't know", None), ("", None), ("A mobile network", None),          # refusals, empty, "A" as a word
    ("E", None), ("5", None),                                                # labels beyond the choices
])
def test_mapping_rule(answer, expected):
    assert map_choice(answer, CHOICES) == expected


def test_mapping_rule_prefers_a_choice_that_is_a_number():
    assert map_choice("3", ["1", "2", "4", "3"]) == 3  # the choice "3", not the third choice
    assert map_choice("7", ["7", "8"]) == 0
    assert map_choice("the AMF or the SMF", CHOICES) is None  # a tie in overlap maps to nothing


def test_choice_accuracy_and_unmapped_on_generated_answers(tmp_path):
    rows = [{"id": f"g{i}", "prediction": p, "references": [CHOICES[1]], "choices": CHOICES}
            for i, p in enumerate(["B", "the SMF", "the UPF", "no idea", ""])]
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    summary = evaluate_predictions(tmp_path, EvaluateConfig(metrics="choice_accuracy,unmapped_choice"))
    assert summary["metrics"]["choice_accuracy"]["mean"] == pytest.approx(2 / 5)
    assert summary["metrics"]["unmapped_choice"]["mean"] == pytest.approx(2 / 5)  # the refusal and the empty answer


def test_planted_answers_are_found_by_both_methods(tiny_model, mcq_file, tmp_path):
    """Train the tiny model on the questions with their right answers (fully, many steps): both the
    log-likelihood and the generated answers must then name the planted choice every time."""
    from distillqa.train.sft import run_sft

    run = run_sft(load_config(SFTConfig, None, [
        f"model.name={tiny_model}", f"data.source={mcq_file}", f"output_dir={tmp_path}/run", "data.split_fractions=[1, 0, 0]",
        "lora.enabled=false", "train.max_steps=60", "train.batch_size=8", "train.lr=3e-3", "train.warmup_ratio=0",
        "train.checkpoint_every=60", "prompt.max_length=128"]))
    ll = generate(str(run), mcq_file, tmp_path / "ll", "mcq.method=loglikelihood", "prompt.max_length=128")
    summary = evaluate_predictions(tmp_path / "ll", EvaluateConfig(metrics="acc,acc_norm"))
    assert summary["metrics"]["acc"]["mean"] == 1.0 and summary["metrics"]["acc_norm"]["mean"] == 1.0, ll
    gen = generate(str(run), mcq_file, tmp_path / "gen", "prompt.max_length=128")
    summary = evaluate_predictions(tmp_path / "gen", EvaluateConfig(metrics="choice_accuracy,unmapped_choice"))
    assert summary["metrics"]["choice_accuracy"]["mean"] == 1.0, [r["prediction"] for r in gen]
