"""Cost of a distillation step against its floor, on one batch of real models.

For each (teacher, algorithm) and each answer length (192 tokens per row: the long-answer setting of
rationales and explanations; 32: short answers) it prints: teacher forward (no grad, answer logits
included), student SFT step (forward, backward, optimizer; LoRA r=16, or all weights with --full), KD step
(the KD objective: teacher forward + student step), and the peak memory of each. Ratios:
  time   = median KD step / median (teacher forward + SFT step), and the lowest and highest of each round's own ratio
  memory = KD peak / peak of (teacher forward, then SFT step, in one process)
For vanilla KD, with TRL installed (`pip install -e '.[bench]'`), the same step with TRL's
`DistillationTrainer` loss (`_chunked_divergence_loss`, the function its `compute_loss` calls: generalized
JSD at beta 0, i.e. forward KL, over the completion tokens, without a CE term) and its ratio to the floor.
Times come from one process per case that runs the three phases in turn, --steps rounds after a
warm-up round, so that a busy machine slows them alike; the medians are over the rounds. Peaks come
from a fresh process per phase, so each is its own: on CPU the peak resident set size after loading
the models (VmHWM, reset once they are loaded), on GPU the peak allocated memory.

    python benchmarks/kd_step.py [--answer-tokens 192 32] [--algorithms vanilla dskd dskd-cma uld]
                                 [--batch 4] [--length 256] [--steps 5] [--chunk 128] [--full]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time

import torch

STUDENT = "smollm2-135m@layers=angular:26"
TEACHERS = {"vanilla": "smollm2-135m", "dskd": "smollm2-135m", "dskd-cma": "gemma3-270m", "uld": "gemma3-270m"}


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


def phases(algorithm: str, answer_tokens: int, wanted: tuple[str, ...], a) -> dict:
    """The step functions in `wanted` ("teacher", "sft", "kd"), each a callable running one step."""
    from distillqa.config import KDConfig, LoraConfig
    from distillqa.models.lora import apply_lora
    from distillqa.models.registry import load_model
    from distillqa.train.distill import make_objective
    from distillqa.train.objectives import SFTObjective, answer_states, causal_lm_parts, project_to_vocab

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = apply_lora(load_model(STUDENT), LoraConfig(enabled=not a.full)).to(device)
    teacher = load_model(TEACHERS[algorithm]).eval().requires_grad_(False).to(device)
    batch = random_batch(49152, a.batch, a.length, answer_tokens, seed=0)
    teacher_batch = batch if algorithm in ("vanilla", "dskd") else random_batch(262144, a.batch, a.length, answer_tokens, seed=1)
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

    def trl_step():
        """TRL's distillation loss on the same batch: both backbones, then its chunked divergence over the answer positions."""
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-5)
        (backbone_s, head_s, cap_s), (backbone_t, head_t, cap_t) = causal_lm_parts(student), causal_lm_parts(teacher)
        ids, mask = batch["input_ids"], batch["attention_mask"]

        def run():
            hidden_s = backbone_s(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -answer_tokens:]
            with torch.no_grad():
                hidden_t = backbone_t(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][:, -answer_tokens:]
            loss, _, _ = _chunked_divergence_loss(
                hidden_s, hidden_t, head_s.weight, head_t.weight, torch.ones_like(ids[:, -answer_tokens:]), beta=0.0,
                student_final_logit_softcapping=cap_s, teacher_final_logit_softcapping=cap_t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    make = {"teacher": lambda: teacher_forward, "sft": lambda: student_step(SFTObjective()),
            "kd": lambda: student_step(make_objective(KDConfig(algorithm=algorithm, chunk_size=a.chunk), teacher, student).to(device)),
            "trl": trl_step}
    return {name: make[name]() for name in wanted}


def with_trl(algorithm: str) -> bool:
    """TRL's loss is timed beside vanilla KD (same vocabulary) when TRL is installed."""
    return algorithm == "vanilla" and importlib.util.find_spec("trl") is not None


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def times(algorithm: str, answer_tokens: int, a) -> dict:
    """Seconds of each phase per round: a warm-up round, then --steps rounds of teacher, SFT, KD (and TRL) in turn."""
    steps = phases(algorithm, answer_tokens, ("teacher", "sft", "kd") + (("trl",) if with_trl(algorithm) else ()), a)
    seconds = {name: [] for name in steps}
    for round_ in range(a.steps + 1):
        for name, step in steps.items():
            synchronize()
            t0 = time.perf_counter()
            step()
            synchronize()
            if round_:  # round 0 warms up (allocator, optimizer state)
                seconds[name].append(time.perf_counter() - t0)
    return seconds


def peak(algorithm: str, answer_tokens: int, phase: str, a) -> dict:
    """Peak memory (MiB) of `phase`: "floor" (teacher forward, then SFT step) or "kd", warm-up step included."""
    steps = phases(algorithm, answer_tokens, ("teacher", "sft") if phase == "floor" else ("kd",), a)
    reset_peak()
    for _ in range(2):
        for step in steps.values():
            step()
    return {"peak_mib": peak_mib(), "device": "cuda" if torch.cuda.is_available() else "cpu"}


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args, *sys.argv[1:]], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from distillqa.config import KDConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answer-tokens", type=int, nargs="+", default=[192, 32], help="answer tokens per row, one setting each")
    ap.add_argument("--algorithms", nargs="+", choices=list(TEACHERS), default=list(TEACHERS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds after the warm-up round")
    ap.add_argument("--chunk", type=int, default=KDConfig().chunk_size, help="kd.chunk_size (default: its default)")
    ap.add_argument("--full", action="store_true", help="train all student weights instead of LoRA adapters")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        algorithm, answer_tokens, phase = a.child
        result = times(algorithm, int(answer_tokens), a) if phase == "times" else peak(algorithm, int(answer_tokens), phase, a)
        print(json.dumps(result))
        return
    print(f"batch {a.batch}x{a.length}, student {STUDENT} ({'all weights' if a.full else 'LoRA r=16'}), chunk {a.chunk}, "
          f"medians of {a.steps} interleaved rounds after 1 warm-up")
    if "vanilla" in a.algorithms and not with_trl("vanilla"):
        print("TRL is not installed (pip install -e '.[bench]'): no TRL column")
    print(f"{'teacher':13s} {'algorithm':9s} {'answer':>6s} {'T fwd s':>7s} {'SFT s':>6s} {'KD s':>6s} {'time x':>6s} "
          f"{'rounds x':>9s} | "
          f"{'floor MiB':>9s} {'KD MiB':>7s} {'mem x':>6s} | {'TRL s':>6s} {'TRL x':>6s}")
    for algorithm in a.algorithms:
        for answer_tokens in a.answer_tokens:
            s = child(algorithm, str(answer_tokens), "times")
            floor_s = [t + f for t, f in zip(s["teacher"], s["sft"])]
            floor, kd = (child(algorithm, str(answer_tokens), phase) for phase in ("floor", "kd"))
            teacher_s, sft_s, kd_s = (statistics.median(s[name]) for name in ("teacher", "sft", "kd"))
            rounds = [k / f for k, f in zip(s["kd"], floor_s)]  # each round's KD step / its floor: the spread the medians hide
            trl = (f"{statistics.median(s['trl']):6.2f} {statistics.median(s['trl']) / statistics.median(floor_s):6.2f}"
                   if "trl" in s else f"{'-':>6s} {'-':>6s}")
            print(f"{TEACHERS[algorithm]:13s} {algorithm:9s} {answer_tokens:6d} {teacher_s:7.2f} {sft_s:6.2f} {kd_s:6.2f} "
                  f"{kd_s / statistics.median(floor_s):6.2f} {min(rounds):4.2f}-{max(rounds):4.2f} | {floor['peak_mib']:9.0f} {kd['peak_mib']:7.0f} "
                  f"{kd['peak_mib'] / floor['peak_mib']:6.2f} | {trl}")
    print(f"device: {kd['device']}")


if __name__ == "__main__":
    main()
