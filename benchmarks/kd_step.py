"""Cost of a distillation step against its parts, on one 4x256 batch, for real models.

For each (teacher, algorithm) it prints, measured in one process on the same batch:
teacher forward (no grad), student SFT step (LoRA, forward + backward + optimizer), KD step
(teacher forward + student step with the KD objective), and the peak memory of each phase.
Ratios: KD step / (teacher forward + SFT step), and KD peak / peak of (teacher forward then SFT step).

    python benchmarks/kd_step.py [--batch 4] [--length 256] [--answer-tokens 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

STUDENT = "smollm2-135m@layers=every-other"
CASES = [("smollm2-135m", "vanilla"), ("smollm2-135m", "dskd"), ("gemma3-270m", "dskd-cma"), ("gemma3-270m", "uld")]


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # Linux: VmHWM restarts from the current RSS
            f.write("5")


def peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def timed(fn, steps: int) -> tuple[float, float]:
    fn()  # warm-up
    reset_peak()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps, peak_mib()


def random_batch(vocab: int, batch: int, length: int, answer: int, prefix: str = "") -> dict:
    g = torch.Generator().manual_seed(len(prefix))
    ids = torch.randint(100, min(vocab, 30000), (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {prefix + "input_ids": ids, prefix + "attention_mask": torch.ones_like(ids), prefix + "labels": labels}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=64)
    a = ap.parse_args()

    from distillqa.config import KDConfig, LoraConfig
    from distillqa.models.lora import apply_lora
    from distillqa.models.registry import load_model
    from distillqa.train.distill import make_objective
    from distillqa.train.objectives import SFTObjective, answer_states, project_to_vocab

    torch.manual_seed(0)
    print(f"batch {a.batch}x{a.length}, {a.answer_tokens} answer tokens per row, student {STUDENT} (LoRA r=16), "
          f"chunk {a.chunk}, mean of {a.steps} steps after 1 warm-up, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"{'teacher':14s} {'algorithm':9s} {'T fwd s':>8s} {'SFT s':>7s} {'KD s':>7s} {'ratio':>6s} | "
          f"{'T fwd MiB':>9s} {'SFT MiB':>8s} {'T+SFT MiB':>9s} {'KD MiB':>8s} {'ratio':>6s}")
    student = apply_lora(load_model(STUDENT), LoraConfig())
    teacher, loaded = None, None
    for teacher_name, algorithm in CASES:
        if teacher_name != loaded:  # one teacher in memory at a time, so peaks are comparable
            teacher = None
            gc.collect()
            teacher, loaded = load_model(teacher_name).eval().requires_grad_(False), teacher_name
        batch = random_batch(student.config.vocab_size, a.batch, a.length, a.answer_tokens)
        batch.update(random_batch(teacher.config.vocab_size, a.batch, a.length, a.answer_tokens, "teacher_"))
        if algorithm in ("vanilla", "dskd"):
            batch.update({f"teacher_{k}": batch[k] for k in ("input_ids", "attention_mask", "labels")})
        objective = make_objective(KDConfig(algorithm=algorithm, chunk_size=a.chunk), teacher, student)
        params = [p for p in student.parameters() if p.requires_grad] + [p for p in objective.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        teacher_batch = {k.removeprefix("teacher_"): v for k, v in batch.items() if k.startswith("teacher_")}

        @torch.no_grad()
        def teacher_forward():
            hidden, _ = answer_states(teacher, teacher_batch)
            for start in range(0, hidden.shape[0], a.chunk):  # the teacher's answer logits, as KD computes them
                project_to_vocab(teacher, hidden[start : start + a.chunk])

        def step(obj):
            def run():
                loss, _ = obj(student, batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return run

        sft = SFTObjective()
        t_fwd, m_fwd = timed(teacher_forward, a.steps)
        t_sft, m_sft = timed(step(sft), a.steps)
        reset_peak()
        teacher_forward()
        step(sft)()
        m_both = peak_mib()
        t_kd, m_kd = timed(step(objective), a.steps)
        print(f"{teacher_name:14s} {algorithm:9s} {t_fwd:8.2f} {t_sft:7.2f} {t_kd:7.2f} {t_kd / (t_fwd + t_sft):6.2f} | "
              f"{m_fwd:9.0f} {m_sft:8.0f} {m_both:9.0f} {m_kd:8.0f} {m_kd / m_both:6.2f}")


if __name__ == "__main__":
    main()
