"""The offline teacher cache on tiny in-process models: what it stores, KD from it against live KD,
the sampled estimator's unbiasedness, refusals, resumption after a kill, damaged shards."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from typer.testing import CliRunner

from distillqa.cli import app
from distillqa.config import CacheSettings, DistillConfig, TeacherCacheConfig, load_config
from distillqa.data.prompts import collate_right
from distillqa.errors import ConfigError, DataError, RunDirError
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train import teacher_cache as tc
from distillqa.train.distill import cached_objective, run_distill
from distillqa.train.kd import CachedKD, VanillaKD
from distillqa.train.losses import DIVERGENCES, ForwardKL, LossTerms, SampledKL, TopKTail
from distillqa.train.objectives import answer_states, project_to_vocab

COMMON = ["data.max_train_examples=12", "prompt.max_length=160"]


def build(teacher, out, *extra):
    return tc.run_teacher_cache(load_config(TeacherCacheConfig, None, [
        f"teacher.name={teacher}", f"output_dir={out}", "cache.shard_examples=5", "cache.batch_size=3", *COMMON, *extra]))


def distill_cfg(teacher, student, cache, out, *extra):
    return load_config(DistillConfig, None, [
        f"teacher.name={teacher}", f"student.name={student}", f"kd.teacher_cache={cache}", f"output_dir={out}",
        "train.batch_size=4", "train.max_steps=3", "train.lr=3e-3", "train.log_every=1", "kd.chunk_size=7", *COMMON, *extra])


@pytest.fixture(scope="module")
def topk_cache(tiny_model, tmp_path_factory):
    return build(tiny_model, tmp_path_factory.mktemp("c") / "topk", "cache.k=8", "cache.tail_samples=0", "cache.dtype=float32")


def live_logp(model_name, examples):
    """The teacher's answer-token log-probabilities, example by example, from one forward per example."""
    model, tok = load_model(model_name), load_tokenizer(model_name)
    with torch.no_grad():
        return [torch.log_softmax(project_to_vocab(model, answer_states(model, collate_right([e], tok.pad_token_id))[0]), -1)
                for e in examples]


def test_cache_holds_the_live_teachers_top_k_and_tail(tiny_model, topk_cache):
    cfg = load_config(TeacherCacheConfig, None, COMMON)
    examples = tc.encode_train_split(cfg.data, cfg.prompt, load_tokenizer(tiny_model))
    cache = tc.TeacherCache(topk_cache)
    assert len(cache) == len(examples) == 12 and len(cache.manifest["shards"]) == 3
    for i, logp in enumerate(live_logp(tiny_model, examples)):
        row = cache[i]
        values, ids = logp.topk(8, dim=-1)
        assert row["ids"].shape == (len(logp), 8)
        torch.testing.assert_close(row["logp"], values, atol=1e-5, rtol=0)
        torch.testing.assert_close(logp.gather(-1, row["ids"]), row["logp"], atol=1e-5, rtol=0)  # ties may swap ids
        torch.testing.assert_close(row["log_tail"].exp(), 1 - values.exp().sum(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("divergence", ["forward_kl", "js"])
def test_with_k_equal_to_the_vocabulary_cached_kd_is_live_kd(tiny_model, tmp_path, divergence):
    """k = V: the tail is empty, so loss and gradients equal live vanilla KD's."""
    vocab = load_model(tiny_model).get_output_embeddings().weight.shape[0]
    cache = tc.TeacherCache(build(tiny_model, tmp_path / "full", f"cache.k={vocab}", "cache.tail_samples=0", "cache.dtype=float32"))
    cfg = load_config(TeacherCacheConfig, None, COMMON)
    tok = load_tokenizer(tiny_model)
    examples = tc.encode_train_split(cfg.data, cfg.prompt, tok)[:5]
    batch = tc.collate_cached([(e, i) for i, e in enumerate(examples)], tok.pad_token_id, cache)
    student = f"{tiny_model}@layers=every-other"
    grads = []
    terms = LossTerms(0.5, [(0.5, DIVERGENCES[divergence]())])
    for objective in (VanillaKD(load_model(tiny_model), terms, 7), CachedKD(terms, [TopKTail(terms.divergences[0])], 7)):
        model = load_model(student)
        loss, logs = objective(model, batch)
        loss.backward()
        grads.append((loss.detach(), logs, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (live, live_logs, g_live), (cached, cached_logs, g_cached) = grads
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    assert cached_logs["kd"] == pytest.approx(live_logs["kd"], rel=1e-5)
    for name in g_live:
        torch.testing.assert_close(g_cached[name], g_live[name], rtol=1e-4, atol=1e-6)


def weights(target: dict, settings: CacheSettings) -> torch.Tensor:
    """The forward-KL weights the cache reader gives these targets."""
    if settings.method == "sampling":
        return target["count"].float() / settings.samples
    return tc.tail_weights(target["logp"], target["log_tail"], settings.k)


@pytest.mark.parametrize("settings", [CacheSettings(method="sampling", samples=8), CacheSettings(k=4, tail_samples=4)],
                         ids=["sampling", "topk-with-tail-draws"])
def test_sampled_estimator_is_unbiased_and_top_k_is_not(settings):
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.randn(4, 50, generator=g) * 2, -1)
    student_logits = (torch.randn(4, 50, generator=g) * 2).requires_grad_(True)
    full = ForwardKL().per_token(torch.log_softmax(student_logits, -1), teacher)
    (full_grad,) = torch.autograd.grad(full.sum(), student_logits)
    draws = 3000
    estimates, grads = [], []
    for seed in range(draws):
        target = tc.sparse_targets(teacher, settings, torch.Generator().manual_seed(seed))
        kl = SampledKL()(student_logits, target["ids"].long(), target["logp"], weights(target, settings))
        estimates.append(kl.detach())
        grads.append(torch.autograd.grad(kl.sum(), student_logits)[0])
    estimates, grads = torch.stack(estimates), torch.stack(grads)
    stderr = estimates.std(0) / draws**0.5
    assert ((estimates.mean(0) - full.detach()).abs() < 4 * stderr).all()
    # grad = q - w, so E[grad] = q - p; tokens too rare to be drawn contribute at most their own p
    assert ((grads.mean(0) - full_grad).abs() < 4 * grads.std(0) / draws**0.5 + 1e-3).all()
    top = tc.sparse_targets(teacher, CacheSettings(k=4, tail_samples=0), torch.Generator())
    biased = TopKTail(ForwardKL())(student_logits, top["ids"].long(), top["logp"], top["log_tail"]).detach()
    assert ((full.detach() - biased) > 10 * stderr).all()  # top-k with a tail bucket underestimates


def test_tail_draws_follow_the_top_k_cache_and_serve_forward_kl_only(tiny_model, topk_cache, tmp_path, caplog):
    """A top-k cache with tail draws holds the plain top-k cache's columns, then draws from the tail;
    forward KL reads all of them at their weights, other divergences the kept tokens and the tail bucket."""
    hybrid = tc.TeacherCache(build(tiny_model, tmp_path / "h", "cache.k=8", "cache.tail_samples=5", "cache.dtype=float32"))
    plain = tc.TeacherCache(topk_cache)
    assert hybrid.manifest["tail_samples"] == 5 and "tail_samples" not in plain.manifest
    for i in range(len(plain)):
        h, p = hybrid[i], plain[i]
        assert h["ids"].shape == (len(p["ids"]), 13)
        assert torch.equal(h["ids"][:, :8], p["ids"]) and torch.equal(h["logp"][:, :8], p["logp"])
        assert torch.equal(h["log_tail"], p["log_tail"])
        assert not (h["ids"][:, 8:, None] == h["ids"][:, None, :8]).any()  # draws come from the tail only
        torch.testing.assert_close(h["weight"].sum(-1), torch.ones(len(p["ids"])), atol=1e-5, rtol=0)
        torch.testing.assert_close(h["weight"][:, 8:], (p["log_tail"].exp() / 5)[:, None].expand(-1, 5))
    tok = load_tokenizer(tiny_model)
    cfg = load_config(TeacherCacheConfig, None, COMMON)
    items = [(e, i) for i, e in enumerate(tc.encode_train_split(cfg.data, cfg.prompt, tok)[:4])]
    model = load_model(f"{tiny_model}@layers=every-other")
    with torch.no_grad():
        for divergence, estimator in [("forward_kl", SampledKL), ("js", TopKTail)]:
            kd = distill_cfg(tiny_model, tiny_model, hybrid.path, tmp_path / "kd", f"kd.divergence={divergence}").kd
            with caplog.at_level(logging.WARNING):
                objective = cached_objective(kd, hybrid)
            assert [type(s) for s in objective.sparse] == [estimator]
            assert ("cache.k=13, cache.tail_samples=0" in caplog.text) == (divergence == "js")
            loss, _ = objective(model, tc.collate_cached(items, tok.pad_token_id, hybrid))
            plain_loss, _ = cached_objective(kd, plain)(model, tc.collate_cached(items, tok.pad_token_id, plain))
            if divergence == "js":  # the kept tokens and the bucket: the plain cache's loss
                torch.testing.assert_close(loss, plain_loss)
            else:  # an unbiased estimate is not top-k's lower bound
                assert not torch.allclose(loss, plain_loss)


def test_tail_draws_need_a_tail_and_sampling_ignores_them(tiny_model, tmp_path):
    vocab = load_model(tiny_model).get_output_embeddings().weight.shape[0]
    result = CliRunner().invoke(app, ["teacher", "cache", *[x for c in [f"teacher.name={tiny_model}", f"cache.k={vocab}",
                                                                        f"output_dir={tmp_path / 'all'}", *COMMON] for x in ("--set", c)]])
    assert result.exit_code == 2 and "no tail to draw from" in result.output and "Traceback" not in result.output
    dumped = load_config(TeacherCacheConfig, None, ["cache.method=sampling"]).model_dump(mode="json")  # with tail_samples: 8
    sampling = TeacherCacheConfig.model_validate(dumped).cache  # a written config loads again
    assert sampling.method == "sampling" and "tail_samples" not in tc.cache_size(sampling)  # and its draws ignore the key


def test_kd_trains_from_the_cache_without_the_teacher(tiny_model, topk_cache, tmp_path, monkeypatch):
    import distillqa.train.distill as distill

    real = distill.load_model
    loaded = []
    monkeypatch.setattr(distill, "load_model", lambda name, *a: loaded.append(name) or real(name, *a))
    student = f"{tiny_model}@layers=every-other"
    run = run_distill(distill_cfg(tiny_model, student, topk_cache, tmp_path / "kd", "kd.kd_rate=1.0"))
    assert loaded == [student]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["teacher_cache"]["method"] == "topk"
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["loss"] == pytest.approx(r["kd"], rel=1e-5) and r["kd"] > 0 for r in rows)


@pytest.mark.parametrize("change, field", [
    (["prompt.max_length=150"], "prompt.max_length"),
    (["data.max_train_examples=11", "prompt.max_length=160"], "dataset_hash"),
    (["teacher.name=smollm2-135m"], "teacher"),
])
def test_a_cache_for_other_data_prompt_or_teacher_is_refused_naming_the_field(tiny_model, topk_cache, tmp_path, change, field):
    cfg = distill_cfg(tiny_model, tiny_model, topk_cache, tmp_path / "kd", *change)
    with pytest.raises(ConfigError, match=rf"does not match this run: {field} differs"):
        run_distill(cfg)
    assert not (tmp_path / "kd").exists()


def test_another_tokenizer_is_refused_and_the_cli_says_so_in_one_line(tiny_model, tiny_other_vocab_model, topk_cache, tmp_path):
    result = CliRunner().invoke(app, ["distill", "--set", f"teacher.name={tiny_model}", "--set",
                                      f"student.name={tiny_other_vocab_model}", "--set", f"kd.teacher_cache={topk_cache}",
                                      "--set", f"output_dir={tmp_path / 'kd'}", *[x for c in COMMON for x in ("--set", c)]])
    assert result.exit_code == 2 and "tokenizer_hash differs" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_sampling_cache_needs_forward_kl_and_cache_needs_temperature_1(tiny_model, tmp_path):
    cache = build(tiny_model, tmp_path / "s", "cache.method=sampling", "cache.samples=4")
    with pytest.raises(ConfigError, match="forward_kl only"):
        run_distill(distill_cfg(tiny_model, tiny_model, cache, tmp_path / "kd", "kd.divergence=js"))
    with pytest.raises(ConfigError, match="temperature=1"):
        distill_cfg(tiny_model, tiny_model, cache, tmp_path / "kd", "kd.temperature=2")
    with pytest.raises(ConfigError, match="only 'vanilla'"):
        distill_cfg(tiny_model, tiny_model, cache, tmp_path / "kd", "kd.algorithm=dskd")


@pytest.mark.parametrize("args", [("cache.method=sampling", "cache.samples=6"), ("cache.k=3", "cache.tail_samples=6")],
                         ids=["sampling", "topk-with-tail-draws"])
def test_a_killed_cache_resumes_and_ends_byte_identical(tiny_model, tmp_path, monkeypatch, args):
    whole = build(tiny_model, tmp_path / "whole", *args)
    real, calls = tc.shard_tensors, []

    def stop_after_one_shard(*a, **kw):
        if calls:
            raise KeyboardInterrupt  # as a kill after the first shard was renamed into place
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(tc, "shard_tensors", stop_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_model, tmp_path / "killed", *args)
    assert [p.name for p in (tmp_path / "killed" / "shards").iterdir()] == ["00000.safetensors"]
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(ConfigError, match="unfinished"):
        tc.TeacherCache(tmp_path / "killed")
    monkeypatch.setattr(tc, "shard_tensors", real)
    resumed = build(tiny_model, tmp_path / "killed", *args)
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file() and p.name != ".lock")
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*") if p.is_file() and p.name != ".lock")
    assert len(files) == 5  # plan, manifest, 3 shards
    for f in files:
        assert (whole / f).read_bytes() == (resumed / f).read_bytes(), f
    with pytest.raises(RunDirError, match="something else"):  # a rerun with other settings is refused
        build(tiny_model, tmp_path / "killed", *args, "cache.seed=1")


def test_a_damaged_shard_is_refused(tiny_model, tmp_path):
    cache = build(tiny_model, tmp_path / "c", "cache.k=4")
    shard = cache / "shards" / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"00001\.safetensors.*sha256"):
        tc.TeacherCache(cache)
    result = CliRunner().invoke(app, ["distill", *[x for c in [f"teacher.name={tiny_model}", f"student.name={tiny_model}",
                                                               f"kd.teacher_cache={cache}", f"output_dir={tmp_path / 'kd'}",
                                                               *COMMON] for x in ("--set", c)]])
    assert result.exit_code == 2 and "sha256" in result.output and len(result.output.strip().splitlines()) == 1
