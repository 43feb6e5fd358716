"""SFT step throughput and peak memory for a real model at batch x length tokens (default smollm2-135m, 4x256).

Each mode (LoRA, full fine-tuning) runs in its own subprocess so that peak memory is its own:
on CPU the peak resident set size from the first step on (model loading excluded), on GPU the
peak allocated memory.
Every row has `answer_tokens` labelled tokens at its end, as in QA fine-tuning; the rest is prompt.

    python benchmarks/sft_throughput.py [--model smollm2-135m] [--batch 4] [--length 256] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def reset_peak_rss() -> None:
    """Linux: make VmHWM (peak RSS) restart from the current RSS, so loading does not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(model_name: str, mode: str, batch: int, length: int, steps: int, answer_tokens: int) -> dict:
    import torch

    from distillqa.config import LoraConfig
    from distillqa.data.prompts import IGNORE
    from distillqa.models.lora import apply_lora
    from distillqa.models.registry import load_model
    from distillqa.train.objectives import SFTObjective

    torch.manual_seed(0)
    model = apply_lora(load_model(model_name), LoraConfig(enabled=(mode == "lora")))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(100, 20000, (batch, length), device=device)
    labels = torch.full_like(ids, IGNORE)
    labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
    batch_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    objective = SFTObjective()

    def step():
        loss, _ = objective(model, batch_t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    loaded = rss_mib()
    reset_peak_rss()
    step()  # warm-up (allocates optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mib()
    return {"mode": mode, "trainable_params": sum(p.numel() for p in params), "s_per_step": dt,
            "tokens_per_s": batch * length / dt, "peak_mib": peak, "after_load_mib": loaded, "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--answer-tokens", type=int, default=32)
    ap.add_argument("--child", choices=["lora", "full"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.model, a.child, a.batch, a.length, a.steps, a.answer_tokens)))
        return
    print(f"SFT step, {a.model}, {a.batch}x{a.length} tokens ({a.answer_tokens} labelled per row), mean of {a.steps} steps after 1 warm-up")
    print(f"{'mode':6s} {'trainable':>12s} {'s/step':>8s} {'tokens/s':>9s} {'peak MiB':>9s} {'after load':>10s}")
    rows = []
    for mode in ("lora", "full"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--model", a.model, "--batch", str(a.batch),
                              "--length", str(a.length), "--steps", str(a.steps), "--answer-tokens", str(a.answer_tokens)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"{r['mode']:6s} {r['trainable_params']:>12,d} {r['s_per_step']:>8.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['peak_mib']:>9.0f} {r['after_load_mib']:>10.0f}")
    print(f"full / LoRA step time: {rows[1]['s_per_step'] / rows[0]['s_per_step']:.2f}x  (device: {rows[0]['device']})")


if __name__ == "__main__":
    main()
