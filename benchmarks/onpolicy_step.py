"""Cost of an on-policy KD step against the supervised KD step, for real models, in one process.

One batch of training prompts of the bundled sample (encoded as `distill` encodes them). The
supervised step is the KD objective on the reference answers (forward, backward, optimizer step);
the on-policy step is `OnPolicyKD`'s: the student samples every answer (`with_student_answers`,
through generate.generate_ids), then the same objective trains on them. The two alternate step by
step (after one warm-up each), so a shared machine slows both alike. Printed per (teacher,
algorithm): seconds per supervised step, per on-policy step and its sampling part, their ratio,
and the mean answer tokens trained on (references vs samples; sampling stops at the end-of-sequence
token or --new-tokens).

    python benchmarks/onpolicy_step.py [--batch 4] [--new-tokens 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import time
from statistics import mean

import torch

STUDENT = "smollm2-135m@layers=angular:26"
CASES = [("smollm2-135m", "vanilla"), ("gemma3-270m", "dskd-cma"), ("gemma3-270m", "uld")]


def answer_tokens(batch: dict) -> float:
    return (batch["labels"] != -100).sum().item() / batch["labels"].shape[0]


def measure(teacher_name: str, algorithm: str, a) -> dict:
    from distillqa.config import KDConfig, LoraConfig
    from distillqa.data import load_examples
    from distillqa.data.prompts import PromptBuilder, collate_pairs
    from distillqa.models.lora import apply_lora
    from distillqa.models.registry import load_model, load_tokenizer
    from distillqa.models.traits import same_tokenizer
    from distillqa.train.distill import make_objective
    from distillqa.train.onpolicy import OnPolicyKD

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok_s, tok_t = load_tokenizer(STUDENT), load_tokenizer(teacher_name)
    build_s, build_t = PromptBuilder(tok_s, max_length=256), PromptBuilder(tok_t, max_length=256)
    same = same_tokenizer(tok_s, tok_t)
    examples = load_examples("bundled:telecom-sample")[0][: a.batch]
    items = [(build_s.encode_train(ex), build_t.encode_train(ex)) for ex in examples]
    batch = collate_pairs([(s, s) for s, _ in items] if same else items, tok_s.pad_token_id, tok_t.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}

    student = apply_lora(load_model(STUDENT), LoraConfig()).to(device)
    cfg = KDConfig(algorithm=algorithm, lmbda=1, sample_max_new_tokens=a.new_tokens)
    objective = make_objective(cfg, load_model(teacher_name), student).to(device)
    on_policy = OnPolicyKD(objective, cfg, tok_s, None if same else build_t)
    params = [p for p in [*student.parameters(), *objective.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    student.train()

    def sync() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def train_step(b: dict) -> float:
        t0 = sync()
        loss, _ = objective(student, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sync() - t0

    def on_policy_step(seed: int) -> tuple[float, float, float]:
        t0 = sync()
        sampled = on_policy.with_student_answers(student, batch, seed)
        sampling = sync() - t0
        return sampling + train_step(sampled), sampling, answer_tokens(sampled)

    train_step(batch), on_policy_step(seed=0)  # warm-up
    supervised, steps = [], []
    for seed in range(1, a.steps + 1):
        supervised.append(train_step(batch))
        steps.append(on_policy_step(seed))
    return {"supervised": mean(supervised), "on_policy": mean([s[0] for s in steps]), "sampling": mean([s[1] for s in steps]),
            "reference_tokens": answer_tokens(batch), "sampled_tokens": mean([s[2] for s in steps]), "device": device}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    print(f"batch {a.batch} bundled-sample prompts (max length 256), student {STUDENT} (LoRA r=16), samples of at most "
          f"{a.new_tokens} new tokens (temperature 1), mean of {a.steps} alternating steps after 1 warm-up each")
    print(f"{'teacher':13s} {'algorithm':9s} {'KD s':>6s} {'on-pol s':>8s} {'sample s':>8s} {'ratio':>6s} | "
          f"{'ref tok':>7s} {'sampled tok':>11s}")
    for teacher_name, algorithm in CASES:
        r = measure(teacher_name, algorithm, a)
        print(f"{teacher_name:13s} {algorithm:9s} {r['supervised']:6.2f} {r['on_policy']:8.2f} {r['sampling']:8.2f} "
              f"{r['on_policy'] / r['supervised']:6.2f} | {r['reference_tokens']:7.1f} {r['sampled_tokens']:11.1f}")
    print(f"device: {r['device']}")


if __name__ == "__main__":
    main()
