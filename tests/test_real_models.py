"""The real bundled models, offline: load, SFT a few steps, generate; derive the 15-layer student."""

import json
from pathlib import Path

import pytest
import torch

from distillqa.config import GenerateConfig, SFTConfig, load_config
from distillqa.generate import run_generate
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train.sft import run_sft

pytestmark = pytest.mark.real_models


@pytest.mark.parametrize("name, vocab, layers, chat", [("smollm2-135m", 49152, 30, True), ("gemma3-270m", 262144, 18, False)])
def test_sft_and_generate_offline(name, vocab, layers, chat, tmp_path):
    tok = load_tokenizer(name)
    assert len(tok) >= vocab and bool(tok.chat_template) == chat
    common = [f"model.name={name}", "data.max_train_examples=8", "data.max_eval_examples=4", "prompt.max_length=256"]
    run = run_sft(load_config(SFTConfig, None, common + [f"output_dir={tmp_path}/sft", "train.max_steps=2",
                                                         "train.batch_size=2", "lora.r=4"]))
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert load_model(str(run)).config.num_hidden_layers == layers
    out = run_generate(load_config(GenerateConfig, None, common[:1] + common[2:] + [
        f"model.name={run}", f"output_dir={tmp_path}/gen", "generation.max_new_tokens=8", "generation.batch_size=4"]))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and sum(bool(r["prediction"]) for r in rows) >= 3


def test_smollm2_student_has_15_layers_and_answers():
    import torch

    from distillqa.config import GenerationConfig
    from distillqa.data import load_examples
    from distillqa.data.prompts import PromptBuilder
    from distillqa.generate import generate_batch

    student, tok = load_model("smollm2-135m@layers=every-other"), load_tokenizer("smollm2-135m@layers=every-other")
    assert student.config.num_hidden_layers == 15 and student.config.vocab_size == 49152
    n_params = sum(p.numel() for p in student.parameters())
    assert 70e6 < n_params < 90e6
    # It answers: batched, KV-cached generation on real questions gives text, the same as without the cache
    # (the pruned layers' cache indices are renumbered).
    builder = PromptBuilder(tok, max_length=256)
    prompts = [builder.encode_prompt(ex, 8) for ex in load_examples("bundled:telecom-sample")[0][:2]]
    answers = generate_batch(student, tok, prompts, GenerationConfig(max_new_tokens=8))
    assert len(answers) == 2 and all(any(ch.isalpha() for ch in a) for a in answers), answers
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        cached = student.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        uncached = student.generate(input_ids=ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, uncached)
    assert tok.decode(cached[0, ids.shape[1]:], skip_special_tokens=True).strip() == answers[0]


@pytest.mark.parametrize("teacher, algorithm", [
    ("smollm2-135m", "vanilla"), ("smollm2-135m", "dskd"), ("gemma3-270m", "dskd-cma"), ("gemma3-270m", "uld")])
def test_distill_real_teacher_into_15_layer_student(teacher, algorithm, tmp_path):
    from distillqa.config import DistillConfig
    from distillqa.train.distill import run_distill

    run = run_distill(load_config(DistillConfig, None, [
        f"teacher.name={teacher}", "student.name=smollm2-135m@layers=every-other", f"kd.algorithm={algorithm}",
        f"output_dir={tmp_path}/kd", "data.max_train_examples=4", "train.max_steps=2", "train.batch_size=2",
        "prompt.max_length=256", "lora.r=4"]))
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(row["kd"] >= 0 and row["loss"] > 0 for row in log)
    assert load_model(str(run)).config.num_hidden_layers == 15


@pytest.mark.parametrize("algorithm", ["dskd-cma", "uld"])
def test_on_policy_across_vocabularies_gemma_teacher_smollm2_student(algorithm, tmp_path):
    """Every step on the student's own samples, re-tokenised for gemma3-270m's 262k vocabulary."""
    from distillqa.config import DistillConfig
    from distillqa.train.distill import run_distill

    run = run_distill(load_config(DistillConfig, None, [
        "teacher.name=gemma3-270m", "student.name=smollm2-135m@layers=angular:22", f"kd.algorithm={algorithm}",
        "kd.lmbda=1", "kd.sample_max_new_tokens=6", f"output_dir={tmp_path}/kd", "data.max_train_examples=4",
        "train.max_steps=2", "train.batch_size=2", "train.log_every=1", "prompt.max_length=256", "lora.r=4"]))
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [row["on_policy"] for row in log] == [1.0, 1.0]
    assert all(row["kd"] >= 0 and row["loss"] > 0 for row in log)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"


def test_experiment_grid_with_real_models(tmp_path):
    """A one-state grid on the real models: the pruned student healed from SmolLM2, vocabularies
    detected from the tokenizers, the cross-vocabulary cell trained, every row answered and
    scored, the report written."""
    from distillqa.experiment.config import ExperimentConfig
    from distillqa.experiment.runner import run_experiment

    cfg = load_config(ExperimentConfig, None, [
        "grid.teachers=[{name: smollm2-135m, algorithms: [vanilla]}, {name: gemma3-270m, algorithms: [uld]}]",
        "grid.teacher_states=[base]", "grid.student_states=[base]", "data.max_train_examples=4",
        "grid.heal.steps=2", "grid.heal.batch_size=2", "grid.heal.eval_examples=2",
        "data.max_eval_examples=4", "distill.train.max_steps=1", "distill.train.batch_size=2",
        "generation.max_new_tokens=4", "evaluate.metrics=rouge_l,token_f1", f"output_dir={tmp_path}/exp"])
    exp = run_experiment(cfg, echo=lambda msg: None)
    plan = json.loads((exp / "plan.json").read_text())
    cells = {r["factors"]["teacher"]: r for r in plan["rows"] if r["kind"] == "cell"}
    assert {t: r["factors"]["vocabulary"] for t, r in cells.items()} == {"smollm2-135m": "same", "gemma3-270m": "different"}
    hyps = json.loads((exp / "results" / "hypotheses.json").read_text())
    assert [(h["name"], h["pairs"]) for h in hyps] == [
        ("vocabulary", [[cells["smollm2-135m"]["name"], cells["gemma3-270m"]["name"]]]),
        ("kd_vs_sft", [[cells[t]["name"], "sft-only_student-base"] for t in ("smollm2-135m", "gemma3-270m")])]
    assert all(r["n"] == 4 for h in hyps for r in h["results"])
    rows = json.loads((exp / "results" / "rows.json").read_text())
    assert len(rows) == 6 and "data:image/png;base64," in (exp / "report.html").read_text()
    # The student base is the healed 26-layer student (the default), its run directory in the model cache.
    student = yaml_model_name(exp / "rows" / "student-base")
    info = json.loads((Path(student) / "run.json").read_text())
    assert info["kind"] == "heal" and len(info["layers"]) == 26 and info["layer_choice"]["method"] == "angular"
    assert load_model(student).config.num_hidden_layers == 26


def yaml_model_name(row_dir: Path) -> str:
    import yaml

    return yaml.safe_load((row_dir / "generate_config.yaml").read_text())["model"]["name"]


LLAMA2 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cqa-teacher-llama2"
CQA = LLAMA2.parent / "cqa"


@pytest.mark.skipif(not (CQA / "dev_rand_split.jsonl").is_file(), reason="shared CommonsenseQA not present")
def test_real_teacher_writes_rationales_revisions_and_counterfactuals(tmp_path):
    from distillqa.rationales.config import RationaleGenerateConfig
    from distillqa.rationales.data import read_rationales
    from distillqa.rationales.generate import run_rationale_generate

    out = run_rationale_generate(load_config(RationaleGenerateConfig, None, [
        "teacher.local_model=smollm2-135m", "teacher.max_tokens=24", f"teacher.cache={tmp_path}/c.sqlite",
        f"data.source={CQA / 'dev_rand_split.jsonl'}", "data.format=cqa", "limit=2", "revisions=1",
        f"output={tmp_path}/t.jsonl"]))
    rows = read_rationales(out)
    assert len(rows) == 2 and all(len(r.counterfactuals) == 5 for r in rows)
    assert sum(bool(r.rationale) for r in rows) + sum(bool(r.revised_rationale) for r in rows) >= 3


@pytest.mark.skipif(not (LLAMA2 / "train.jsonl").is_file(), reason="shared Llama-2 teacher outputs not present")
def test_real_student_trains_and_answers_from_llama2_rationales(tmp_path):
    from distillqa.rationales.config import RationaleExperimentConfig
    from distillqa.rationales.experiment import run_rationale_experiment

    exp = run_rationale_experiment(load_config(RationaleExperimentConfig, None, [
        f"train_file={LLAMA2 / 'train.jsonl'}", f"eval_file={LLAMA2 / 'test.jsonl'}", "max_train_examples=4",
        "max_eval_examples=4", "methods=[mt, cf]", "rationale_types=[revised]", "seeds=[0]", "explain_examples=1",
        "train.max_steps=1", "train.batch_size=2", "generation.max_new_tokens=24", "lora.r=4",
        f"output_dir={tmp_path}/exp"]), echo=lambda msg: None)
    runs = json.loads((exp / "results" / "runs.json").read_text())
    assert [r["cell"] for r in runs] == ["mt_revised_seed0", "cf_revised_seed0"] and all(r["n"] == 4 for r in runs)
    from safetensors.torch import load_file

    for cell in ("mt_revised_seed0", "cf_revised_seed0"):  # the step changed the student: LoRA B starts at zero
        adapter = load_file(str(exp / "cells" / cell / "final" / "adapter" / "adapter_model.safetensors"))
        assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k), cell
        preds = (exp / "answers" / cell / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == 4
    assert "no residual degrees of freedom" in (exp / "report.md").read_text()


def test_kd_from_a_teacher_cache_of_the_real_teacher(tmp_path, monkeypatch):
    """SmolLM2 cached once (the default: top-8, the tail's mass and 8 draws from it), then the 15-layer student
    distilled from the cache without the teacher."""
    import distillqa.train.distill as distill
    from distillqa.config import DistillConfig, TeacherCacheConfig
    from distillqa.train.teacher_cache import TeacherCache, run_teacher_cache

    common = ["data.max_train_examples=4", "prompt.max_length=256"]
    cache = run_teacher_cache(load_config(TeacherCacheConfig, None, common + [f"output_dir={tmp_path}/cache"]))
    manifest = TeacherCache(cache).manifest
    assert manifest["vocab_size"] == 49152 and (manifest["k"], manifest["tail_samples"], manifest["examples"]) == (8, 8, 4)
    row = TeacherCache(cache)[0]
    assert row["ids"].shape[1] == 16 and torch.allclose(row["weight"].sum(-1), torch.ones(len(row["ids"])), atol=1e-2)
    real, loaded = distill.load_model, []
    monkeypatch.setattr(distill, "load_model", lambda name, *a: loaded.append(name) or real(name, *a))
    run = distill.run_distill(load_config(DistillConfig, None, common + [
        "student.name=smollm2-135m@layers=every-other", f"kd.teacher_cache={cache}", f"output_dir={tmp_path}/kd",
        "train.max_steps=1", "train.batch_size=2", "lora.r=4"]))
    assert loaded == ["smollm2-135m@layers=every-other"]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
