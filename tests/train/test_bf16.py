"""bf16: every objective computes in bf16 the loss it computes in fp32 (to bf16's precision), its
gradients reach the student, and DSKD projectors keep fp32 weights whatever the models' dtype."""

import json

import pytest
import torch

from distillqa.config import DistillConfig, KDConfig, load_config
from distillqa.data import load_examples
from distillqa.data.prompts import PromptBuilder
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.rationales.data import read_rationales
from distillqa.rationales.tasks import TaskPrompts, WeightedTaskCE, collate_tasks, task_weights, training_items
from distillqa.train.distill import collate_pairs, make_objective, run_distill
from distillqa.train.objectives import SFTObjective
from conftest import write_jsonl

KD = ["vanilla", "dskd", "dskd-cma", "uld"]


def qa_batch(student_name, teacher_name):
    tok_s, tok_t = load_tokenizer(student_name), load_tokenizer(teacher_name)
    exs = load_examples("bundled:telecom-sample")[0][:4]
    items = [(PromptBuilder(tok_s, max_length=160).encode_train(e), PromptBuilder(tok_t, max_length=160).encode_train(e))
             for e in exs]
    return collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id)


def rationale_batch(name, tmp_path, seq2seq):
    tok = load_tokenizer(name)
    rows = [{"id": f"q{i}", "question": f"Where is thing {i}?", "choices": ["river", "cave"], "answer": "river",
             "rationale": f"Thing {i} swims.", "counterfactuals": ["", f"Thing {i} hides in caves."]} for i in range(3)]
    examples = read_rationales(write_jsonl(tmp_path / "r.jsonl", rows))
    weights = task_weights("mt+cf")
    items, _ = training_items(TaskPrompts(tok, "auto", 128, seq2seq=seq2seq), examples, weights, "unrevised", seed=0)
    return WeightedTaskCE(weights), collate_tasks(items, tok.pad_token_id, seq2seq=seq2seq)


def loss_and_grads(objective_name, names, precisions, tmp_path):
    """(loss, student gradients, objective) of one forward and backward, full fine-tuning, models in `precisions`."""
    student_name, teacher_name = names
    student = load_model(student_name, precisions[0]).requires_grad_(True)
    if objective_name.startswith("rationale"):
        objective, batch = rationale_batch(student_name, tmp_path, seq2seq=objective_name == "rationale-t5")
    elif objective_name == "sft":
        objective, batch = SFTObjective(), qa_batch(student_name, student_name)
    else:
        torch.manual_seed(0)  # the same projectors in both precisions
        teacher = load_model(teacher_name, precisions[1])
        objective = make_objective(KDConfig(algorithm=objective_name, chunk_size=5), teacher, student)
        batch = qa_batch(student_name, teacher_name)
    loss, _ = objective(student, batch)
    loss.backward()
    return loss.item(), [p.grad for p in student.parameters()], objective


@pytest.fixture
def model_names(tiny_model, tiny_other_vocab_model, tiny_chat_model, tiny_t5_model):
    def names(objective_name):
        return {"dskd-cma": (tiny_model, tiny_other_vocab_model), "uld": (tiny_model, tiny_other_vocab_model),
                "rationale": (tiny_chat_model, None), "rationale-t5": (tiny_t5_model, None)}.get(objective_name, (tiny_model, tiny_model))
    return names


@pytest.mark.parametrize("objective_name", ["sft", *KD, "rationale", "rationale-t5"])
def test_every_objective_computes_the_fp32_loss_in_bf16(objective_name, model_names, tmp_path):
    names = model_names(objective_name)
    want, _, _ = loss_and_grads(objective_name, names, ("fp32", "fp32"), tmp_path)
    got, grads, objective = loss_and_grads(objective_name, names, ("bf16", "bf16"), tmp_path)
    assert got == pytest.approx(want, rel=2e-2)
    assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.float().abs().sum()) for g in grads) > 0
    for p in objective.parameters():  # projectors: fp32 weights and gradients; the frozen teacher: none
        assert (p.dtype, p.grad.dtype if p.grad is not None else None) in ((torch.float32, torch.float32), (torch.bfloat16, None))


@pytest.mark.parametrize("precisions", [("bf16", "fp32"), ("fp32", "bf16")])
@pytest.mark.parametrize("objective_name", ["dskd", "dskd-cma"])
def test_projectors_join_models_of_different_precision(objective_name, precisions, model_names, tmp_path):
    want, _, _ = loss_and_grads(objective_name, model_names(objective_name), ("fp32", "fp32"), tmp_path)
    got, _, _ = loss_and_grads(objective_name, model_names(objective_name), precisions, tmp_path)
    assert got == pytest.approx(want, rel=2e-2)


def test_bf16_distillation_run_trains_checkpoints_and_saves_fp32_projectors(tiny_model, tiny_other_vocab_model, tmp_path):
    from safetensors.torch import load_file

    cfg = load_config(DistillConfig, None, [
        f"teacher.name={tiny_other_vocab_model}", f"student.name={tiny_model}", f"output_dir={tmp_path / 'r'}",
        "kd.algorithm=dskd-cma", "student.precision=bf16", "teacher.precision=bf16", "data.max_train_examples=8",
        "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=1", "prompt.max_length=160"])
    run = run_distill(cfg)
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    projectors = load_file(str(run / "final" / "projectors.safetensors"))
    assert projectors and all(v.dtype == torch.float32 for v in projectors.values())
