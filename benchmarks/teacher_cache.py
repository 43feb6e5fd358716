"""What a teacher cache keeps of the teacher, what it costs on disk, and what KD from it saves, on the bundled sample.

For top-k (k = 8, 32, 128; a tail bucket) and sampling (`--samples` draws), over the answer tokens of
the first `--examples` training questions:
  KL(p||p^)   reconstruction: p^ = the kept probabilities, the tail spread evenly over the other
              tokens (sampling keeps no tail: infinite)
  KL(p^||p)   the other direction (finite for both: sampling's p^ = draw counts / draws)
  KD bias     mean over tokens of (the cached KD term - the full KL(p || q)) for the student q
  bytes/token cache size on disk per answer token; write tok/s: answer tokens cached per second
Then one process times a full-fine-tuning step of the student (`--batch` examples): SFT alone,
vanilla KD with the live teacher, and KD from the top-k cache (medians of `--steps`, interleaved).

    python benchmarks/teacher_cache.py [--examples 16] [--batch 4] [--steps 3] [--samples 32]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

TEACHER, STUDENT = "smollm2-135m", "smollm2-135m@layers=0-14"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    a = ap.parse_args()

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
    print(f"{'option':20s} {'KL(p||p^)':>10s} {'KL(p^||p)':>10s} {'KD bias':>9s} {'bytes/token':>12s} {'write tok/s':>12s}")

    options = [("topk", {"k": k}) for k in (8, 32, 128)] + [("sampling", {"samples": a.samples})]
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for method, size in options:
            name = f"{method} " + " ".join(f"{k}={v}" for k, v in size.items())
            out = Path(tmp) / name.replace(" ", "-").replace("=", "")
            started = time.perf_counter()
            run_teacher_cache(TeacherCacheConfig(teacher=ModelConfig(name=TEACHER), data=data, prompt=prompt,
                                                 cache=CacheSettings(method=method, **size), output_dir=str(out)))
            seconds = time.perf_counter() - started
            cache = caches[name] = TeacherCache(out)
            rows = [cache[i] for i in range(len(cache))]
            ids, kept = torch.cat([r["ids"] for r in rows]), torch.cat([r["logp"] for r in rows]).float()
            if method == "topk":
                log_tail = torch.cat([r["log_tail"] for r in rows])
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
            print(f"{name:20s} {forward:10.4f} {reverse:10.4f} {(bias - full_kl).mean().item():+9.4f} "
                  f"{size_bytes / tokens:12.1f} {tokens / seconds:12.1f}")
        print(f"full KL(p || q) of the student: {full_kl.mean().item():.4f} (the target the KD bias is measured against)")

        cache = caches["topk k=32"]
        items = [(e, i) for i, e in enumerate(examples[: a.batch])]
        live_batch = collate_right([e for e, _ in items], tok.pad_token_id)
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
        terms = LossTerms(0.5, [(0.5, ForwardKL())])
        steps = {"sft": (SFTObjective(), lambda: live_batch),
                 "kd live teacher": (VanillaKD(teacher, terms, 32), lambda: live_batch),
                 "kd from cache": (CachedKD(terms, [TopKTail(terms.divergences[0])], 32),
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


if __name__ == "__main__":
    main()
