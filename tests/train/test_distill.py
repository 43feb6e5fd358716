"""Distillation objectives on tiny in-process models: shapes, masking, learning, resume, refusals."""

import json

import pytest
import torch
import torch.nn.functional as F

from distillqa.config import DistillConfig, load_config
from distillqa.data import load_examples
from distillqa.data.prompts import PromptBuilder
from distillqa.errors import ConfigError
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train.distill import collate_pairs, run_distill
from distillqa.train.dskd import DSKDCrossModelAttention
from distillqa.train.kd import pack_rows
from distillqa.train.losses import ForwardKL, LossTerms
from distillqa.train.losses.uld import ULDDistance

from conftest import serving


def cfg_for(teacher, student, out, algorithm, *extra):
    return load_config(DistillConfig, None, [
        f"teacher.name={teacher}", f"student.name={student}", f"output_dir={out}", f"kd.algorithm={algorithm}",
        "data.max_train_examples=24", "train.batch_size=4", "train.lr=3e-3", "train.log_every=1",
        "train.checkpoint_every=3", "prompt.max_length=160", "kd.chunk_size=7", *extra])


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]


def answer_logits(model, batch, prefix=""):
    """Per example, the logits at the positions that predict answer tokens: a list of [A_i, V]."""
    with torch.no_grad():
        logits = model(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).logits
    keep = batch[prefix + "labels"][:, 1:] != -100
    return [logits[i, :-1][keep[i]].float() for i in range(len(keep))]


def gap_to_teacher(cfg, student_name, algorithm):
    """How far the student's answer-token distributions are from the teacher's on training
    questions, measured here from the two models' own logits: forward KL(teacher || student)
    for same-vocabulary models; for different vocabularies the L1 distance between the sorted
    probability vectors of the i-th answer tokens (the only comparison that needs no token map)."""
    from distillqa.data import load_splits

    tok_t, tok_s = load_tokenizer(cfg.teacher.name), load_tokenizer(cfg.student.name)
    exs = load_splits(cfg.data)[0]["train"][:8]
    items = [(PromptBuilder(tok_s, max_length=160).encode_train(e), PromptBuilder(tok_t, max_length=160).encode_train(e))
             for e in exs]
    batch = collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id)
    student, teacher = answer_logits(load_model(student_name), batch), answer_logits(load_model(cfg.teacher.name), batch, "teacher_")
    gaps = []
    for s, t in zip(student, teacher):
        if algorithm == "vanilla":
            p_t = torch.softmax(t, -1)
            gaps.append((p_t * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1))).sum(-1))
        else:
            n = min(len(s), len(t))
            q = torch.softmax(s[:n], -1).sort(-1, descending=True).values
            p = torch.softmax(t[:n], -1).sort(-1, descending=True).values
            width = max(p.shape[-1], q.shape[-1])
            gaps.append((F.pad(p, (0, width - p.shape[-1])) - F.pad(q, (0, width - q.shape[-1]))).abs().sum(-1))
    return torch.cat(gaps).mean().item()


@pytest.mark.parametrize("algorithm, cross", [("vanilla", False), ("dskd", False), ("dskd-cma", True), ("uld", True)])
def test_the_kd_term_alone_trains_the_student(tiny_model, tiny_other_vocab_model, tmp_path, algorithm, cross):
    """kd_rate = 1: no cross-entropy of the student's own, so whatever is learnt is the KD term's."""
    teacher, student = (tiny_other_vocab_model, tiny_model) if cross else (tiny_model, f"{tiny_model}@layers=every-other")
    cfg = cfg_for(teacher, student, tmp_path / "r", algorithm, "train.max_steps=24", "lora.enabled=false", "kd.kd_rate=1.0")
    run = run_distill(cfg)
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    got = [r["loss"] for r in rows]
    assert all(r["loss"] == pytest.approx(r["kd"], rel=1e-5) for r in rows)  # the loss is the KD term alone
    assert sum(got[-4:]) / 4 < 0.95 * sum(got[:4]) / 4
    assert (run / "final" / "model").is_dir()
    if algorithm in ("vanilla", "uld"):  # the student's own distribution moved toward the teacher's
        before, after = gap_to_teacher(cfg, student, algorithm), gap_to_teacher(cfg, str(run), algorithm)
        assert after < 0.8 * before, (before, after)
    else:  # DSKD: the terms that teach the student (toward t2s in the student space, s2t toward the teacher) fell
        kd_student = [r["t2s_kd"] + r["s2t_kd"] for r in rows]
        assert sum(kd_student[-4:]) < 0.95 * sum(kd_student[:4])
        # and they reached the student, not only the projectors (weight decay is 0: no gradient, no change)
        before, after = load_model(student).model.layers[0].mlp.up_proj.weight, load_model(str(run)).model.layers[0].mlp.up_proj.weight
        assert (after - before).abs().max() > 1e-4
        assert (run / "final" / "projectors.safetensors").is_file()


def test_vanilla_refuses_different_tokenizers(tiny_model, tiny_other_vocab_model, tmp_path):
    with pytest.raises(ConfigError, match="use 'dskd-cma', 'uld' or 'seqkd'"):
        run_distill(cfg_for(tiny_other_vocab_model, tiny_model, tmp_path / "r", "vanilla"))
    assert not (tmp_path / "r").exists()


def test_distill_resumes_with_projector_state(tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distillqa.train import loop

    args = (tiny_model, f"{tiny_model}@layers=every-other")
    whole = run_distill(cfg_for(*args, tmp_path / "whole", "dskd", "train.max_steps=6"))
    real = loop.save_checkpoint

    def die_at_3(path, step, *a):
        real(path, step, *a)
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", die_at_3)
    with pytest.raises(KeyboardInterrupt):
        run_distill(cfg_for(*args, tmp_path / "killed", "dskd", "train.max_steps=6"))
    monkeypatch.setattr(loop, "save_checkpoint", real)
    resumed = run_distill(cfg_for(*args, tmp_path / "killed", "dskd", "train.max_steps=6"), resume=True)
    for name in ("adapter/adapter_model.safetensors", "projectors.safetensors"):
        a, b = load_file(str(whole / "final" / name)), load_file(str(resumed / "final" / name))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_pack_rows_moves_kept_positions_to_the_front():
    values = torch.arange(12.0).reshape(2, 6)
    keep = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    packed, valid = pack_rows(values, keep)
    assert packed.tolist() == [[2, 3, 0], [7, 8, 9]] and valid.tolist() == [[True, True, False], [True, True, True]]


def test_uld_is_zero_for_permuted_distributions_and_pads_vocabularies():
    a, uld_distance = torch.randn(3, 10), ULDDistance()
    assert uld_distance(a, a[:, torch.randperm(10)]).abs().max() < 1e-6
    b = torch.randn(3, 25)
    pa, pb = torch.softmax(a, -1).sort(-1, descending=True).values, torch.softmax(b, -1).sort(-1, descending=True).values
    want = (torch.nn.functional.pad(pa, (0, 15)) - pb).abs().sum(-1)
    torch.testing.assert_close(uld_distance(a, b), want)


def test_cma_attention_is_masked_to_answer_positions(tiny_model, tiny_other_vocab_model):
    teacher, student = load_model(tiny_other_vocab_model), load_model(tiny_model)
    tok_t, tok_s = load_tokenizer(tiny_other_vocab_model), load_tokenizer(tiny_model)
    exs = load_examples("bundled:telecom-sample")[0][:3]
    items = [(PromptBuilder(tok_s, max_length=160).encode_train(e), PromptBuilder(tok_t, max_length=160).encode_train(e)) for e in exs]
    batch = collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id)
    cma = DSKDCrossModelAttention(teacher, student, LossTerms(0.5, [(0.5, ForwardKL())]), 1.0, None)
    scores, h_s, valid_s, h_t, valid_t, _ = cma.align(student, batch)
    n_s = [sum(1 for t in s.labels[1:] if t != -100) for s, _ in items]
    n_t = [sum(1 for t in t.labels[1:] if t != -100) for _, t in items]
    assert valid_s.sum(1).tolist() == n_s and valid_t.sum(1).tolist() == n_t
    assert scores.shape == (3, max(n_s), max(n_t)) and h_t.shape[-1] == 48 and h_s.shape[-1] == 32
    weights = torch.softmax(scores, -1)
    for b in range(3):  # each valid student position attends only to valid teacher positions
        assert weights[b, : n_s[b], n_t[b]:].abs().sum() == 0
        torch.testing.assert_close(weights[b, : n_s[b], : n_t[b]].sum(-1), torch.ones(n_s[b]))
    loss, logs = cma(student, batch)
    loss.backward()
    assert torch.isfinite(loss) and cma.query.weight.grad.abs().sum() > 0 and cma.t2s.weight.grad.abs().sum() > 0
    assert teacher.model.layers[0].mlp.up_proj.weight.grad is None


def test_cma_alignment_puts_no_gradient_into_the_student(tiny_model, tiny_other_vocab_model):
    """The attention scores come from the student's token embeddings detached (as in the DSKD reference): with full
    fine-tuning they train the query projector only, never the student's embeddings or its tied head."""
    teacher, student = load_model(tiny_other_vocab_model), load_model(tiny_model).requires_grad_(True)
    tok_t, tok_s = load_tokenizer(tiny_other_vocab_model), load_tokenizer(tiny_model)
    exs = load_examples("bundled:telecom-sample")[0][:3]
    items = [(PromptBuilder(tok_s, max_length=160).encode_train(e), PromptBuilder(tok_t, max_length=160).encode_train(e)) for e in exs]
    cma = DSKDCrossModelAttention(teacher, student, LossTerms(0.5, [(0.5, ForwardKL())]), 1.0, None)
    scores, *_ = cma.align(student, collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id))
    mask = scores > torch.finfo(scores.dtype).min
    assert student.get_input_embeddings().weight is student.get_output_embeddings().weight  # tied, as in SmolLM2
    grads = torch.autograd.grad(scores[mask].sum(), [cma.query.weight, *student.parameters()], allow_unused=True)
    assert grads[0].abs().sum() > 0 and all(g is None for g in grads[1:])


@pytest.mark.parametrize("algorithm", ["vanilla", "dskd", "dskd-cma", "uld"])
def test_chunked_and_unchunked_objectives_agree(tiny_model, tiny_other_vocab_model, algorithm):
    from distillqa.config import KDConfig
    from distillqa.train.distill import make_objective

    same = algorithm in ("vanilla", "dskd")
    teacher_name = tiny_model if same else tiny_other_vocab_model
    teacher, tok_t, tok_s = load_model(teacher_name), load_tokenizer(teacher_name), load_tokenizer(tiny_model)
    exs = load_examples("bundled:telecom-sample")[0][:4]
    items = [(PromptBuilder(tok_s, max_length=160).encode_train(e), PromptBuilder(tok_t, max_length=160).encode_train(e)) for e in exs]
    batch = collate_pairs([(s, s) for s, _ in items] if same else items, tok_s.pad_token_id, tok_t.pad_token_id)
    results = []
    for chunk in (None, 3):
        student = load_model(tiny_model)
        torch.manual_seed(0)
        objective = make_objective(KDConfig(algorithm=algorithm, chunk_size=chunk, divergence="js"), teacher, student)
        loss, _ = objective(student, batch)
        loss.backward()
        grads = [p.grad.clone() for p in list(student.parameters()) + list(objective.parameters()) if p.grad is not None]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_seqkd_trains_on_the_teachers_answers_to_the_baselines_examples(tiny_model, tiny_other_vocab_model, tmp_path):
    """The teacher (another vocabulary) answers exactly the examples an SFT run of the same budget
    reaches, greedily, and the student's training sequences carry those answers, not the references."""
    from distillqa.config import GenerationConfig
    from distillqa.data import load_splits
    from distillqa.generate import generate_batch
    from distillqa.train.loop import micro_batch_indices

    cfg = cfg_for(tiny_other_vocab_model, tiny_model, tmp_path / "r", "seqkd", "train.max_steps=2", "kd.answer_tokens=6")
    run = run_distill(cfg)
    stored = {r["id"]: r["prediction"] for r in map(json.loads, (run / "teacher_answers.jsonl").read_text().splitlines())}

    builder_s = PromptBuilder(load_tokenizer(tiny_model), cfg.prompt.template, cfg.prompt.instruction, cfg.prompt.max_length)
    fitting = [ex for ex in load_splits(cfg.data)[0]["train"] if builder_s.encode_train(ex) is not None]
    sft_batches = micro_batch_indices(len(fitting), cfg.train, steps=2)
    assert set(stored) == {fitting[i].id for batch in sft_batches for i in batch} and len(stored) == 8

    tok_t = load_tokenizer(tiny_other_vocab_model)
    builder_t = PromptBuilder(tok_t, cfg.prompt.template, cfg.prompt.instruction, cfg.prompt.max_length)
    prompts = {ex.id: builder_t.encode_prompt(ex, 6) for ex in fitting if ex.id in stored}
    order = sorted(prompts, key=lambda i: (-len(prompts[i]), i))  # one left-padded batch, as generation batches them
    greedy = generate_batch(load_model(tiny_other_vocab_model), tok_t, [prompts[i] for i in order],
                            GenerationConfig(max_new_tokens=6))
    assert [stored[i] for i in order] == greedy
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["teacher_answers"]["answered"] + info["teacher_answers"]["empty"] == 8


def test_seqkd_run_waits_for_the_store_another_run_is_answering(tiny_model, tmp_path):
    """Cells of an experiment may run at the same time (`dispatch.backend`) and share a store: a run answers
    it only while holding its lock (held here, as another run would), then ends with what one run writes alone."""
    import os
    import subprocess
    import sys
    import time

    from distillqa.config import dump_config
    from distillqa.io import file_lock

    teacher = f"{tiny_model}@layers=0-1"
    run_distill(cfg_for(teacher, tiny_model, tmp_path / "alone", "seqkd", "train.max_steps=2"))
    store, config = tmp_path / "answers.jsonl", tmp_path / "b.yaml"
    config.write_text(dump_config(cfg_for(teacher, tiny_model, tmp_path / "b", "seqkd", "train.max_steps=2",
                                          f"kd.teacher_answers={store}")))
    with file_lock(store.with_suffix(".lock")):
        proc = subprocess.Popen([sys.executable, "-m", "distillqa.cli", "distill", str(config)],
                                env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (tmp_path / "b" / "run.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(5)  # ample for the tiny teacher to answer its 8 questions, were it not waiting
        assert (tmp_path / "b" / "run.json").is_file() and not store.exists() and proc.poll() is None
    assert proc.wait() == 0, proc.stderr.read()[-1000:]
    assert store.read_text() == (tmp_path / "alone" / "teacher_answers.jsonl").read_text()


def test_seqkd_answers_store_is_shared_and_refuses_other_settings(tiny_model, tmp_path, monkeypatch):
    from distillqa.train import distill

    store = tmp_path / "answers.jsonl"
    teacher = f"{tiny_model}@layers=0-1"
    run_distill(cfg_for(teacher, tiny_model, tmp_path / "a", "seqkd", "train.max_steps=1", f"kd.teacher_answers={store}"))
    loaded = []
    real = distill.load_model
    monkeypatch.setattr(distill, "load_model", lambda name, *a: loaded.append(name) or real(name, *a))
    run_distill(cfg_for(teacher, tiny_model, tmp_path / "b", "seqkd", "train.max_steps=1", f"kd.teacher_answers={store}"))
    assert loaded == [tiny_model]  # the student only: the second run read the teacher's answers from the store
    with pytest.raises(ConfigError, match="max_new_tokens=48.*this run uses 8"):
        run_distill(cfg_for(teacher, tiny_model, tmp_path / "c", "seqkd", "train.max_steps=1",
                            f"kd.teacher_answers={store}", "kd.answer_tokens=8"))


def test_seqkd_from_an_endpoint_trains_on_the_local_teachers_answers(tiny_model, tiny_other_vocab_model, tmp_path, monkeypatch):
    """The teacher served by `distillqa serve` on loopback gives the answers store its local self
    gives, so the student trains to the same weights; the store records the endpoint and model,
    and a run that names it asks the endpoint nothing again (a store made in-process is refused)."""
    from safetensors.torch import load_file

    from distillqa.clients import CompletionsClient

    extra = ("train.max_steps=2", "kd.answer_tokens=6", "lora.enabled=false")
    local = run_distill(cfg_for(tiny_other_vocab_model, tiny_model, tmp_path / "local", "seqkd", *extra))
    store = tmp_path / "answers.jsonl"
    with serving(tiny_other_vocab_model) as url:
        endpoint = (f"kd.teacher_endpoint.url={url}", f"kd.teacher_answers={store}")
        served = run_distill(cfg_for(tiny_other_vocab_model, tiny_model, tmp_path / "served", "seqkd", *extra, *endpoint))
        asked = []
        monkeypatch.setattr(CompletionsClient, "complete_many", lambda self, prompts, attempt=0: asked.append(prompts))
        run_distill(cfg_for(tiny_other_vocab_model, tiny_model, tmp_path / "again", "seqkd", *extra, *endpoint))
        assert asked == []
        with pytest.raises(ConfigError, match=f"made with endpoint=None, this run uses '{url}'"):
            run_distill(cfg_for(tiny_other_vocab_model, tiny_model, tmp_path / "mixed", "seqkd", *extra,
                                f"kd.teacher_endpoint.url={url}", f"kd.teacher_answers={local / 'teacher_answers.jsonl'}"))
    assert store.read_text() == (local / "teacher_answers.jsonl").read_text()
    provenance = json.loads(store.with_suffix(".json").read_text())
    assert provenance["endpoint"] == url and provenance["model"] == tiny_other_vocab_model
    a, b = load_file(str(local / "final" / "model" / "model.safetensors")), load_file(str(served / "final" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_seqkd_killed_while_answering_or_training_resumes_to_the_same_weights(tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from distillqa import generate
    from distillqa.train import loop

    args = (f"{tiny_model}@layers=0-1", tiny_model)
    extra = ("train.max_steps=6", "train.checkpoint_every=2", "kd.answer_tokens=6", "lora.enabled=false")
    whole = run_distill(cfg_for(*args, tmp_path / "whole", "seqkd", *extra))

    real_batch, real_save = generate.generate_batch, loop.save_checkpoint
    calls = []

    def die_in_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_batch(*a, **k)

    def die_at_2(path, step, *a):
        real_save(path, step, *a)
        if step == 2:
            raise KeyboardInterrupt

    killed = tmp_path / "killed"
    monkeypatch.setattr(generate, "generate_batch", die_in_second_batch)
    with pytest.raises(KeyboardInterrupt):  # killed while the teacher answers its 24 prompts (batches of 16 and 8)
        run_distill(cfg_for(*args, killed, "seqkd", *extra))
    assert len((killed / "teacher_answers.new.partial.jsonl").read_text().splitlines()) == 16
    later = []
    monkeypatch.setattr(generate, "generate_batch", lambda *a, **k: later.append(1) or real_batch(*a, **k))
    monkeypatch.setattr(loop, "save_checkpoint", die_at_2)
    with pytest.raises(KeyboardInterrupt):  # then killed while training
        run_distill(cfg_for(*args, killed, "seqkd", *extra), resume=True)
    assert later == [1]  # only the unanswered batch was answered again
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = run_distill(cfg_for(*args, killed, "seqkd", *extra), resume=True)
    assert later == [1]  # the store was complete: the teacher was not run again
    assert (killed / "teacher_answers.jsonl").read_text() == (whole / "teacher_answers.jsonl").read_text()
    a, b = load_file(str(whole / "final" / "model" / "model.safetensors")), load_file(str(resumed / "final" / "model" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
