"""What a teacher cache keeps of the teacher, what it costs on disk, and what KD from it saves, on the bundled sample.

For top-k (k = 8, 32, 128; a tail bucket), top-k with draws from the tail (k = 8, 8 draws: the same
16 columns as k = 16) and sampling (`--samples` draws), over the answer tokens of the first `--examples`
training questions:
  KL(p||p^)   reconstruction: p^ = the kept probabilities, the tail spread evenly over the other
              tokens (top-k with draws: p^ = the forward-KL weights, kept p_v and p_tail / draws per
              draw; it and sampling keep no tail: infinite)
  KL(p^||p)   the other direction (finite for all: sampling's p^ = draw counts / draws)
  KD bias     mean over tokens of (the cached KD term - the full KL(p || q)) for the student q
  bytes/token cache size on disk per answer token; write tok/s: answer tokens cached per second
Then the size at a 262k vocabulary: the whole training split cached from `gemma3-270m` (262,144 tokens)
with the default settings (`CacheSettings()`: top-k, k = 8, 8 draws from the tail, float16), split into
  shards       bytes/token of shards/*.safetensors: the payload (ids, logp, log_tail: (8 + 8) x 6 + 2 = 98),
               the per-example offsets (4 bytes each) and the safetensors header (one per shard)
  directory    bytes/token of the whole cache directory, plan.json and manifest.json included
  write tok/s  answer tokens cached per second (loading the teacher included)
Then one process times a full-fine-tuning step of the student (`--batch` examples): SFT alone,
vanilla KD with the live teacher, and KD from the default cache (forward KL from the kept tokens and
the tail draws; medians of `--steps`, interleaved;
`--steps 0` skips it).

    python benchmarks/teacher_cache.py [--examples 16] [--batch 4] [--steps 3] [--samples 32]

`--quality` instead compares KD from a cache with live KD on the bundled sample, with the `quick`
preset's healed student (`smollm2-135m@layers=angular:26`, 40 healing steps, from the model cache
or healed first), data, prompt, distillation settings (all weights train, vanilla KD, forward KL,
kd_rate 0.5) and generation (16 new tokens, greedy): the teacher (`--teacher sft`: `smollm2-135m` LoRA-SFT'd
with the preset's SFT budget first; `base`: as it is) distils the student twice with the same seed and budget
(`--quality-steps` steps of `--quality-batch`, lr `--lr`), live and from a cache of it (the default
settings; `--k` and `--tail-samples` change them; `--method sampling`: `--samples` draws), once per seed of `--seeds`; each student answers the test split (36 questions). It prints
  the wall time of each stage
  per seed, ROUGE-L of each student: mean and 95% bootstrap CI (metrics.summary.summarize), and the
  mean difference cache - live with the number of answers that differ
  the paired difference cache - live per question, averaged over the seeds: mean, 95% bootstrap CI
  (metrics.summary.bootstrap_ci) and the p-value of the quick preset's paired test
  (experiment.stats.paired_p_value, Wilcoxon)
Runs go to `--out` (resumed there when given again) or a temporary directory.

    python benchmarks/teacher_cache.py --quality [--teacher sft|base] [--quality-steps 16] [--quality-batch 4] [--lr 3e-4]
                                       [--seeds 0 1 2] [--method topk|sampling] [--k K] [--tail-samples S]
                                       [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TEACHER, STUDENT = "smollm2-135m", "smollm2-135m@layers=0-14"


LARGE_VOCAB_TEACHER = "gemma3-270m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=16, help="training questions cached (the first ones)")
    ap.add_argument("--batch", type=int, default=4, help="questions per timed training step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per objective (0: no step timing)")
    ap.add_argument("--samples", type=int, default=32, help="draws per answer token of the sampling cache")
    ap.add_argument("--quality", action="store_true", help="only the quality comparison: KD from a cache vs live KD")
    ap.add_argument("--teacher", choices=["base", "sft"], default="sft",
                    help="--quality: the teacher LoRA-SFT'd first with the quick preset's SFT budget, or as it is")
    ap.add_argument("--quality-steps", type=int, default=16, help="--quality: optimizer steps of each KD run")
    ap.add_argument("--quality-batch", type=int, default=4, help="--quality: questions per step")
    ap.add_argument("--lr", type=float, default=3e-4, help="--quality: peak learning rate (the quick preset's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="--quality: a live and a cached run per seed (train.seed)")
    ap.add_argument("--method", choices=["topk", "sampling"], default="topk",
                    help="--quality: the cache's method (topk: --k, --tail-samples; sampling: --samples draws)")
    ap.add_argument("--k", type=int, help="--quality: topk's kept tokens (default: CacheSettings' default)")
    ap.add_argument("--tail-samples", type=int, help="--quality: topk's draws from the tail (default: CacheSettings' default)")
    ap.add_argument("--out", help="--quality: directory for the runs (kept, resumed); default a temporary directory")
    a = ap.parse_args()
    if a.quality:
        return quality(a)

    from distillqa.config import CacheSettings, DataConfig, ModelConfig, PromptConfig, TeacherCacheConfig
    from distillqa.data.prompts import collate_right
    from distillqa.models.registry import load_model, load_tokenizer
    from distillqa.train.kd import CachedKD, VanillaKD
    from distillqa.train.losses import ForwardKL, LossTerms, SampledKL, TopKTail
    from distillqa.train.objectives import SFTObjective, answer_states, project_to_vocab
    from distillqa.train.teacher_cache import TeacherCache, collate_cached, encode_train_split, run_teacher_cache

    data, prompt = DataConfig(max_train_examples=a.examples), PromptConfig(max_length=256)
    tok = load_tokenizer(TEACHER)
    examples = encode_train_split(data, prompt, tok)
    teacher, student = load_model(TEACHER).eval(), load_model(STUDENT)
    with torch.no_grad():  # full distributions, example by example, for the reconstruction figures
        full_t, full_s = [], []
        for e in examples:
            batch = collate_right([e], tok.pad_token_id)
            full_t.append(torch.log_softmax(project_to_vocab(teacher, answer_states(teacher, batch)[0]), -1))
            full_s.append(torch.log_softmax(project_to_vocab(student, answer_states(student, batch)[0]), -1))
    logp, logq = torch.cat(full_t), torch.cat(full_s)
    tokens, vocab = logp.shape
    full_kl = (logp.exp() * (logp - logq)).sum(-1)
    print(f"{len(examples)} training questions, {tokens} answer tokens, vocabulary {vocab}; teacher {TEACHER}, student {STUDENT}")
    print(f"{'option':26s} {'KL(p||p^)':>10s} {'KL(p^||p)':>10s} {'KD bias':>9s} {'bytes/token':>12s} {'write tok/s':>12s}")

    options = ([("topk", {"k": k, "tail_samples": 0}) for k in (8, 32, 128)] + [("topk", {"k": 8, "tail_samples": 8})]
               + [("sampling", {"samples": a.samples})])
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for method, size in options:
            name = f"{method} " + " ".join(f"{k}={v}" for k, v in size.items() if v)
            out = Path(tmp) / name.replace(" ", "-").replace("=", "")
            started = time.perf_counter()
            run_teacher_cache(TeacherCacheConfig(teacher=ModelConfig(name=TEACHER), data=data, prompt=prompt,
                                                 cache=CacheSettings(method=method, **size), output_dir=str(out)))
            seconds = time.perf_counter() - started
            cache = caches[name] = TeacherCache(out)
            rows = [cache[i] for i in range(len(cache))]
            ids, kept = torch.cat([r["ids"] for r in rows]), torch.cat([r["logp"] for r in rows]).float()
            if method == "topk" and not size["tail_samples"]:
                log_tail = torch.cat([r["log_tail"] for r in rows]).float()
                rest = log_tail - math.log(vocab - ids.shape[1])  # the tail spread evenly
                p_hat = rest[:, None].expand(-1, vocab).scatter(-1, ids, kept)
                bias = TopKTail(ForwardKL())(logq, ids, kept, log_tail)
            else:
                weight = torch.cat([r["weight"] for r in rows])
                p_hat = torch.log(torch.zeros_like(logp).scatter_add(-1, ids, weight))
                bias = SampledKL()(logq, ids, kept, weight)
            forward = (logp.exp() * (logp - p_hat)).sum(-1).mean().item()
            q = p_hat.exp()
            reverse = torch.where(q > 0, q * (p_hat - logp), torch.zeros_like(q)).sum(-1).mean().item()
            size_bytes = sum(f.stat().st_size for f in (out / "shards").iterdir())
            print(f"{name:26s} {forward:10.4f} {reverse:10.4f} {(bias - full_kl).mean().item():+9.4f} "
                  f"{size_bytes / tokens:12.1f} {tokens / seconds:12.1f}")
        print(f"full KL(p || q) of the student: {full_kl.mean().item():.4f} (the target the KD bias is measured against)")
        large_vocab_size(data.model_copy(update={"max_train_examples": None}), prompt, Path(tmp) / "large-vocab")

        if a.steps == 0:
            return
        cache = caches["topk k=8 tail_samples=8"]
        items = [(e, i) for i, e in enumerate(examples[: a.batch])]
        live_batch = collate_right([e for e, _ in items], tok.pad_token_id)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
        terms = LossTerms(0.5, [(0.5, ForwardKL())])
        steps = {"sft": (SFTObjective(), lambda: live_batch),
                 "kd live teacher": (VanillaKD(teacher, terms, 32), lambda: live_batch),
                 "kd from cache": (CachedKD(terms, [SampledKL()], 32),
                                   lambda: collate_cached(items, tok.pad_token_id, cache))}
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(a.steps + 1):  # the first round warms up
            for name, (objective, batch) in steps.items():
                started = time.perf_counter()
                loss, _ = objective(student, batch())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                times[name].append(time.perf_counter() - started)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        print(f"step ({a.batch} questions, {int((live_batch['labels'] != -100).sum())} answer tokens, all weights train, "
              f"medians of {a.steps}): " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
        print(f"ratios: kd from cache / kd live teacher {med['kd from cache'] / med['kd live teacher']:.2f}; "
              f"kd from cache / sft {med['kd from cache'] / med['sft']:.2f}; kd live / sft {med['kd live teacher'] / med['sft']:.2f}")


def large_vocab_size(data, prompt, out: Path) -> None:
    """The default cache of the whole training split from a 262k-vocabulary teacher: bytes per answer token."""
    from safetensors import safe_open

    from distillqa.config import CacheSettings, ModelConfig, TeacherCacheConfig
    from distillqa.train.teacher_cache import TeacherCache, run_teacher_cache

    settings = CacheSettings()
    started = time.perf_counter()
    run_teacher_cache(TeacherCacheConfig(teacher=ModelConfig(name=LARGE_VOCAB_TEACHER), data=data, prompt=prompt,
                                         cache=settings, output_dir=str(out)))
    seconds = time.perf_counter() - started
    cache = TeacherCache(out)
    shards = sorted((out / "shards").iterdir())
    payload = offsets = 0
    for file in shards:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                n = f.get_tensor(k).nbytes
                offsets, payload = (offsets + n, payload) if k == "offsets" else (offsets, payload + n)
    shard_bytes = sum(f.stat().st_size for f in shards)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    tokens = sum(len(cache[i]["ids"]) for i in range(len(cache)))
    print(f"{LARGE_VOCAB_TEACHER} (vocabulary {cache.manifest['vocab_size']}), default cache ({settings.method}, "
          f"k={settings.k}, tail_samples={settings.tail_samples}, {settings.dtype}), the whole training split: {len(cache)} questions, {tokens} answer tokens:\n  "
          f"shards {shard_bytes / tokens:.1f} bytes/token (payload {payload / tokens:.1f}, offsets {offsets / tokens:.1f}, "
          f"headers {(shard_bytes - payload - offsets) / tokens:.1f}); whole directory with plan.json and manifest.json "
          f"{total / tokens:.1f} bytes/token; write {tokens / seconds:.1f} tok/s (teacher loading included)")


def quality(a) -> None:
    """KD from a default teacher cache against live KD: the same student, seed and budget; ROUGE-L on the test split."""
    from distillqa.config import (CacheSettings, DistillConfig, EvaluateConfig, GenerateConfig, ModelConfig, SFTConfig,
                                  TeacherCacheConfig)
    from distillqa.exp_dir import directory_lock
    from distillqa.experiment.config import ExperimentConfig
    from distillqa.experiment.runner import healing
    from distillqa.experiment.stats import paired_p_value
    from distillqa.generate import run_generate
    from distillqa.io import read_jsonl
    from distillqa.metrics.evaluate import evaluate_predictions
    from distillqa.metrics.summary import bootstrap_ci, summarize
    from distillqa.train.distill import run_distill
    from distillqa.train.heal import run_heal
    from distillqa.train.run_dir import RunDir
    from distillqa.train.sft import run_sft
    from distillqa.train.teacher_cache import run_teacher_cache

    exp = ExperimentConfig()  # the quick preset
    out = Path(a.out or tempfile.mkdtemp(prefix="teacher-cache-quality-"))
    shared = dict(data=exp.data, prompt=exp.prompt)
    clock = time.perf_counter()

    def timed(label: str, fn):
        started = time.perf_counter()
        result = fn()
        print(f"  {label}: {time.perf_counter() - started:.0f} s", flush=True)
        return result

    def resumed(path: Path) -> bool:
        return (path / "run.json").is_file()

    derive, corpus, healed = healing(exp)
    if not RunDir(healed).finished:
        def heal():
            with directory_lock(healed.with_name(healed.name + ".lock"), "healing this student"):
                run_heal(derive, resume=resumed(healed), corpus=corpus)
        timed(f"heal {exp.grid.student.name} ({exp.grid.heal.steps} steps) into {healed}", heal)
    student = exp.grid.student.model_copy(update={"name": str(healed)})
    teacher = ModelConfig(name=TEACHER)
    if a.teacher == "sft":
        sft = SFTConfig(model=teacher, lora=exp.sft.lora, train=exp.sft.train, output_dir=str(out / "teacher-sft"), **shared)
        teacher = ModelConfig(name=str(timed(f"LoRA SFT of the teacher ({exp.sft.train.max_steps} steps of "
                                             f"{exp.sft.train.batch_size})", lambda: run_sft(sft, resume=resumed(out / "teacher-sft")))))
    sizes = {"k": a.k, "tail_samples": a.tail_samples} if a.method == "topk" else {"samples": a.samples}
    settings = CacheSettings(method=a.method, **{k: v for k, v in sizes.items() if v is not None})
    sizes = {k: getattr(settings, k) for k in sizes}
    cache_dir = out / "-".join(["cache", a.method, *(f"{k.replace('_', '-')}{v}" for k, v in sizes.items() if v)])
    timed(f"teacher cache ({settings.method}, {', '.join(f'{k}={v}' for k, v in sizes.items())})",
          lambda: run_teacher_cache(TeacherCacheConfig(teacher=teacher, cache=settings, output_dir=str(cache_dir), **shared)))
    kd = exp.distill.kd.model_copy(update={"algorithm": "vanilla"})
    scores = {}  # (seed, live | cache) -> {question id: ROUGE-L}
    for seed in a.seeds:
        train = exp.distill.train.model_copy(update={"max_steps": a.quality_steps, "batch_size": a.quality_batch,
                                                     "lr": a.lr, "seed": seed})
        for name, run_kd in [("live", kd), ("cache", kd.model_copy(update={"teacher_cache": str(cache_dir)}))]:
            tag = f"{name}-seed{seed}" if name == "live" else f"{cache_dir.name}-seed{seed}"
            run, answers = out / f"kd-{tag}", out / f"answers-{tag}"
            cfg = DistillConfig(teacher=teacher, student=student, lora=exp.distill.lora, train=train, kd=run_kd,
                                output_dir=str(run), **shared)
            timed(f"distill {name}, seed {seed} ({a.quality_steps} steps of {a.quality_batch}, lr {a.lr:g})",
                  lambda: run_distill(cfg, resume=resumed(run)))
            gen = GenerateConfig(model=student.model_copy(update={"name": str(run)}), generation=exp.generation,
                                 split="test", output_dir=str(answers), **shared)
            timed(f"generate {name}, seed {seed} (test split)", lambda: run_generate(gen))
            evaluate_predictions(answers, EvaluateConfig(metrics="rouge_l"))
            scores[seed, name] = {r["id"]: r["rouge_l"] for r in read_jsonl(answers / "scores.jsonl")}
    ids = sorted(scores[a.seeds[0], "live"])
    print(f"teacher {teacher.name}, student {exp.grid.student.name} (healed), {len(ids)} test questions, "
          f"{a.quality_steps} steps of {a.quality_batch} at lr {a.lr:g}, seeds {a.seeds}; total {time.perf_counter() - clock:.0f} s")
    per_seed = {}
    for seed in a.seeds:
        for name in ("live", "cache"):
            summary = summarize([scores[seed, name][i] for i in ids])
            print(f"seed {seed} ROUGE-L {name:6s} {summary['mean']:.4f} [{summary['ci95'][0]:.4f}, {summary['ci95'][1]:.4f}]")
        per_seed[seed] = np.array([scores[seed, "cache"][i] - scores[seed, "live"][i] for i in ids])
        print(f"seed {seed} cache - live {per_seed[seed].mean():+.4f}, {int((per_seed[seed] != 0).sum())} of {len(ids)} answers differ")
    diff = np.mean([per_seed[seed] for seed in a.seeds], axis=0)  # per question, averaged over the seeds
    lo, hi = bootstrap_ci(diff.tolist())
    print(f"cache - live over the seeds (per question, averaged over seeds): {diff.mean():+.4f} [{lo:+.4f}, {hi:+.4f}], "
          f"paired {exp.stats.test} p = {paired_p_value(diff, exp.stats.test):.3f}; target |cache - live| <= 0.01: "
          f"{'met' if abs(diff.mean()) <= 0.01 else 'not met'} by the mean, "
          f"{'shown' if -0.01 <= lo and hi <= 0.01 else 'not shown'} by the CI")


if __name__ == "__main__":
    main()
