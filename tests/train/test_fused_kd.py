"""The fused KD step (`losses/fused.py`, taken by `VanillaKD`) against autograd through the formula
loss = w_ce CE + sum_j w_j mean D_j(p || q), computed unchunked: same loss, same gradient on every student weight;
and DSKD's fused sides against its autograd path."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from distillqa.config import KDConfig, LoraConfig
from distillqa.models.lora import apply_lora
from distillqa.train import dskd
from distillqa.train.distill import make_loss_terms
from distillqa.train.kd import ULD, VanillaKD
from distillqa.train.losses import DIVERGENCES, LossTerms, fused
from distillqa.train.objectives import answer_states, project_to_vocab

KD_RATE = 0.3


def tiny_llama(seed: int, tied: bool, vocab: int = 50, softcap: float | None = None, hidden: int = 16) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=tied, initializer_range=0.5)
    model = LlamaForCausalLM(cfg)
    model.config.final_logit_softcapping = softcap  # read by `causal_lm_parts`, as for Gemma 2
    return model


def padded_batch(vocab: int, length: int, answers: list[tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """Rows of `length` random tokens, row i's answer at positions answers[i] = (start, end), padding after it,
    -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(answers), length), generator=g)
    labels, mask = torch.full_like(ids, -100), torch.ones_like(ids)
    for row, (start, end) in enumerate(answers):
        labels[row, start:end], mask[row, end:] = ids[row, start:end], 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_with_prompts_and_padding() -> dict[str, torch.Tensor]:
    """Three rows of 12 tokens: answers of 5, 3 and 0 tokens after the prompt."""
    return padded_batch(50, 12, [(6, 11), (4, 7), (12, 12)], seed=0)


def terms(name: str, temperature: float = 1.0) -> LossTerms:
    return make_loss_terms(KDConfig(divergence=name, temperature=temperature, kd_rate=KD_RATE))


def reference_loss(student, teacher, batch, terms: LossTerms):
    """Autograd through the formula, all answer tokens at once (`VanillaKD` before the fused step, unchunked)."""
    hidden, targets = answer_states(student, batch)
    with torch.no_grad():
        teacher_logits = project_to_vocab(teacher, answer_states(teacher, batch)[0])
    logits = project_to_vocab(student, hidden)
    v = min(logits.shape[-1], teacher_logits.shape[-1])
    kd = sum(w * d(logits[:, :v], teacher_logits[:, :v]).mean() for w, d in zip(terms.weights, terms.divergences))
    return terms.ce_weight * F.cross_entropy(logits, targets) + kd


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


@pytest.fixture(params=[None, 3], ids=["chunk-at-once", "blocks-of-3"])
def block(request, monkeypatch):
    """Rows per `chunk_loss` call: a chunk's at once (the tiny vocabularies' CPU block), or 3, so that the blocks cut
    a whole batch (chunk None) unevenly."""
    if request.param:
        monkeypatch.setattr(fused, "block_rows", lambda device, vocabulary, chunk_rows: request.param)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_fused_step_equals_autograd_through_the_formula(name, temperature, chunk, tied, block):
    student, teacher = tiny_llama(0, tied), tiny_llama(1, tied)
    loss = terms(name, temperature)
    batch = batch_with_prompts_and_padding()
    objective = VanillaKD(teacher, loss, chunk)
    got = loss_and_grads(student, lambda: objective(student, batch)[0])
    want = loss_and_grads(student, lambda: reference_loss(student, teacher, batch, loss))
    assert_same(got, want)
    assert "lm_head.weight" in got[1] or tied  # an untied head trains through the fused step's weight gradient


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl"])
def test_fused_step_with_softcapped_logits_and_a_padded_teacher_vocabulary(name, block):
    student, teacher = tiny_llama(0, tied=False, softcap=3.0), tiny_llama(1, tied=True, vocab=56, softcap=3.0)
    loss = terms(name, 2.0)
    batch = batch_with_prompts_and_padding()
    objective = VanillaKD(teacher, loss, 3)
    assert_same(loss_and_grads(student, lambda: objective(student, batch)[0]),
                loss_and_grads(student, lambda: reference_loss(student, teacher, batch, loss)))


LIST = [{"name": "ce", "weight": 0.2}, {"name": "forward_kl", "weight": 0.5, "temperature": 2.0},
        {"name": "skewed_reverse_kl", "weight": 0.1, "skew": 0.3}, {"name": "tvd", "weight": 0.2}]


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_list_of_terms_with_their_own_temperatures_equals_the_weighted_sum(chunk):
    student, teacher = tiny_llama(0, tied=False), tiny_llama(1, tied=False)
    loss = make_loss_terms(KDConfig(losses=LIST))
    assert [d.temperature for d in loss.divergences] == [2.0, 1.0, 1.0] and loss.divergences[1].skew == 0.3
    batch = batch_with_prompts_and_padding()
    objective = VanillaKD(teacher, loss, chunk)
    assert_same(loss_and_grads(student, lambda: objective(student, batch)[0]),
                loss_and_grads(student, lambda: reference_loss(student, teacher, batch, loss)))
    logs = objective(student, batch)[1]
    assert set(logs) == {"ce", "kd", "kd_forward_kl", "kd_skewed_reverse_kl", "kd_tvd"}
    weighted = (0.5 * logs["kd_forward_kl"] + 0.1 * logs["kd_skewed_reverse_kl"] + 0.2 * logs["kd_tvd"]) / 0.8
    assert logs["kd"] == pytest.approx(weighted)


def test_the_shorthand_keys_are_the_two_term_list():
    short = make_loss_terms(KDConfig(divergence="generalized_jsd", beta=0.3, kd_rate=0.7, temperature=2.0))
    listed = make_loss_terms(KDConfig(losses=[{"name": "ce", "weight": 0.3},
                                              {"name": "generalized_jsd", "weight": 0.7, "beta": 0.3, "temperature": 2.0}]))
    for built in (short, listed):
        assert built.ce_weight == pytest.approx(0.3) and built.weights == [pytest.approx(0.7)]
        assert (built.divergences[0].beta, built.divergences[0].temperature) == (0.3, 2.0)


def test_a_head_with_an_adapter_takes_the_autograd_path_with_the_same_result():
    student = apply_lora(tiny_llama(0, tied=False), LoraConfig(target_modules=["q_proj", "lm_head"], dropout=0.0))
    torch.nn.init.normal_(student.base_model.model.lm_head.lora_B["default"].weight)  # a head the fused step cannot see
    teacher, batch = tiny_llama(1, tied=False), batch_with_prompts_and_padding()
    for loss in (terms("forward_kl"), make_loss_terms(KDConfig(losses=LIST))):
        objective = VanillaKD(teacher, loss, 2)
        assert_same(loss_and_grads(student, lambda: objective(student, batch)[0]),
                    loss_and_grads(student, lambda: reference_loss(student, teacher, batch, loss)))


def test_a_batch_without_answer_tokens_gives_zero_loss_and_zero_gradients():
    student, teacher = tiny_llama(0, tied=True), tiny_llama(1, tied=True)
    batch = {**batch_with_prompts_and_padding()}
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss, grads = loss_and_grads(student, lambda: VanillaKD(teacher, terms("forward_kl"), 2)(student, batch)[0])
    assert loss.item() == 0 and all(g.abs().max() == 0 for g in grads.values())


def test_kd_rate_zero_is_cross_entropy_alone_with_the_divergence_logged():
    student, teacher, batch = tiny_llama(0, tied=True), tiny_llama(1, tied=True), batch_with_prompts_and_padding()
    loss, logs = VanillaKD(teacher, make_loss_terms(KDConfig(kd_rate=0.0)), 2)(student, batch)
    assert loss.item() == pytest.approx(logs["ce"]) and logs["kd"] > 0


def cma_batch(teacher_answers=((5, 9), (3, 5), (10, 10))) -> dict[str, torch.Tensor]:
    """The student's rows of `batch_with_prompts_and_padding` (answers of 5, 3 and 0 tokens), and the teacher's own:
    10 tokens of a 70-token vocabulary, answers at `teacher_answers` (by default 4, 2 and 0 tokens)."""
    teacher = padded_batch(70, 10, list(teacher_answers), seed=1)
    return {**batch_with_prompts_and_padding(), **{f"teacher_{k}": v for k, v in teacher.items()}}


def with_some_targets_predicted(objective, student, batch):
    """The batch with every other student answer target replaced by t2s's prediction there, so that CMA's
    KD_t2s (counted only where argmax t2s = y) is neither all on nor all off."""
    scores, _, valid_s, _, _, values_t = objective.align(student, batch)
    t2s = torch.softmax(scores, -1) @ objective.t2s(values_t)
    predicted = dskd.student_space_logits(student, t2s[valid_s]).argmax(-1)
    labels = batch["labels"].clone()
    targets = labels[:, 1:]
    kept = targets[targets != -100]
    kept[::2] = predicted[::2]
    targets[targets != -100] = kept
    return {**batch, "labels": labels}


@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("algorithm", ["dskd", "dskd-cma"])
def test_fused_dskd_equals_its_autograd_path(algorithm, chunk, tied, softcap, block, monkeypatch):
    """Loss, every logged part, and the gradients of the student and of the projectors (and CMA's query)."""
    cma = algorithm == "dskd-cma"
    student = tiny_llama(0, tied, softcap=softcap)
    teacher = tiny_llama(1, tied, vocab=70 if cma else 50, softcap=softcap, hidden=24)
    loss_terms = make_loss_terms(KDConfig(losses=LIST))
    torch.manual_seed(2)
    objective = (dskd.DSKDCrossModelAttention if cma else dskd.DSKD)(teacher, student, loss_terms, 2.0, chunk)
    batch = with_some_targets_predicted(objective, student, cma_batch()) if cma else batch_with_prompts_and_padding()

    def run():
        student.zero_grad(set_to_none=True)
        objective.zero_grad(set_to_none=True)
        loss, logs = objective(student, batch)
        loss.backward()
        params = [*student.named_parameters(), *objective.named_parameters()]
        return loss.detach(), logs, {n: p.grad.clone() for n, p in params if p.grad is not None}

    fused = run()
    monkeypatch.setattr(dskd, "linear_head", lambda model: None)  # the autograd path
    autograd = run()
    assert_same(fused[::2], autograd[::2])
    assert fused[1].keys() == autograd[1].keys()
    for name in autograd[1]:
        assert fused[1][name] == pytest.approx(autograd[1][name], rel=1e-5, abs=1e-6), name
    assert {"t2s.weight", "s2t.weight"} <= fused[2].keys() and ("query.weight" in fused[2]) == cma
    if cma:
        assert 0 < fused[1]["t2s_acc"] < 1 and fused[1]["t2s_kd"] > 0


@pytest.mark.parametrize("teacher_answers", [((5, 9), (3, 5), (10, 10)), ((2, 9), (1, 9), (10, 10))],
                         ids=["teacher-shorter", "teacher-longer"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_fused_uld_equals_its_autograd_path(chunk, softcap, teacher_answers, block, monkeypatch):
    """CE over all the student's answer tokens, ULD over the pairs only (i-th with i-th, up to the shorter answer)."""
    student, teacher = tiny_llama(0, False, softcap=softcap), tiny_llama(1, True, vocab=70, softcap=softcap, hidden=24)
    loss_terms = make_loss_terms(KDConfig(losses=[{"name": "ce", "weight": 0.4}, {"name": "uld", "weight": 0.6, "temperature": 2.0}]))
    objective, batch = ULD(teacher, loss_terms, chunk), cma_batch(teacher_answers)
    fused = loss_and_grads(student, lambda: objective(student, batch)[0])
    fused_logs = objective(student, batch)[1]
    monkeypatch.setattr("distillqa.train.kd.linear_head", lambda model: None)  # the autograd path
    assert_same(fused, loss_and_grads(student, lambda: objective(student, batch)[0]))
    for name, value in objective(student, batch)[1].items():
        assert fused_logs[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_chunks_of_a_wider_vocabulary_hold_proportionally_fewer_rows(monkeypatch):
    assert fused.rows_per_chunk(128, 49152) == 128 and fused.rows_per_chunk(128, 262144) == 32
    assert fused.rows_per_chunk(None, 262144) is None and fused.rows_per_chunk(2, 10**6) == 1
    monkeypatch.setattr(fused, "WIDE_VOCABULARY", 50)  # so that the tiny teacher's 70 tokens count as wide
    seen, original = [], fused.chunk_slices
    monkeypatch.setattr(fused, "chunk_slices", lambda n, chunk, device: seen.append(chunk) or original(n, chunk, device))
    student, teacher = tiny_llama(0, False), tiny_llama(1, True, vocab=70, hidden=24)
    ULD(teacher, make_loss_terms(KDConfig(divergence="uld")), 4)(student, cma_batch())  # the teacher's logits are 70 wide
    VanillaKD(tiny_llama(1, True), terms("forward_kl"), 4)(student, batch_with_prompts_and_padding())  # 50 wide
    assert seen == [2, 4]
