"""Healing a layer-pruned student: distil it from its parent over every token of a corpus.

A pruned model writes gibberish until the layers around the gap learn to work together
again. Healing trains all of its weights to match the parent's next-token distribution
(`VanillaKD` with one forward-KL term and no CE) at every position of the corpus, prompt tokens
included, in the one training loop: resumable, checkpointed, logged (`log.jsonl` is the
healing curve). The run directory records the kept layers, how they were chosen, and a
zero-shot ROUGE-L on validation questions; its final model is the healed student.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from functools import partial
from pathlib import Path

import torch

from distillqa.config import DataConfig, DeriveConfig, GenerationConfig, HealConfig, PromptConfig, TrainConfig
from distillqa.data import load_splits
from distillqa.data.prompts import Encoded, PromptBuilder, collate_right
from distillqa.data.readers import iter_json_lines
from distillqa.errors import DataError
from distillqa.models.derive import prune_layers, select_layers
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.processes import processes
from distillqa.train.kd import VanillaKD
from distillqa.train.loop import train
from distillqa.train.losses import ForwardKL, LossTerms
from distillqa.train.run_dir import RunDir, save_final

log = logging.getLogger(__name__)


def _pieces(ids: list[int], width: int, source: str) -> list[Encoded]:
    return [Encoded(f"{source}:{i}", ids[i : i + width], ids[i : i + width]) for i in range(0, len(ids), width)
            if len(ids[i : i + width]) > 1]


PARENT_ANSWERS = "parent-answers"


def _all_tokens(encoded: list[Encoded | None]) -> list[Encoded]:
    return [Encoded(e.id, e.input_ids, e.input_ids) for e in encoded if e]


def healing_corpus(heal: HealConfig, data: DataConfig, prompt: PromptConfig, tok) -> list[Encoded]:
    """The corpus as token sequences whose labels are every token (so every position is distilled).

    For `parent-answers` these are the `train` sequences: `run_heal` replaces their answers with
    the parent's, which are fixed by the parent and these prompts (so the cache key stays exact)."""
    if heal.corpus in ("train", PARENT_ANSWERS):
        builder = PromptBuilder(tok, prompt.template, prompt.instruction, heal.max_length)
        out = _all_tokens([builder.encode_train(ex) for ex in load_splits(data)[0]["train"]])
    else:
        path = Path(heal.corpus).expanduser()
        if not path.is_file():
            raise DataError(str(path), None, None, f"heal.corpus is not a file (use 'train', '{PARENT_ANSWERS}', a .txt "
                            "file or a .jsonl file)")
        out = []
        if path.suffix == ".jsonl":
            for line, row in iter_json_lines(path):
                text = row.get("text")
                if not isinstance(text, str) or not text.strip():
                    raise DataError(str(path), f"line {line}", "text", "missing or not a non-empty string")
                out += _pieces(tok(text)["input_ids"], heal.max_length, f"line{line}")
        else:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(str(path), None, None, f"not UTF-8 text (byte {e.start})") from None
            out = _pieces(tok(text)["input_ids"], heal.max_length, path.name)
    if not out:
        raise DataError(heal.corpus, None, None, "heal.corpus holds no text to heal on")
    return out


def corpus_hash(corpus: list[Encoded]) -> str:
    h = hashlib.sha256()
    for e in corpus:
        h.update(json.dumps(e.input_ids).encode())
    return h.hexdigest()


def heal_key(parent: str, layers: str, heal: HealConfig, corpus: list[Encoded]) -> str:
    """Identifies a healed student: parent, layer choice, corpus and budget (for caching)."""
    spec = json.dumps({"parent": parent, "layers": layers, "heal": heal.model_dump(mode="json"),
                       "corpus": corpus_hash(corpus)}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def run_heal(cfg: DeriveConfig, resume: bool = False, corpus: list[Encoded] | None = None) -> Path:
    """Prune `cfg.parent` to `cfg.layers` and heal it for `cfg.heal.steps` steps into the run
    directory `cfg.output_dir`; returns it. `corpus` skips re-encoding when the caller has it."""
    heal = cfg.heal
    tok = load_tokenizer(cfg.parent.name, cfg.parent.trust_remote_code)
    corpus = corpus if corpus is not None else healing_corpus(heal, cfg.data, cfg.prompt, tok)
    run = RunDir.open(cfg.output_dir, cfg, kind="heal", base_model=cfg.parent.name, resume=resume)
    if run.finished:
        return run.path
    parent = load_model(cfg.parent.name, "fp32", cfg.parent.trust_remote_code)
    launch = processes()
    # The main process writes the parent's answers and chooses the layers; the others then read both.
    with launch.main_process_first():
        if heal.corpus == PARENT_ANSWERS:
            corpus = parent_answers(parent, tok, cfg, run.path / "parent_answers.jsonl")
        if "layers" not in run.info:  # a resumed run keeps the layers chosen when it started
            calibration = [collate_right(corpus[i : i + 8], tok.pad_token_id)
                           for i in range(0, min(len(corpus), heal.calibration_examples), 8)]
            keep, how = select_layers(parent, cfg.layers, calibration)
            run.update(layers=keep, layer_choice=how, corpus_sequences=len(corpus), corpus_sha256=corpus_hash(corpus))
    student = prune_layers(copy.deepcopy(parent), run.info["layers"])
    objective = VanillaKD(parent, LossTerms(0.0, [(1.0, ForwardKL())]), chunk=heal.chunk_size)
    train_cfg = TrainConfig(max_steps=heal.steps, batch_size=heal.batch_size, lr=heal.lr, schedule="cosine",
                            seed=heal.seed, checkpoint_every=heal.checkpoint_every, log_every=5)
    train(student, objective, corpus, train_cfg, run, partial(collate_right, pad_id=tok.pad_token_id))
    if heal.eval_examples and launch.is_main_process:
        run.update(zero_shot=zero_shot_rouge(student, tok, cfg.data, cfg.prompt, heal.eval_examples))
    save_final(run, student, tok, lora=False)
    return run.path


def parent_answers(parent, tok, cfg: DeriveConfig, path: Path) -> list[Encoded]:
    """The training prompts with the parent's greedy answers, generated once into `path` (a
    killed run continues from its last finished batch), each as one all-token sequence."""
    from distillqa.generate import stored_answers

    builder = PromptBuilder(tok, cfg.prompt.template, cfg.prompt.instruction, cfg.heal.max_length)
    examples = load_splits(cfg.data)[0]["train"]
    answers = stored_answers(cfg.parent.name, lambda: parent, tok, builder, examples, cfg.heal.answer_tokens, path,
                             desc="parent answers")
    corpus = _all_tokens([builder.encode_train(ex, answers[ex.id]) for ex in examples if answers[ex.id]])
    if not corpus:
        raise DataError(str(path), None, None, "the parent answered none of the training prompts")
    return corpus


def zero_shot_rouge(model, tok, data: DataConfig, prompt: PromptConfig, count: int) -> dict:
    """Mean ROUGE-L of greedy answers to the first `count` validation questions."""
    from distillqa.generate import generate_batch
    from distillqa.metrics.ngram import rouge

    examples = load_splits(data)[0]["validation"][:count]
    builder = PromptBuilder(tok, prompt.template, prompt.instruction, prompt.max_length)
    gen = GenerationConfig(max_new_tokens=32)
    pairs = [(ex, p) for ex in examples if (p := builder.encode_prompt(ex, gen.max_new_tokens))]
    if not pairs:
        return {"questions": 0}
    answers = generate_batch(model, tok, [p for _, p in pairs], gen)
    scores = rouge("rougeL")(answers, [ex.answers for ex, _ in pairs])
    return {"split": "validation", "questions": len(pairs), "rouge_l": sum(scores) / len(scores)}
