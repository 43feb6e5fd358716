"""On-policy KD (GKD) on tiny in-process models: lmbda 0 is supervised KD, lmbda 1 trains on the
student's own samples only, the teacher gets them tokenised its own way, a killed run resumes alike."""

import json
import sys

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from distillqa.config import DistillConfig, KDConfig, load_config
from distillqa.data import load_examples
from distillqa.data.prompts import IGNORE, PromptBuilder, collate_pairs
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train import kd, loop, onpolicy
from distillqa.train.distill import make_objective, run_distill
from distillqa.train.onpolicy import OnPolicyKD, training_prompts, until_end
from distillqa.train.run_dir import RunDir


def cfg_for(teacher, student, out, algorithm, *extra):
    return load_config(DistillConfig, None, [
        f"teacher.name={teacher}", f"student.name={student}", f"output_dir={out}", f"kd.algorithm={algorithm}",
        "data.max_train_examples=12", "train.batch_size=2", "train.lr=3e-3", "train.log_every=1",
        "train.checkpoint_every=3", "prompt.max_length=160", "kd.chunk_size=7", "kd.sample_max_new_tokens=6", *extra])


def tiny_batch(student_name, teacher_name, same: bool, n: int = 3) -> dict:
    tok_s, tok_t = load_tokenizer(student_name), load_tokenizer(teacher_name)
    exs = load_examples("bundled:telecom-sample")[0][:n]
    items = [(PromptBuilder(tok_s, max_length=160).encode_train(e), PromptBuilder(tok_t, max_length=160).encode_train(e))
             for e in exs]
    batch = collate_pairs([(s, s) for s, _ in items] if same else items, tok_s.pad_token_id, tok_t.pad_token_id)
    return {**batch, "seed": torch.tensor(loop.batch_seed(0, 0, 0))}


def answers(batch, prefix=""):
    """Each row's answer tokens (those with a label)."""
    labels = batch[prefix + "labels"]
    return [row[row != IGNORE].tolist() for row in labels]


@pytest.mark.parametrize("algorithm, cross", [("vanilla", False), ("dskd-cma", True)])
def test_lmbda_zero_is_the_supervised_objective(tiny_model, tiny_other_vocab_model, monkeypatch, algorithm, cross):
    teacher_name = tiny_other_vocab_model if cross else tiny_model
    batch = tiny_batch(tiny_model, teacher_name, same=not cross)
    monkeypatch.setattr(onpolicy, "generate_ids", lambda *a, **k: pytest.fail("lmbda 0 sampled"))
    results = []
    for lmbda in (None, 0.0):
        student, teacher = load_model(tiny_model), load_model(teacher_name)
        torch.manual_seed(0)  # the same projectors
        objective = make_objective(KDConfig(algorithm=algorithm, divergence="generalized_jsd"), teacher, student)
        if lmbda is not None:
            builder = PromptBuilder(load_tokenizer(teacher_name), max_length=160) if cross else None
            objective = OnPolicyKD(objective, KDConfig(algorithm=algorithm, lmbda=lmbda), load_tokenizer(tiny_model), builder)
        loss, logs = objective(student, batch)
        loss.backward()
        grads = [p.grad for p in [*student.parameters(), *objective.parameters()] if p.grad is not None]
        results.append((loss.detach(), grads, logs))
    (loss_a, grads_a, logs_a), (loss_b, grads_b, logs_b) = results
    assert logs_b == {**logs_a, "on_policy": 0.0}
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lmbda_one_trains_every_step_on_the_students_own_samples(tiny_model, tmp_path, monkeypatch):
    """Every batch the KD objective sees in the run holds, after each training prompt, exactly the
    continuation the student sampled for it (to its end-of-sequence token), for student and teacher."""
    sampled, seen = [], []
    real_generate, real_forward = onpolicy.generate_ids, kd.VanillaKD.forward

    def record_samples(model, tok, prompts, cfg, seed):
        out = real_generate(model, tok, prompts, cfg, seed)
        assert cfg.do_sample and cfg.temperature == 0.7 and cfg.max_new_tokens == 6
        sampled.append((prompts, [until_end(row, tok.eos_token_id)[0] for row in out.tolist()]))
        return out

    def record_batch(self, student, batch):
        seen.append({k: v.clone() for k, v in batch.items()})
        return real_forward(self, student, batch)

    monkeypatch.setattr(onpolicy, "generate_ids", record_samples)
    monkeypatch.setattr(kd.VanillaKD, "forward", record_batch)
    student = f"{tiny_model}@layers=every-other"
    run = run_distill(cfg_for(tiny_model, student, tmp_path / "r", "vanilla", "train.max_steps=3", "kd.lmbda=1", "train.eval_every=0",
                              "kd.sample_temperature=0.7", "kd.divergence=generalized_jsd", "kd.beta=0.3"))
    assert len(sampled) == len(seen) == 3
    for (prompts, samples), batch in zip(sampled, seen):
        assert training_prompts(batch) == prompts and answers(batch) == samples
        for key in ("input_ids", "attention_mask", "labels"):  # one vocabulary: the teacher scores the same tokens
            assert torch.equal(batch[key], batch[f"teacher_{key}"])
    references = [ex.answers[0] for ex in load_examples("bundled:telecom-sample")[0]]
    tok = load_tokenizer(tiny_model)
    assert not any(tok.decode(a, skip_special_tokens=True).strip() in references for _, s in sampled for a in s)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [row["on_policy"] for row in log] == [1.0, 1.0, 1.0]


def test_across_vocabularies_the_teacher_gets_the_sampled_text_in_its_own_tokens(tiny_model, tiny_other_vocab_model):
    batch = tiny_batch(tiny_model, tiny_other_vocab_model, same=False)
    tok_s, tok_t = load_tokenizer(tiny_model), load_tokenizer(tiny_other_vocab_model)
    wrapper = OnPolicyKD(torch.nn.Identity(), KDConfig(algorithm="uld", lmbda=1, sample_max_new_tokens=8), tok_s,
                         PromptBuilder(tok_t, max_length=160))
    rebuilt = wrapper.with_student_answers(load_model(tiny_model), batch, seed=3)
    assert training_prompts(rebuilt) == training_prompts(batch)
    assert training_prompts(rebuilt, "teacher_") == training_prompts(batch, "teacher_")
    for s, t in zip(answers(rebuilt), answers(rebuilt, "teacher_")):
        assert tok_s.decode(s, skip_special_tokens=True).strip() == tok_t.decode(t, skip_special_tokens=True).strip()
        assert (s[-1] == tok_s.eos_token_id) == (t[-1] == tok_t.eos_token_id)  # ended alike, or both cut
        assert s != t  # other ids: a tokenisation of the teacher's own
    assert answers(rebuilt) != answers(batch)


def test_killed_on_policy_run_resumes_to_the_same_weights(tiny_model, tiny_other_vocab_model, tmp_path, monkeypatch):
    """DSKD-CMA across vocabularies, half the batches on-policy: a run killed after step 4 (its newest
    checkpoint is step 3) trains step 4 again on resuming, sampling what the uninterrupted run sampled,
    and ends with its losses, weights and projectors."""
    args = (tiny_other_vocab_model, tiny_model)
    extra = ("train.max_steps=6", "kd.lmbda=0.5", "lora.enabled=false")
    whole = run_distill(cfg_for(*args, tmp_path / "whole", "dskd-cma", *extra))
    real_log = RunDir.log
    monkeypatch.setattr(RunDir, "log", lambda self, row: real_log(self, row) if row["step"] < 4 else sys.exit("killed"))
    with pytest.raises(SystemExit):
        run_distill(cfg_for(*args, tmp_path / "killed", "dskd-cma", *extra))
    monkeypatch.setattr(RunDir, "log", real_log)
    resumed = run_distill(cfg_for(*args, tmp_path / "killed", "dskd-cma", *extra), resume=True)
    log_whole, log_resumed = ([json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()] for r in (whole, resumed))
    assert {row["on_policy"] for row in log_whole} == {0.0, 1.0}  # both kinds of batch
    assert [r["step"] for r in log_resumed] == list(range(1, 7))
    assert [r["loss"] for r in log_resumed] == pytest.approx([r["loss"] for r in log_whole], abs=1e-6)
    for name in ("model/model.safetensors", "projectors.safetensors"):
        a, b = load_file(str(whole / "final" / name)), load_file(str(resumed / "final" / name))
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_on_policy_refuses_what_cannot_sample():
    with pytest.raises(ValidationError, match="seqkd trains on the teacher's answers"):
        KDConfig(algorithm="seqkd", lmbda=0.5)
    with pytest.raises(ValidationError, match="needs the teacher loaded"):
        KDConfig(lmbda=1, teacher_cache="cache")
