"""`distillqa distill`: distil a student from a frozen teacher with one of the KD objectives."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from safetensors.torch import save_file

from distillqa.config import DistillConfig, KDConfig, dump_config
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder, collate_right
from distillqa.errors import ConfigError, DataError
from distillqa.models.lora import apply_lora
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.models.traits import same_tokenizer
from distillqa.train.dskd import DSKD, DSKDCrossModelAttention
from distillqa.train.kd import ULD, VanillaKD
from distillqa.train.loop import train
from distillqa.train.losses import DIVERGENCES
from distillqa.train.run_dir import RunDir, save_final

log = logging.getLogger(__name__)

SAME_VOCAB = ("vanilla", "dskd")


def make_divergence(cfg: KDConfig):
    extra = {"skewed_forward_kl": {"skew": cfg.skew}, "skewed_reverse_kl": {"skew": cfg.skew},
             "generalized_jsd": {"beta": cfg.beta}, "adaptive_kl": {"head_mass": cfg.head_mass}}
    return DIVERGENCES[cfg.divergence](temperature=cfg.temperature, **extra.get(cfg.divergence, {}))


def make_objective(cfg: KDConfig, teacher, student):
    div, r, chunk = make_divergence(cfg), cfg.kd_rate, cfg.chunk_size
    if cfg.algorithm == "vanilla":
        return VanillaKD(teacher, div, r, chunk)
    if cfg.algorithm == "dskd":
        return DSKD(teacher, student, div, r, chunk)
    if cfg.algorithm == "dskd-cma":
        return DSKDCrossModelAttention(teacher, student, div, r, chunk)
    return ULD(teacher, r, cfg.temperature, chunk)


def collate_pairs(items, pad_student: int, pad_teacher: int) -> dict:
    """Student and teacher tokenisations of the same examples; teacher keys get a `teacher_` prefix."""
    batch = collate_right([s for s, _ in items], pad_student)
    batch.update({f"teacher_{k}": v for k, v in collate_right([t for _, t in items], pad_teacher).items()})
    return batch


def run_distill(cfg: DistillConfig, resume: bool = False) -> Path:
    splits, report = load_splits(cfg.data)
    tok_s = load_tokenizer(cfg.student.name, cfg.student.trust_remote_code)
    tok_t = load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)
    same = same_tokenizer(tok_s, tok_t)
    if cfg.kd.algorithm in SAME_VOCAB and not same:
        raise ConfigError(
            f"kd.algorithm: '{cfg.kd.algorithm}' needs teacher and student to share a tokenizer, but "
            f"{cfg.teacher.name} and {cfg.student.name} map tokens to ids differently; use 'dskd-cma' or 'uld'"
        )
    prompt = cfg.prompt
    build_s = PromptBuilder(tok_s, prompt.template, prompt.instruction, prompt.max_length)
    build_t = PromptBuilder(tok_t, prompt.template, prompt.instruction, prompt.max_length)
    pairs = [(build_s.encode_train(ex), build_t.encode_train(ex)) for ex in splits["train"]]
    data = [(s, t) for s, t in pairs if s is not None and t is not None]
    if cfg.kd.algorithm in SAME_VOCAB:
        data = [(s, s) for s, _ in data]  # one tokenisation serves both models
    if not data:  # before the run directory exists: a failed start leaves nothing behind
        raise DataError(cfg.data.source, None, None, f"none of the {len(pairs)} training examples fits prompt.max_length "
                        f"({prompt.max_length} tokens) for both models even without its context; raise prompt.max_length")

    run = RunDir.open(cfg.output_dir, dump_config(cfg), kind="distill", base_model=cfg.student.name, resume=resume)
    if run.finished:
        log.info("%s is already finished; nothing to do", run.path)
        return run.path
    run.update(data=report.summary(), train_examples=len(data), skipped_too_long=len(pairs) - len(data))

    torch.manual_seed(cfg.train.seed)  # new weights (LoRA, projectors) start the same in every run
    teacher = load_model(cfg.teacher.name, cfg.teacher.precision, cfg.teacher.trust_remote_code)
    student = apply_lora(load_model(cfg.student.name, cfg.student.precision, cfg.student.trust_remote_code), cfg.lora)
    objective = make_objective(cfg.kd, teacher, student)
    projectors = [p for n, p in objective.named_parameters() if p.requires_grad]
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    if projectors:
        groups.append({"params": projectors, "lr": cfg.kd.projector_lr})
    train(student, objective, data, cfg.train, run,
          lambda items: collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id), param_groups=groups)

    def save_projectors(tmp: Path) -> None:
        state = {n: p.detach().cpu().contiguous() for n, p in objective.named_parameters() if p.requires_grad}
        if state:
            save_file(state, str(tmp / "projectors.safetensors"))

    save_final(run, student, tok_s, lora=cfg.lora.enabled, extra=save_projectors,
               keep_checkpoints=cfg.train.keep_checkpoints_when_finished)
    return run.path
