"""Cost of a distillation step against its parts, on one 4x256 batch, for real models.

For each (teacher, algorithm) it prints: teacher forward (no grad, answer logits included),
student SFT step (LoRA r=16; forward, backward, optimizer), KD step (the KD objective: teacher
forward + student step), and the peak memory of each. Every phase runs in a fresh process, so
its peak is its own: on CPU the peak resident set size after loading the models (VmHWM, reset
once they are loaded), on GPU the peak allocated memory. Ratios:
  time   = KD step / (teacher forward + SFT step)
  memory = KD peak / peak of (teacher forward, then SFT step, in one process)

    python benchmarks/kd_step.py [--batch 4] [--length 256] [--answer-tokens 32] [--steps 2] [--chunk 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

STUDENT = "smollm2-135m@layers=angular:22"
CASES = [("smollm2-135m", "vanilla"), ("smollm2-135m", "dskd"), ("gemma3-270m", "dskd-cma"), ("gemma3-270m", "uld")]
PHASES = ("teacher", "sft", "teacher+sft", "kd")


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


def random_batch(vocab: int, batch: int, length: int, answer: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(vocab, 30000), (batch, length), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def measure(teacher_name: str, algorithm: str, phase: str, a) -> dict:
    from distillqa.config import KDConfig, LoraConfig
    from distillqa.models.lora import apply_lora
    from distillqa.models.registry import load_model
    from distillqa.train.distill import make_objective
    from distillqa.train.objectives import SFTObjective, answer_states, project_to_vocab

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = apply_lora(load_model(STUDENT), LoraConfig()).to(device) if phase != "teacher" else None
    teacher = load_model(teacher_name).eval().requires_grad_(False).to(device) if phase != "sft" else None
    batch = random_batch(49152, a.batch, a.length, a.answer_tokens, seed=0)
    teacher_batch = batch if algorithm in ("vanilla", "dskd") else random_batch(262144, a.batch, a.length, a.answer_tokens, seed=1)
    batch = {**batch, **{f"teacher_{k}": v for k, v in teacher_batch.items()}}
    batch = {k: v.to(device) for k, v in batch.items()}
    teacher_batch = {k: v.to(device) for k, v in teacher_batch.items()}

    @torch.no_grad()
    def teacher_forward():
        hidden, _ = answer_states(teacher, teacher_batch)
        for start in range(0, hidden.shape[0], a.chunk):  # the answer logits, as the KD objectives compute them
            project_to_vocab(teacher, hidden[start : start + a.chunk])

    def student_step(objective):
        params = [p for p in student.parameters() if p.requires_grad] + [p for p in objective.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def run():
            loss, _ = objective(student, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    if phase == "teacher":
        fn = teacher_forward
    elif phase == "sft":
        fn = student_step(SFTObjective())
    elif phase == "teacher+sft":
        sft = student_step(SFTObjective())

        def fn():
            teacher_forward()
            sft()
    else:
        fn = student_step(make_objective(KDConfig(algorithm=algorithm, chunk_size=a.chunk), teacher, student).to(device))
    reset_peak()
    fn()  # warm-up, included in the peak (optimizer state is allocated here)
    t0 = time.perf_counter()
    for _ in range(a.steps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return {"seconds": (time.perf_counter() - t0) / a.steps, "peak_mib": peak_mib(), "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(*a.child, a)))
        return
    opts = ["--batch", str(a.batch), "--length", str(a.length), "--answer-tokens", str(a.answer_tokens),
            "--steps", str(a.steps), "--chunk", str(a.chunk)]
    print(f"batch {a.batch}x{a.length}, {a.answer_tokens} answer tokens per row, student {STUDENT} (LoRA r=16), "
          f"chunk {a.chunk}, mean of {a.steps} steps after 1 warm-up")
    print(f"{'teacher':13s} {'algorithm':9s} {'T fwd s':>7s} {'SFT s':>6s} {'KD s':>6s} {'time x':>6s} | "
          f"{'T fwd MiB':>9s} {'SFT MiB':>8s} {'T+SFT MiB':>9s} {'KD MiB':>7s} {'mem x':>6s}")
    for teacher_name, algorithm in CASES:
        r = {}
        for phase in PHASES:
            out = subprocess.run([sys.executable, __file__, "--child", teacher_name, algorithm, phase, *opts],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{teacher_name} {algorithm} {phase} failed:\n{out.stderr[-2000:]}")
            r[phase] = json.loads(out.stdout.strip().splitlines()[-1])
        t, s, ts, kd = (r[p] for p in PHASES)
        print(f"{teacher_name:13s} {algorithm:9s} {t['seconds']:7.2f} {s['seconds']:6.2f} {kd['seconds']:6.2f} "
              f"{kd['seconds'] / (t['seconds'] + s['seconds']):6.2f} | {t['peak_mib']:9.0f} {s['peak_mib']:8.0f} "
              f"{ts['peak_mib']:9.0f} {kd['peak_mib']:7.0f} {kd['peak_mib'] / ts['peak_mib']:6.2f}")
    print(f"device: {r['kd']['device']}")


if __name__ == "__main__":
    main()
