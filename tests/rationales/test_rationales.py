"""Rationale distillation: records, task sequences and weights, the weighted loss, answer
parsing, the ANOVA, and a whole tiny experiment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distillqa.config import load_config
from distillqa.errors import ConfigError, DataError
from distillqa.rationales.config import RationaleExperimentConfig
from distillqa.rationales.data import read_rationales
from distillqa.rationales.stats import anova, iqr_filter
from distillqa.rationales.tasks import (TASKS, TaskPrompts, WeightedTaskCE, collate_tasks, parse_answer, task_weights,
                                        training_items, wrong_choice)
from conftest import SHARED, write_jsonl

CHOICES = ["river", "desert", "ocean", "forest", "cave"]


def rows(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        gold = CHOICES[i % 5]
        out.append({"id": f"q{i}", "question": f"Where would you find thing number {i}?", "choices": CHOICES, "answer": gold,
                    "rationale": f"Thing {i} lives in a {gold}.", "revised_rationale": f"Only a {gold} holds thing {i}.",
                    "counterfactuals": [f"Thing {i} could be in a {c}." for c in CHOICES]})
    return out


def test_reads_both_layouts(tmp_path):
    ours = read_rationales(write_jsonl(tmp_path / "r.jsonl", rows(3)))
    assert ours[1].answer == "desert" and ours[1].explanation("revised").startswith("Only") and len(ours[1].counterfactuals) == 5
    llama = {"id": "x", "question": "Q?", "choices": CHOICES, "answer": "cave", "few_shot_positive_rationale": "because",
             "few_shot_revision": "revised because",
             **{f"counterfactual_prompt_answer_{k}_rationale": f"for {c}" for k, c in enumerate(CHOICES, 1)}}
    ex = read_rationales(write_jsonl(tmp_path / "l.jsonl", [llama]))[0]
    assert (ex.rationale, ex.revised_rationale, ex.counterfactuals[2]) == ("because", "revised because", "for ocean")
    assert ex.provenance["teacher"] == "Llama-2 (imported)"


@pytest.mark.skipif(not (SHARED / "cqa-teacher-llama2" / "test.jsonl").is_file(), reason="shared data not present")
def test_reads_the_real_llama2_teacher_outputs():
    examples = read_rationales(SHARED / "cqa-teacher-llama2" / "test.jsonl")
    assert len(examples) == 1221 and all(ex.answer in ex.choices and len(ex.counterfactuals) == len(ex.choices) for ex in examples)
    assert 0 < sum(ex.revised_rationale is None for ex in examples) < 10  # the teacher left a few revisions empty


@pytest.mark.parametrize("change, field", [
    ({"answer": "swamp"}, "field 'answer'"), ({"choices": ["one"]}, "field 'choices'"),
    ({"counterfactuals": ["a", "b"]}, "field 'counterfactuals'"), ({"question": ""}, "field 'question'"),
    ({"revised_rationale": 3}, "field 'revised_rationale'")])
def test_bad_rows_name_file_line_and_field(tmp_path, change, field):
    bad = rows(2)
    bad[1].update(change)
    path = write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(DataError, match=rf"bad.jsonl: line 2 \(id 'q1'\): {field}"):
        read_rationales(path)


def test_task_weights_follow_the_formulas():
    assert task_weights("mt", alpha=0.3) == {"answer": 0.3, "explain": 0.7}
    assert task_weights("cf", beta=0.8) == pytest.approx({"factual": 0.8, "counterfactual": 0.2})
    both = task_weights("mt+cf", alpha=0.3, beta=0.8, gamma=0.25)
    assert both == pytest.approx({"answer": 0.075, "explain": 0.175, "factual": 0.6, "counterfactual": 0.15})
    assert sum(both.values()) == pytest.approx(1.0)


def test_questions_missing_a_needed_teacher_text_are_skipped_and_counted(tiny_chat_model, tmp_path):
    from distillqa.models.registry import load_tokenizer

    data = rows(4)
    data[1]["revised_rationale"] = ""
    data[2]["counterfactuals"] = ["" if c != data[2]["answer"] else "x" for c in CHOICES]
    examples = read_rationales(write_jsonl(tmp_path / "r.jsonl", data))
    prompts = TaskPrompts(load_tokenizer(tiny_chat_model), "auto", 256)
    assert training_items(prompts, examples, task_weights("mt"), "revised", 0)[1] == 1
    assert training_items(prompts, examples, task_weights("cf"), "unrevised", 0)[1] == 1
    assert training_items(prompts, examples, task_weights("mt+cf"), "revised", 0)[1] == 2
    assert training_items(prompts, examples, task_weights("mt"), "unrevised", 0)[1] == 0


def test_counterfactual_choice_is_wrong_and_fixed_per_seed(tmp_path):
    examples = read_rationales(write_jsonl(tmp_path / "r.jsonl", rows()))
    picks = [wrong_choice(ex, 0) for ex in examples]
    assert all(ex.choices[k] != ex.answer for ex, k in zip(examples, picks))
    assert picks == [wrong_choice(ex, 0) for ex in examples] and picks != [wrong_choice(ex, 1) for ex in examples]


@pytest.mark.parametrize("text, said", [
    ("The answer is ocean.", "ocean"), ("Fish swim. So the answer is: the Ocean!", "ocean"),
    ("the answer is river. no wait, the answer is cave", "cave"), ("I think it is a river", None),
    ("The answer is mountain.", "mountain")])
def test_parse_answer(text, said):
    assert parse_answer(text, tuple(CHOICES)) == said


def test_weighted_loss_equals_the_weighted_per_task_means(tiny_chat_model, tmp_path):
    from distillqa.models.registry import load_model, load_tokenizer
    from distillqa.train.objectives import SFTObjective

    tok, model = load_tokenizer(tiny_chat_model), load_model(tiny_chat_model)
    prompts = TaskPrompts(tok, "auto", 256)
    examples = read_rationales(write_jsonl(tmp_path / "r.jsonl", rows(4)))
    weights = task_weights("mt+cf", alpha=0.3, beta=0.6, gamma=0.4)
    items, skipped = training_items(prompts, examples, weights, "revised", seed=0)
    assert skipped == 0 and all(len(item) == 4 for item in items)
    batch = collate_tasks(items, tok.pad_token_id)
    loss, logs = WeightedTaskCE(weights)(model, batch)
    expected = 0.0
    for t, w in weights.items():  # each task's mean CE over its own tokens, computed alone
        seqs = [e for item in items for e, task in item if TASKS[task] == t]
        from distillqa.data.prompts import collate_right

        part, _ = SFTObjective()(model, collate_right(seqs, tok.pad_token_id))
        assert logs[t] == pytest.approx(part.item(), rel=1e-4)
        expected += w * part.item()
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    revised = [e for e, task in items[0] if TASKS[task] == "explain"][0]
    assert "Only a river" in tok.decode([i for i, l in zip(revised.input_ids, revised.labels) if l != -100])


def test_iqr_rule_and_anova_find_a_planted_method_effect():
    from scipy import stats as sps

    noise = (-0.01, 0.0, 0.005, 0.01)  # seed-to-seed spread, well inside the 1.5 x IQR fences
    runs = [{"cell": f"{m}-{t}-{s}", "method": m, "rationale_type": t, "accuracy": base + noise[s]}
            for m, base in (("mt", 0.6), ("cf", 0.4), ("mt+cf", 0.6)) for t in ("unrevised", "revised") for s in range(4)]
    runs.append({"cell": "outlier", "method": "mt", "rationale_type": "revised", "accuracy": 0.0})
    kept, dropped = iqr_filter(runs, 1.5)
    assert [r["cell"] for r in dropped] == ["outlier"]
    res = anova(kept)
    table = {r["source"]: r for r in res["anova"]}
    assert table["method"]["p"] < 1e-6 and table["rationale_type"]["p"] > 0.01
    pairs = {(r["group1"], r["group2"]): r["reject"] for r in res["tukey"]["method"]}
    assert pairs[("cf", "mt")] and pairs[("cf", "mt+cf")] and not pairs[("mt", "mt+cf")]
    one_type = [r for r in kept if r["rationale_type"] == "unrevised"]  # one factor: one-way ANOVA, as scipy computes it
    f_one = {r["source"]: r for r in anova(one_type)["anova"]}["method"]["F"]
    groups = [[r["accuracy"] for r in one_type if r["method"] == m] for m in ("mt", "cf", "mt+cf")]
    assert f_one == pytest.approx(sps.f_oneway(*groups).statistic)
    assert "two seeds" in anova([r for r in one_type if r["cell"].endswith("-0")])["skipped"]


def test_tiny_experiment_end_to_end_and_resumes(tiny_chat_model, tmp_path):
    from distillqa.generate import SKIPPED
    from distillqa.rationales.experiment import run_rationale_experiment

    data = write_jsonl(tmp_path / "r.jsonl", rows(12))
    overrides = [f"student.name={tiny_chat_model}", f"train_file={data}", f"eval_file={data}", "max_eval_examples=6",
                 "seeds=[0, 1]", "explain_examples=2", "train.max_steps=2", "train.batch_size=2", "train.lr=0.01",
                 "generation.max_new_tokens=8", f"output_dir={tmp_path}/exp"]
    exp = run_rationale_experiment(load_config(RationaleExperimentConfig, None, overrides), echo=lambda m: None)
    runs = json.loads((exp / "results" / "runs.json").read_text())
    assert len(runs) == 12 and all(r["n"] == 6 for r in runs)
    for r in runs:  # recounted from each cell's answers: no "the answer is", and not a prompt that did not fit
        preds = [json.loads(x) for x in (exp / "answers" / r["cell"] / "predictions.jsonl").read_text().splitlines()]
        assert r["unparseable"] == sum(parse_answer(p["prediction"], tuple(CHOICES)) is None and "note" not in p for p in preds)
    study = [json.loads(x) for x in (exp / "answers" / "mt_revised_seed1" / "study.jsonl").read_text().splitlines()]
    assert len(study) == 2 and {"question", "choices", "predicted", "explanation"} <= set(study[0])
    assert "data:image/png;base64," in (exp / "report.html").read_text()
    # Hand-written answers in one cell, scored again: 2 correct, 1 unparseable, 1 prompt too long, 2 wrong.
    cell = exp / "answers" / "cf_unrevised_seed0"
    preds = [json.loads(x) for x in (cell / "predictions.jsonl").read_text().splitlines()]
    gold = {r["id"]: r["answer"] for r in rows(12)}
    other = {q: CHOICES[(CHOICES.index(g) + 1) % 5] for q, g in gold.items()}
    texts = [lambda q: f"It fits. So the answer is {gold[q]}.", lambda q: f"So the answer is: {other[q]}!",
             lambda q: "I cannot tell.", lambda q: f"THE ANSWER IS {gold[q].upper()}", lambda q: "The answer is mountain.", None]
    for p, text in zip(preds, texts):
        if text is None:
            p.update(prediction="", note=SKIPPED, skipped=True)  # as generate writes a prompt that did not fit
        else:
            p["prediction"] = text(p["id"])
    before = "".join(json.dumps(p) + "\n" for p in preds)
    (cell / "predictions.jsonl").write_text(before)
    (cell / "accuracy.json").unlink()  # an unfinished stage is redone, the rest reused
    run_rationale_experiment(load_config(RationaleExperimentConfig, None, overrides), echo=lambda m: None)
    assert (cell / "predictions.jsonl").read_text() == before
    acc = json.loads((cell / "accuracy.json").read_text())
    assert (acc["n"], acc["correct"], acc["unparseable"], acc["prompt_too_long"]) == (6, 2, 1, 1)
    assert acc["accuracy"] == pytest.approx(2 / 6)
    with pytest.raises(Exception, match="different config"):
        run_rationale_experiment(load_config(RationaleExperimentConfig, None, overrides + ["alpha=0.2"]), echo=lambda m: None)


def test_missing_files_and_counterfactuals_are_clear_errors(tmp_path):
    from distillqa.rationales.experiment import load_data

    with pytest.raises(ConfigError, match="train_file: required"):
        load_data(load_config(RationaleExperimentConfig, None, []))
    plain = [{k: v for k, v in r.items() if k != "counterfactuals"} for r in rows(3)]
    path = write_jsonl(tmp_path / "r.jsonl", plain)
    with pytest.raises(ConfigError, match="need counterfactual rationales, but .*r.jsonl has none"):
        load_data(load_config(RationaleExperimentConfig, None, [f"train_file={path}", f"eval_file={path}"]))


def test_teacher_generation_is_complete_resumable_and_recorded(tiny_chat_model, tmp_path):
    from distillqa.rationales.config import RationaleGenerateConfig
    from distillqa.rationales.generate import run_rationale_generate

    cqa = [{"id": f"c{i}", "question": {"stem": f"Where is thing {i}?", "choices": [
        {"label": l, "text": t} for l, t in zip("ABCDE", CHOICES)]}, "answerKey": "ABCDE"[i % 5]} for i in range(5)]
    source = write_jsonl(tmp_path / "cqa.jsonl", cqa)
    overrides = [f"teacher.local_model={tiny_chat_model}", "teacher.max_tokens=6", f"teacher.cache={tmp_path}/cache.sqlite",
                 f"data.source={source}", "data.format=cqa", "batch_size=2", "revisions=2", f"output={tmp_path}/t.jsonl"]
    cfg = load_config(RationaleGenerateConfig, None, overrides)
    out = run_rationale_generate(cfg)
    examples = read_rationales(out)
    assert [ex.id for ex in examples] == [f"c{i}" for i in range(5)]
    assert all(len(ex.counterfactuals) == 5 and ex.provenance["template_version"] == "v1" for ex in examples)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(len(r["revision_instructions"]) == 2 for r in rows) and rows[0]["provenance"]["teacher"] == tiny_chat_model

    # A killed run: two questions written, then a torn line; the rerun writes the same file.
    partial = tmp_path / "t.partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"id": "c2", "quest')
    expected = out.read_text()
    out.unlink()
    assert run_rationale_generate(cfg).read_text() == expected and not partial.exists()
    with pytest.raises(Exception, match="different config"):  # the output (or a partial one) is never mixed with another config's
        run_rationale_generate(load_config(RationaleGenerateConfig, None, overrides + ["revisions=1"]))
    assert out.read_text() == expected
    with pytest.raises(ConfigError, match="set teacher.local_model"):
        run_rationale_generate(load_config(RationaleGenerateConfig, None, [f"output={tmp_path}/x.jsonl"]))


def test_encoder_decoder_student_loss_and_experiment(tiny_t5_model, tmp_path):
    from distillqa.models.registry import load_model, load_tokenizer
    from distillqa.rationales.experiment import run_rationale_experiment

    tok, model = load_tokenizer(tiny_t5_model), load_model(tiny_t5_model)
    assert model.config.is_encoder_decoder
    prompts = TaskPrompts(tok, "auto", 256, seq2seq=True)
    examples = read_rationales(write_jsonl(tmp_path / "r.jsonl", rows(4)))
    weights = task_weights("mt")
    items, _ = training_items(prompts, examples, weights, "unrevised", seed=0)
    explain = [e for e, t in items[0] if TASKS[t] == "explain"][0]
    assert tok.decode(explain.labels, skip_special_tokens=True).startswith("Thing 0 lives") and explain.labels[-1] == tok.eos_token_id
    batch = collate_tasks(items, tok.pad_token_id, seq2seq=True)
    loss, logs = WeightedTaskCE(weights)(model, batch)
    for t in weights:  # each task's CE equals the model's own seq2seq loss on that task's rows
        rows_t = batch["task"] == TASKS.index(t)
        own = model(input_ids=batch["input_ids"][rows_t], attention_mask=batch["attention_mask"][rows_t],
                    labels=batch["labels"][rows_t]).loss
        assert logs[t] == pytest.approx(own.item(), rel=1e-4)
    assert loss.item() == pytest.approx(0.5 * logs["answer"] + 0.5 * logs["explain"], rel=1e-5)

    exp = run_rationale_experiment(load_config(RationaleExperimentConfig, None, [
        f"student.name={tiny_t5_model}", f"train_file={tmp_path / 'r.jsonl'}", f"eval_file={tmp_path / 'r.jsonl'}",
        "methods=[mt, cf]", "rationale_types=[revised]", "seeds=[0]", "train.max_steps=2", "train.batch_size=2",
        "lora.target_modules=[q, v, wi_0, wo]", "generation.max_new_tokens=6", f"output_dir={tmp_path}/exp"]),
        echo=lambda m: None)
    runs = json.loads((exp / "results" / "runs.json").read_text())
    assert [r["n"] for r in runs] == [4, 4]
    preds = [json.loads(x) for x in (exp / "answers" / "cf_revised_seed0" / "predictions.jsonl").read_text().splitlines()]
    assert any(p["prediction"] for p in preds)  # the decoder's own tokens, not sliced away as a prompt would be
