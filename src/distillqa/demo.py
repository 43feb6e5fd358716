"""`distillqa demo`: LoRA-SFT a model on the bundled telecom sample, answer the test split
before and after, and compare ROUGE-L and token F1.

Each stage is skipped when its output already exists, so an interrupted demo continues.
"""

from __future__ import annotations

from pathlib import Path

from distillqa.config import DemoConfig, EvaluateConfig, GenerateConfig, SFTConfig
from distillqa.generate import run_generate
from distillqa.io import write_text
from distillqa.metrics.evaluate import evaluate_predictions
from distillqa.train.sft import run_sft

SHOWN = ("rouge_l", "token_f1", "exact_match", "bleu_4")


def run_demo(cfg: DemoConfig) -> dict[str, dict]:
    out = Path(cfg.output_dir)
    shared = dict(data=cfg.data, prompt=cfg.prompt)
    sft_dir = out / "sft"
    run_sft(SFTConfig(model=cfg.model, lora=cfg.lora, train=cfg.train, output_dir=str(sft_dir), **shared),
            resume=(sft_dir / "run.json").is_file())
    summaries = {}
    for label, model in (("base", cfg.model), ("sft", cfg.model.model_copy(update={"name": str(sft_dir)}))):
        gen = GenerateConfig(model=model, generation=cfg.generation, output_dir=str(out / f"answers-{label}"), **shared)
        summaries[label] = evaluate_predictions(run_generate(gen), EvaluateConfig(metrics=",".join(SHOWN)))
    write_text(out / "results.md", results_table(summaries, cfg.model.name))
    return summaries


def results_table(summaries: dict[str, dict], model: str) -> str:
    lines = [f"# distillqa demo: {model}, before and after LoRA SFT", "",
             "| model | n | " + " | ".join(SHOWN) + " |", "|---|---|" + "---|" * len(SHOWN)]
    for label, s in summaries.items():
        cells = []
        for name in SHOWN:
            m = s["metrics"][name]
            cells.append(f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]")
        lines.append(f"| {label} | {s['n']} | " + " | ".join(cells) + " |")
    lines += ["", "Means with 95% bootstrap confidence intervals over the test questions."]
    return "\n".join(lines) + "\n"
