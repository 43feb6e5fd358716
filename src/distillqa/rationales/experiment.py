"""`distillqa rationales experiment`: train a student per (method, rationale type, seed) on
teacher rationales, measure multiple-choice accuracy, and compare with ANOVA / Tukey.

    EXP/
      experiment.yaml, .lock        as in `distillqa experiment` (changed config refused, one runner)
      cells/CELL/                   training run (config, checkpoints, final adapter)
      answers/CELL/predictions.jsonl     answers to the test questions (resumable)
      answers/CELL/explanations.jsonl    explanations of the first `explain_examples` questions
      answers/CELL/accuracy.json         accuracy, correct, unparseable, n
      answers/CELL/study.jsonl           question, choices, predicted answer and explanation, for a human study
      results/runs.json, results/anova.json, plots/accuracy.png, report.md, report.html

Every stage is skipped when done and resumed when not, like the QA experiment. Launched as several
processes (`torchrun --nproc_per_node N -m distillqa.cli rationales experiment ...`), every cell
trains data-parallel; the main process alone holds the lock, answers and writes the report.
"""

from __future__ import annotations

import json
import sys
import time
from functools import partial
from itertools import product
from pathlib import Path
from typing import Callable

import torch

from distillqa.errors import ConfigError
from distillqa.exp_dir import check_config, experiment_lock
from distillqa.io import read_jsonl, write_json, write_jsonl
from distillqa.processes import processes
from distillqa.rationales.config import RationaleCellConfig, RationaleExperimentConfig
from distillqa.rationales.data import RationaleExample, read_rationales
from distillqa.rationales.tasks import TaskPrompts, WeightedTaskCE, collate_tasks, parse_answer, task_weights, training_items
from distillqa.train.run_dir import RunDir

ANSWER_TOKENS = 16  # "The answer is <choice>." fits easily
STATS_ONLY = ("iqr_outlier",)  # config keys that may change between runs: the statistics are recomputed


def rationale_cell_name(method: str, rationale_type: str, seed: int) -> str:
    return f"{method.replace('+', '-')}_{rationale_type}_seed{seed}"


def load_data(cfg: RationaleExperimentConfig) -> tuple[list[RationaleExample], list[RationaleExample]]:
    for key in ("train_file", "eval_file"):
        if not getattr(cfg, key):
            raise ConfigError(f"{key}: required, e.g. --set {key}=PATH/cqa-teacher-llama2/"
                              f"{'train' if key == 'train_file' else 'test'}.jsonl")
    train = read_rationales(cfg.train_file, cfg.max_train_examples)
    test = read_rationales(cfg.eval_file, cfg.max_eval_examples)
    if any(m != "mt" for m in cfg.methods) and not any(ex.counterfactuals for ex in train):
        raise ConfigError(f"methods cf and mt+cf need counterfactual rationales, but {cfg.train_file} has none; "
                          "use methods=[mt] or generate them")
    if "revised" in cfg.rationale_types and not any(ex.revised_rationale for ex in train):
        raise ConfigError(f"rationale type 'revised' needs revised rationales, but {cfg.train_file} has none; "
                          "use rationale_types=[unrevised] or generate them")
    return train, test


def train_cell(cfg: RationaleExperimentConfig, path: Path, prompts: TaskPrompts, tok, train: list[RationaleExample],
               method: str, rationale_type: str, seed: int) -> None:
    from distillqa.models.lora import apply_lora
    from distillqa.models.registry import load_model
    from distillqa.train.loop import train as train_loop
    from distillqa.train.run_dir import save_final

    weights = task_weights(method, cfg.alpha, cfg.beta, cfg.gamma)
    items, skipped = training_items(prompts, train, weights, rationale_type, seed)
    # Only what shapes the training: keys that change the statistics alone may differ on resume.
    stats_defaults = {key: RationaleExperimentConfig.model_fields[key].default for key in STATS_ONLY}
    cell_cfg = RationaleCellConfig(method=method, rationale_type=rationale_type, seed=seed,
                                   experiment=cfg.model_copy(update=stats_defaults))
    run = RunDir.start(path, cell_cfg, "rationale", cfg.student.name, resume=(path / "run.json").is_file(),
                       train_examples=len(items), skipped_too_long=skipped, weights=weights)
    torch.manual_seed(seed)
    model = apply_lora(load_model(cfg.student.name, cfg.student.precision, cfg.student.trust_remote_code), cfg.lora)
    train_loop(model, WeightedTaskCE(weights), items, cfg.train.model_copy(update={"seed": seed}), run,
               partial(collate_tasks, pad_id=tok.pad_token_id, seq2seq=prompts.seq2seq))
    save_final(run, model, tok, lora=cfg.lora.enabled, keep_checkpoints=cfg.train.keep_checkpoints_when_finished)


def answer_cell(cfg: RationaleExperimentConfig, run_path: Path, out: Path, prompts: TaskPrompts, test: list[RationaleExample],
                method: str) -> dict:
    """Answer (and explain) the test questions with a trained cell; returns its accuracy summary."""
    from distillqa.generate import generate_predictions
    from distillqa.models.registry import load_model, load_tokenizer

    model = load_model(str(run_path), cfg.student.precision, cfg.student.trust_remote_code)
    tok = load_tokenizer(str(run_path))
    if torch.cuda.is_available():
        model.to("cuda")
    qa = [TaskPrompts.as_qa(ex) for ex in test]
    if method == "cf":  # the factual task writes the rationale, then the answer
        preds = generate_predictions(model, tok, prompts.builders["factual"], qa, cfg.generation,
                                     out / "predictions.jsonl", desc=f"answer {out.name}")
        explanations = {r["id"]: r["prediction"].split("So the answer is")[0].strip() for r in read_jsonl(preds)}
    else:
        answer_gen = cfg.generation.model_copy(update={"max_new_tokens": min(ANSWER_TOKENS, cfg.generation.max_new_tokens)})
        preds = generate_predictions(model, tok, prompts.builders["answer"], qa, answer_gen, out / "predictions.jsonl",
                                     desc=f"answer {out.name}")
        explained = generate_predictions(model, tok, prompts.builders["explain"], qa[: cfg.explain_examples], cfg.generation,
                                         out / "explanations.jsonl", desc=f"explain {out.name}")
        explanations = {r["id"]: r["prediction"] for r in read_jsonl(explained)}
    by_id = {ex.id: ex for ex in test}
    rows, correct, unparseable, too_long = [], 0, 0, 0
    for r in read_jsonl(preds):
        ex = by_id[r["id"]]
        said = parse_answer(r["prediction"], ex.choices)
        too_long += "note" in r  # prompt did not fit prompt.max_length: an empty answer
        unparseable += said is None and "note" not in r
        correct += said == ex.answer
        if r["id"] in explanations:
            rows.append({"id": ex.id, "question": ex.question, "choices": list(ex.choices), "gold": ex.answer,
                         "predicted": said, "explanation": explanations[r["id"]]})
    write_jsonl(out / "study.jsonl", rows)
    summary = {"n": len(test), "correct": correct, "accuracy": correct / len(test), "unparseable": unparseable,
               "prompt_too_long": too_long}
    write_json(out / "accuracy.json", summary)
    return summary


def run_rationale_experiment(cfg: RationaleExperimentConfig, echo: Callable[[str], None] | None = None) -> Path:
    from distillqa.models.registry import is_encoder_decoder_model, load_tokenizer
    from distillqa.rationales.report import write_rationale_report

    echo = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    exp = Path(cfg.output_dir)
    train, test = load_data(cfg)
    tok = load_tokenizer(cfg.student.name, cfg.student.trust_remote_code)
    seq2seq = is_encoder_decoder_model(cfg.student.name, cfg.student.trust_remote_code)
    if not seq2seq and cfg.generation.max_new_tokens >= cfg.prompt.max_length:
        raise ConfigError(f"generation.max_new_tokens ({cfg.generation.max_new_tokens}) must be below prompt.max_length "
                          f"({cfg.prompt.max_length}): a causal student's prompt and answer share that length")
    prompts = TaskPrompts(tok, cfg.prompt.template, cfg.prompt.max_length, seq2seq=seq2seq)
    cells = list(product(cfg.methods, cfg.rationale_types, cfg.seeds))
    launch = processes()
    if not launch.is_main_process:  # the others of a data-parallel launch (torchrun) train every cell with it
        for method, rtype, seed in cells:
            if not RunDir(run_path := exp / "cells" / rationale_cell_name(method, rtype, seed)).finished:
                train_cell(cfg, run_path, prompts, tok, train, method, rtype, seed)
        launch.wait_for_everyone()  # until the main process has written the results
        return exp
    with experiment_lock(exp):
        check_config(exp, cfg, mutable=STATS_ONLY)
        started = time.monotonic()

        def progress(k: int, stage: str) -> None:
            echo(f"[rationales] cells {k}/{len(cells)} done, {(time.monotonic() - started) / 60:.1f} min: {stage}")

        runs = []
        for k, (method, rtype, seed) in enumerate(cells):
            name = rationale_cell_name(method, rtype, seed)
            run_path, out = exp / "cells" / name, exp / "answers" / name
            if not RunDir(run_path).finished:
                progress(k, f"train {name}")
                train_cell(cfg, run_path, prompts, tok, train, method, rtype, seed)
            if not (out / "accuracy.json").is_file():
                progress(k, f"answer {name}")
                answer_cell(cfg, run_path, out, prompts, test, method)
            runs.append({"cell": name, "method": method, "rationale_type": rtype, "seed": seed,
                         **json.loads((out / "accuracy.json").read_text())})
        write_json(exp / "results" / "runs.json", runs)
        report = write_rationale_report(exp)
    launch.wait_for_everyone()
    echo(f"[rationales] {len(cells)} cells done in {(time.monotonic() - started) / 60:.1f} min; report: {report}")
    return exp

