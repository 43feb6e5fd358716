"""The fused KD step (`losses/fused.py`, taken by `VanillaKD`) against autograd through the formula
loss = (1 - r) CE + r mean D(p || q), computed unchunked: same loss, same gradient on every student weight."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distillqa.config import KDConfig, LoraConfig
from distillqa.models.lora import apply_lora
from distillqa.train.distill import make_divergence
from distillqa.train.kd import VanillaKD
from distillqa.train.losses import DIVERGENCES
from distillqa.train.objectives import answer_states, project_to_vocab

KD_RATE = 0.3


def tiny_llama(seed: int, tied: bool, vocab: int = 50, softcap: float | None = None) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tied, initializer_range=0.5)
    model = LlamaForCausalLM(cfg)
    model.config.final_logit_softcapping = softcap  # read by `causal_lm_parts`, as for Gemma 2
    return model


def batch_with_prompts_and_padding() -> dict[str, torch.Tensor]:
    """Three rows of 12 tokens: answers of 5, 3 and 0 tokens after the prompt, -100 on prompt and padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    labels = torch.full_like(ids, -100)
    labels[0, 6:11], labels[1, 4:7] = ids[0, 6:11], ids[1, 4:7]
    mask = torch.ones_like(ids)
    mask[0, 11:], mask[1, 7:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(student, teacher, batch, divergence):
    """Autograd through the formula, all answer tokens at once (`VanillaKD` before the fused step, unchunked)."""
    hidden, targets = answer_states(student, batch)
    with torch.no_grad():
        teacher_logits = project_to_vocab(teacher, answer_states(teacher, batch)[0])
    logits = project_to_vocab(student, hidden)
    v = min(logits.shape[-1], teacher_logits.shape[-1])
    kd = divergence(logits[:, :v], teacher_logits[:, :v]).mean()
    return (1 - KD_RATE) * F.cross_entropy(logits, targets) + KD_RATE * kd


def loss_and_grads(student, loss_fn):
    student.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


def assert_same(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys() and len(got[1]) > 0
    for name in want[1]:
        # float32 sums in another order: gradients of ~3 differ by ~2e-6; a wrong term differs by >1e-2
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_fused_step_equals_autograd_through_the_formula(name, temperature, chunk, tied):
    student, teacher = tiny_llama(0, tied), tiny_llama(1, tied)
    divergence = make_divergence(KDConfig(divergence=name, temperature=temperature))
    batch = batch_with_prompts_and_padding()
    objective = VanillaKD(teacher, divergence, KD_RATE, chunk)
    got = loss_and_grads(student, lambda: objective(student, batch)[0])
    want = loss_and_grads(student, lambda: reference_loss(student, teacher, batch, divergence))
    assert_same(got, want)
    assert "lm_head.weight" in got[1] or tied  # an untied head trains through the fused step's weight gradient


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_fused_step_with_softcapped_logits_and_a_padded_teacher_vocabulary(name):
    student, teacher = tiny_llama(0, tied=False, softcap=3.0), tiny_llama(1, tied=True, vocab=56, softcap=3.0)
    divergence = make_divergence(KDConfig(divergence=name, temperature=2.0))
    batch = batch_with_prompts_and_padding()
    objective = VanillaKD(teacher, divergence, KD_RATE, 3)
    assert_same(loss_and_grads(student, lambda: objective(student, batch)[0]),
                loss_and_grads(student, lambda: reference_loss(student, teacher, batch, divergence)))


def test_a_head_with_an_adapter_takes_the_autograd_path_with_the_same_result():
    student = apply_lora(tiny_llama(0, tied=False), LoraConfig(target_modules=["q_proj", "lm_head"], dropout=0.0))
    torch.nn.init.normal_(student.base_model.model.lm_head.lora_B["default"].weight)  # a head the fused step cannot see
    teacher, divergence, batch = tiny_llama(1, tied=False), DIVERGENCES["forward_kl"](), batch_with_prompts_and_padding()
    objective = VanillaKD(teacher, divergence, KD_RATE, 2)
    assert_same(loss_and_grads(student, lambda: objective(student, batch)[0]),
                loss_and_grads(student, lambda: reference_loss(student, teacher, batch, divergence)))


def test_a_batch_without_answer_tokens_gives_zero_loss_and_zero_gradients():
    student, teacher = tiny_llama(0, tied=True), tiny_llama(1, tied=True)
    batch = {**batch_with_prompts_and_padding()}
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, grads = loss_and_grads(student, lambda: VanillaKD(teacher, DIVERGENCES["forward_kl"](), KD_RATE, 2)(student, batch)[0])
    assert loss.item() == 0 and all(g.abs().max() == 0 for g in grads.values())
