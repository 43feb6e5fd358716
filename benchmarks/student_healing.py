"""Does the default student work? Zero-shot ROUGE-L of the layer-pruned student before and after
healing, next to its parent's, on the bundled sample's test questions, and healing throughput.

It heals into a temporary directory (the model cache is not touched beyond the converted
parent), then answers all test questions greedily with each model and prints one table:

    python benchmarks/student_healing.py [--parent smollm2-135m] [--layers angular:26] [--steps 40]
                                         [--compare every-other] [--max-new-tokens 24]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from distillqa.config import DataConfig, DeriveConfig, GenerationConfig, HealConfig, PromptConfig
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder
from distillqa.generate import generate_batch
from distillqa.metrics.ngram import rouge
from distillqa.models.derive import bundled_calibration, prune_layers, select_layers
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train.heal import run_heal


def zero_shot(model, tok, examples, max_new_tokens: int) -> float:
    prompt = PromptConfig(max_length=256)
    builder = PromptBuilder(tok, prompt.template, prompt.instruction, prompt.max_length)
    answers = generate_batch(model, tok, [builder.encode_prompt(ex, max_new_tokens) for ex in examples],
                             GenerationConfig(max_new_tokens=max_new_tokens))
    scores = rouge("rougeL")([a for a in answers], [ex.answers for ex in examples])
    return sum(scores) / len(scores)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parent", default="smollm2-135m")
    ap.add_argument("--layers", default="angular:26")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--compare", default="every-other", help="Another layer spec scored unhealed, for reference.")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args()

    test = load_splits(DataConfig())[0]["test"]
    tok, parent = load_tokenizer(args.parent), load_model(args.parent, "fp32")
    results = {"parent": zero_shot(parent, tok, test, args.max_new_tokens)}
    for spec in (args.compare, args.layers):
        keep, _ = select_layers(parent, spec, bundled_calibration(tok))
        pruned = prune_layers(load_model(args.parent, "fp32"), keep)
        results[f"pruned {spec} ({len(keep)} layers), unhealed"] = zero_shot(pruned, tok, test, args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DeriveConfig(parent=args.parent, layers=args.layers, heal=HealConfig(steps=args.steps, eval_examples=0),
                           output_dir=str(Path(tmp) / "healed"))
        started = time.monotonic()
        run = run_heal(cfg)
        seconds = time.monotonic() - started
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        healed = load_model(str(run), "fp32")
        results[f"pruned {args.layers}, healed {args.steps} steps"] = zero_shot(healed, tok, test, args.max_new_tokens)
    rate = sum(r["tokens_per_s"] for r in log) / len(log)
    print(f"zero-shot ROUGE-L on the bundled test split ({len(test)} questions, {args.max_new_tokens} new tokens, greedy)")
    for name, score in results.items():
        print(f"  {name:48s} {score:.3f}  ({score / results['parent']:.2f}x the parent)")
    print(f"healing: {args.steps} steps in {seconds:.0f} s (incl. loading and layer ranking), {rate:.0f} tokens/s while "
          f"training; forward KL {log[0]['kd']:.3f} at step {log[0]['step']} -> {log[-1]['kd']:.3f} at step {log[-1]['step']}")


if __name__ == "__main__":
    main()
