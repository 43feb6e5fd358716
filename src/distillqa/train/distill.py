"""`distillqa distill`: distil a student from a frozen teacher with one of the KD objectives, on the
references or (`kd.lmbda` > 0) on the student's own answers."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from safetensors.torch import save_file

from distillqa.config import DistillConfig, KDConfig, dump_config
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder, collate_pairs, collate_right
from distillqa.errors import ConfigError, DataError
from distillqa.generate import read_answers_store, stored_answers
from distillqa.models.lora import apply_lora
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.models.traits import same_tokenizer
from distillqa.processes import processes
from distillqa.train.dskd import DSKD, DSKDCrossModelAttention
from distillqa.train.kd import ULD, CachedKD, VanillaKD
from distillqa.train.loop import examples_trained_on, train
from distillqa.train.losses import DIVERGENCES, SampledKL, TopKTail
from distillqa.train.objectives import SFTObjective
from distillqa.train.onpolicy import OnPolicyKD
from distillqa.train.run_dir import RunDir, save_final
from distillqa.train.teacher_cache import TeacherCache, collate_cached, encode_train_split

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


def cached_objective(cfg: KDConfig, cache: TeacherCache) -> CachedKD:
    if cache.manifest["method"] == "topk":
        return CachedKD(TopKTail(make_divergence(cfg)), cfg.kd_rate, cfg.chunk_size)
    if cfg.divergence != "forward_kl":
        raise ConfigError(f"kd.divergence: a sampling teacher cache is an unbiased target for forward_kl only, not "
                          f"{cfg.divergence}; use forward_kl or a topk cache")
    return CachedKD(SampledKL(), cfg.kd_rate, cfg.chunk_size)


def run_distill(cfg: DistillConfig, resume: bool = False) -> Path:
    if cfg.kd.teacher_cache:
        return run_distill_cached(cfg, resume)
    splits, report = load_splits(cfg.data)
    tok_s = load_tokenizer(cfg.student.name, cfg.student.trust_remote_code)
    tok_t = load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)
    prompt = cfg.prompt
    build_s = PromptBuilder(tok_s, prompt.template, prompt.instruction, prompt.max_length)
    build_t = PromptBuilder(tok_t, prompt.template, prompt.instruction, prompt.max_length)
    if cfg.kd.algorithm == "seqkd":
        return run_sequence_kd(cfg, splits["train"], report, build_s, build_t, resume)
    same = same_tokenizer(tok_s, tok_t)
    if cfg.kd.algorithm in SAME_VOCAB and not same:
        raise ConfigError(
            f"kd.algorithm: '{cfg.kd.algorithm}' needs teacher and student to share a tokenizer, but "
            f"{cfg.teacher.name} and {cfg.student.name} map tokens to ids differently; use 'dskd-cma', 'uld' or 'seqkd'"
        )
    pairs = [(build_s.encode_train(ex), build_t.encode_train(ex)) for ex in splits["train"]]
    data = [(s, t) for s, t in pairs if s is not None and t is not None]
    if cfg.kd.algorithm in SAME_VOCAB:
        data = [(s, s) for s, _ in data]  # one tokenisation serves both models
    if not data:  # before the run directory exists: a failed start leaves nothing behind
        raise DataError(cfg.data.source, None, None, f"none of the {len(pairs)} training examples fits prompt.max_length "
                        f"({prompt.max_length} tokens) for both models even without its context; raise prompt.max_length")

    run = open_run(cfg, resume, report, len(data), len(pairs) - len(data))
    if run.finished:
        return run.path
    torch.manual_seed(cfg.train.seed)  # new weights (LoRA, projectors) start the same in every run
    teacher = load_model(cfg.teacher.name, cfg.teacher.precision, cfg.teacher.trust_remote_code)
    student = load_student(cfg)
    objective = make_objective(cfg.kd, teacher, student)
    if cfg.kd.lmbda:
        objective = OnPolicyKD(objective, cfg.kd, tok_s, None if same else build_t)
    projectors = [p for n, p in objective.named_parameters() if p.requires_grad]
    groups = [{"params": [p for p in student.parameters() if p.requires_grad]}]
    if projectors:
        groups.append({"params": projectors, "lr": cfg.kd.projector_lr})
    train(student, objective, data, cfg.train, run,
          lambda items: collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id), param_groups=groups)
    finish(cfg, run, student, tok_s, objective)
    return run.path


def run_distill_cached(cfg: DistillConfig, resume: bool) -> Path:
    """Vanilla KD from `kd.teacher_cache`: the teacher is never loaded; the cache must match this run."""
    splits, report = load_splits(cfg.data)
    tok = load_tokenizer(cfg.student.name, cfg.student.trust_remote_code)
    cache = TeacherCache(cfg.kd.teacher_cache)
    examples = encode_train_split(cfg.data, cfg.prompt, tok)
    cache.check(cfg.teacher.name, tok, cfg.prompt, examples)
    objective = cached_objective(cfg.kd, cache)
    run = open_run(cfg, resume, report, len(examples), len(splits["train"]) - len(examples))
    if run.finished:
        return run.path
    run.update(teacher_cache={k: cache.manifest.get(k) for k in ("method", "k", "samples", "dtype", "dataset_hash")})
    torch.manual_seed(cfg.train.seed)
    student = load_student(cfg)
    width = student.get_output_embeddings().weight.shape[0]
    if width != cache.manifest["vocab_size"]:
        raise ConfigError(f"kd.teacher_cache: the student has {width} output tokens, the cache's teacher "
                          f"{cache.manifest['vocab_size']}; build the cache with a teacher of the student's vocabulary")
    train(student, objective, list(zip(examples, range(len(examples)))), cfg.train, run,
          lambda items: collate_cached(items, tok.pad_token_id, cache))
    finish(cfg, run, student, tok, objective)
    return run.path


def open_run(cfg: DistillConfig, resume: bool, report, kept: int, skipped: int) -> RunDir:
    run = RunDir.open(cfg.output_dir, dump_config(cfg), kind="distill", base_model=cfg.student.name, resume=resume)
    if run.finished:
        log.info("%s is already finished; nothing to do", run.path)
    else:
        run.update(data=report.summary(), train_examples=kept, skipped_too_long=skipped)
    return run


def load_student(cfg: DistillConfig):
    return apply_lora(load_model(cfg.student.name, cfg.student.precision, cfg.student.trust_remote_code), cfg.lora)


def finish(cfg: DistillConfig, run: RunDir, student, tok_s, objective) -> None:
    def save_projectors(tmp: Path) -> None:
        state = {n: p.detach().cpu().contiguous() for n, p in objective.named_parameters() if p.requires_grad}
        if state:
            save_file(state, str(tmp / "projectors.safetensors"))

    save_final(run, student, tok_s, lora=cfg.lora.enabled, extra=save_projectors,
               keep_checkpoints=cfg.train.keep_checkpoints_when_finished)


def run_sequence_kd(cfg: DistillConfig, examples, report, build_s: PromptBuilder, build_t: PromptBuilder,
                    resume: bool) -> Path:
    """Sequence-level KD (Kim & Rush 2016): cross-entropy on the teacher's greedy answers to the
    training prompts instead of the references. The teacher answers the examples the run reaches
    (the SFT-only baseline's examples, by the same seeded order) once, into `kd.teacher_answers`,
    and is released before training; text carries across any two vocabularies."""
    prompt = cfg.prompt
    fitting = [ex for ex in examples if build_s.encode_train(ex) is not None]  # as SFT filters them
    if not fitting:
        raise DataError(cfg.data.source, None, None, f"none of the {len(examples)} training examples fits prompt.max_length "
                        f"({prompt.max_length} tokens) even without its context; raise prompt.max_length")
    launch = processes()
    chosen = [fitting[i] for i in examples_trained_on(len(fitting), cfg.train, launch.num_processes)]
    if cfg.kd.teacher_answers:  # a store the user names is checked before the run directory exists
        read_answers_store(cfg.teacher.name, build_t, cfg.kd.answer_tokens, Path(cfg.kd.teacher_answers))

    run = open_run(cfg, resume, report, len(chosen), len(examples) - len(fitting))
    if run.finished:
        return run.path
    store = Path(cfg.kd.teacher_answers or run.path / "teacher_answers.jsonl")
    with launch.main_process_first():  # the main process answers; the others find the store complete
        answers = stored_answers(cfg.teacher.name, lambda: load_model(cfg.teacher.name, cfg.teacher.precision,
                                                                       cfg.teacher.trust_remote_code),
                                 build_t.tok, build_t, chosen, cfg.kd.answer_tokens, store, desc="teacher answers")
    encoded = [build_s.encode_train(ex, answers[ex.id]) for ex in chosen if answers[ex.id]]
    data = [e for e in encoded if e is not None]
    if not data:
        raise DataError(str(store), None, "prediction", "the teacher answered none of the training prompts")
    run.update(train_examples=len(data), skipped_too_long=len(examples) - len(fitting) + len(encoded) - len(data),
               teacher_answers={"file": str(store), "answered": len(encoded), "empty": len(chosen) - len(encoded)})

    torch.manual_seed(cfg.train.seed)
    student = load_student(cfg)
    objective = SFTObjective()
    train(student, objective, data, cfg.train, run, partial(collate_right, pad_id=build_s.tok.pad_token_id))
    finish(cfg, run, student, build_s.tok, objective)
    return run.path
