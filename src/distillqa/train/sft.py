"""`distillqa sft`: supervised fine-tuning (cross-entropy on answer tokens) as the loop's first objective."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from distillqa.config import SFTConfig
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder, collate_right
from distillqa.errors import DataError
from distillqa.models.lora import apply_lora
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train.loop import train, validation_examples
from distillqa.train.objectives import SFTObjective
from distillqa.train.run_dir import RunDir, save_final


def encode_split(builder: PromptBuilder, examples) -> tuple[list, int]:
    """Encode training examples; returns (encoded, number skipped because they cannot fit)."""
    encoded = [builder.encode_train(ex) for ex in examples]
    kept = [e for e in encoded if e is not None]
    return kept, len(encoded) - len(kept)


def run_sft(cfg: SFTConfig, resume: bool = False) -> Path:
    """Fine-tune `cfg.model` on the training split; returns the finished run directory."""
    # Data and tokenizer first: bad input fails before a run directory is created.
    splits, report = load_splits(cfg.data)
    tok = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code)
    builder = PromptBuilder(tok, cfg.prompt.template, cfg.prompt.instruction, cfg.prompt.max_length)
    data, skipped = encode_split(builder, splits["train"])
    validation, _ = encode_split(builder, validation_examples(splits, cfg.train))
    if not data:  # before the run directory exists: a failed start leaves nothing behind
        raise DataError(cfg.data.source, None, None, f"none of the {skipped} training examples fits prompt.max_length "
                        f"({cfg.prompt.max_length} tokens) even without its context; raise prompt.max_length")
    run = RunDir.start(cfg.output_dir, cfg, "sft", cfg.model.name, resume, data=report.summary(), train_examples=len(data),
                       skipped_too_long=skipped)
    if run.finished:
        return run.path
    torch.manual_seed(cfg.train.seed)  # new weights (LoRA, projectors) start the same in every run
    model = apply_lora(load_model(cfg.model.name, cfg.model.precision, cfg.model.trust_remote_code), cfg.lora)
    train(model, SFTObjective(), data, cfg.train, run, partial(collate_right, pad_id=tok.pad_token_id), validation=validation)
    save_final(run, model, tok, lora=cfg.lora.enabled, keep_checkpoints=cfg.train.keep_checkpoints_when_finished)
    return run.path
