"""`distillqa distill`: distil a student from a frozen teacher with one of the KD objectives, on the
references or (`kd.lmbda` > 0) on the student's own answers."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from safetensors.torch import save_file

from distillqa.clients import completions_client
from distillqa.config import DistillConfig, GenerationConfig, KDConfig
from distillqa.data import load_splits
from distillqa.data.prompts import PromptBuilder, collate_pairs, collate_right
from distillqa.errors import ConfigError, DataError
from distillqa.generate import read_answers_store, stored_answers
from distillqa.models.lora import apply_lora
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.models.traits import same_tokenizer
from distillqa.processes import processes, sharded_engine
from distillqa.train.dskd import DSKD, DSKDCrossModelAttention
from distillqa.train.kd import ULD, CachedKD, VanillaKD
from distillqa.train.loop import examples_trained_on, train, validation_examples
from distillqa.train.losses import DIVERGENCES, ForwardKL, LossTerms, SampledKL, TopKTail
from distillqa.train.objectives import SFTObjective
from distillqa.train.onpolicy import OnPolicyKD
from distillqa.train.run_dir import RunDir, save_final
from distillqa.train.shards import full_tensors
from distillqa.train.sft import encode_split
from distillqa.train.teacher_cache import SIZE_KEYS, TeacherCache, collate_cached, encode_train_split

SAME_VOCAB = ("vanilla", "dskd")

log = logging.getLogger(__name__)


def make_loss_terms(cfg: KDConfig) -> LossTerms:
    """The loss of `kd.losses` (or its shorthand, `kd.kd_rate` and `kd.divergence`)."""
    terms = cfg.loss_terms()
    ce = sum(t.weight for t in terms if t.name == "ce")
    return LossTerms(ce, [(t.weight, DIVERGENCES[t.name](**cfg.term_params(t))) for t in terms if t.name != "ce"])


def make_objective(cfg: KDConfig, teacher, student):
    terms, chunk = make_loss_terms(cfg), cfg.chunk_size
    if cfg.algorithm == "vanilla":
        return VanillaKD(teacher, terms, chunk)
    if cfg.algorithm == "dskd":
        return DSKD(teacher, student, terms, cfg.temperature, chunk)
    if cfg.algorithm == "dskd-cma":
        return DSKDCrossModelAttention(teacher, student, terms, cfg.temperature, chunk)
    return ULD(teacher, terms, chunk)


def encode_pairs(build_s: PromptBuilder, build_t: PromptBuilder, examples, same_vocab: bool) -> list[tuple]:
    """Student and teacher encodings of the examples that fit both models; with `same_vocab` one
    tokenisation serves both."""
    pairs = [(build_s.encode_train(ex), build_t.encode_train(ex)) for ex in examples]
    return [(s, s if same_vocab else t) for s, t in pairs if s is not None and t is not None]



def cached_objective(cfg: KDConfig, cache: TeacherCache) -> CachedKD:
    terms, manifest = make_loss_terms(cfg), cache.manifest
    if manifest["method"] == "topk":
        if manifest.get("tail_samples"):  # forward KL from every column, unbiased; the rest from the kept tokens
            if other := cfg.divergence_names() - {"forward_kl"}:
                log.warning("kd.teacher_cache: %s read only the cache's %d kept tokens and its tail mass (biased low); "
                            "the tail draws serve forward_kl. For them a plain top-k cache of the same size: "
                            "cache.k=%d, cache.tail_samples=0", ", ".join(sorted(other)), manifest["k"],
                            manifest["k"] + manifest["tail_samples"])
            return CachedKD(terms, [SampledKL() if isinstance(d, ForwardKL) else TopKTail(d, kept=manifest["k"])
                                    for d in terms.divergences], cfg.chunk_size)
        return CachedKD(terms, [TopKTail(d) for d in terms.divergences], cfg.chunk_size)
    if other := cfg.divergence_names() - {"forward_kl"}:
        raise ConfigError(f"kd.divergence: a sampling teacher cache is an unbiased target for forward_kl only, not "
                          f"{', '.join(sorted(other))}; use forward_kl or a topk cache")
    return CachedKD(terms, [SampledKL() for _ in terms.divergences], cfg.chunk_size)


def check_engine(cfg: KDConfig) -> None:
    """Refuse what the launch's sharding engine cannot train: under it every forward gathers weights from all
    processes, so each process must run the same modules the same number of times."""
    if (engine := sharded_engine()) and cfg.lmbda:
        raise ConfigError(f"kd.lmbda: on-policy KD cannot train under {engine}: the student samples answers of different "
                          "lengths in each process, and every sampled token gathers weights from all of them; use the ddp "
                          "or deepspeed-zero2 accelerate config")


def run_distill(cfg: DistillConfig, resume: bool = False) -> Path:
    check_engine(cfg.kd)
    if cfg.kd.teacher_cache:
        return run_distill_cached(cfg, resume)
    splits, report = load_splits(cfg.data)
    tok_s = load_tokenizer(cfg.student.name, cfg.student.trust_remote_code)
    tok_t = load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)
    prompt = cfg.prompt
    build_s = PromptBuilder(tok_s, prompt.template, prompt.instruction, prompt.max_length)
    build_t = PromptBuilder(tok_t, prompt.template, prompt.instruction, prompt.max_length)
    if cfg.kd.algorithm == "seqkd":
        validation, _ = encode_split(build_s, validation_examples(splits, cfg.train))
        return run_sequence_kd(cfg, splits["train"], report, build_s, build_t, resume, validation)
    same = same_tokenizer(tok_s, tok_t)
    if cfg.kd.algorithm in SAME_VOCAB and not same:
        raise ConfigError(
            f"kd.algorithm: '{cfg.kd.algorithm}' needs teacher and student to share a tokenizer, but "
            f"{cfg.teacher.name} and {cfg.student.name} map tokens to ids differently; use 'dskd-cma', 'uld' or 'seqkd'"
        )
    data = encode_pairs(build_s, build_t, splits["train"], cfg.kd.algorithm in SAME_VOCAB)
    validation = encode_pairs(build_s, build_t, validation_examples(splits, cfg.train), cfg.kd.algorithm in SAME_VOCAB)
    if not data:  # before the run directory exists: a failed start leaves nothing behind
        raise DataError(cfg.data.source, None, None, f"none of the {len(splits['train'])} training examples fits prompt.max_length "
                        f"({prompt.max_length} tokens) for both models even without its context; raise prompt.max_length")

    run = open_run(cfg, resume, report, len(data), len(splits["train"]) - len(data))
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
          lambda items: collate_pairs(items, tok_s.pad_token_id, tok_t.pad_token_id), param_groups=groups,
          validation=validation)
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
    run.update(teacher_cache={k: cache.manifest.get(k) for k in (*SIZE_KEYS, "dataset_hash")})
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
    return RunDir.start(cfg.output_dir, cfg, "distill", cfg.student.name, resume, data=report.summary(),
                        train_examples=kept, skipped_too_long=skipped)


def load_student(cfg: DistillConfig):
    return apply_lora(load_model(cfg.student.name, cfg.student.precision, cfg.student.trust_remote_code), cfg.lora)


def finish(cfg: DistillConfig, run: RunDir, student, tok_s, objective) -> None:
    state = full_tensors({n: p for n, p in objective.named_parameters() if p.requires_grad})  # every process: sharded?

    def save_projectors(tmp: Path) -> None:
        if state:
            save_file(state, str(tmp / "projectors.safetensors"))

    save_final(run, student, tok_s, lora=cfg.lora.enabled, extra=save_projectors,
               keep_checkpoints=cfg.train.keep_checkpoints_when_finished)


def run_sequence_kd(cfg: DistillConfig, examples, report, build_s: PromptBuilder, build_t: PromptBuilder,
                    resume: bool, validation: list) -> Path:
    """Sequence-level KD (Kim & Rush 2016): cross-entropy on the teacher's greedy answers to the
    training prompts instead of the references. The teacher answers the examples the run reaches
    (the SFT-only baseline's examples, by the same seeded order) once, into `kd.teacher_answers`,
    and is released before training; text carries across any two vocabularies. With
    `kd.teacher_endpoint` the teacher is never loaded here: an OpenAI-compatible endpoint answers
    the prompts in the teacher's chat format (its tokenizer, `teacher.name`, renders them). The
    validation loss is the cross-entropy on the references of `validation` (encoded validation examples)."""
    prompt = cfg.prompt
    fitting = [ex for ex in examples if build_s.encode_train(ex) is not None]  # as SFT filters them
    if not fitting:
        raise DataError(cfg.data.source, None, None, f"none of the {len(examples)} training examples fits prompt.max_length "
                        f"({prompt.max_length} tokens) even without its context; raise prompt.max_length")
    launch = processes()
    chosen = [fitting[i] for i in examples_trained_on(len(fitting), cfg.train, launch.num_processes)]
    # An endpoint, and a store the user names, are checked before the run directory exists.
    endpoint = (completions_client(cfg.kd.teacher_endpoint, cfg.teacher.name, GenerationConfig(max_new_tokens=cfg.kd.answer_tokens),
                                   "kd.teacher_endpoint") if cfg.kd.teacher_endpoint else None)
    answered_by, url = (endpoint.model, endpoint.base_url) if endpoint else (cfg.teacher.name, None)
    if cfg.kd.teacher_answers:
        read_answers_store(answered_by, build_t, cfg.kd.answer_tokens, Path(cfg.kd.teacher_answers), endpoint=url)

    run = open_run(cfg, resume, report, len(chosen), len(examples) - len(fitting))
    if run.finished:
        return run.path
    store = Path(cfg.kd.teacher_answers or run.path / "teacher_answers.jsonl")
    with launch.main_process_first():  # the main process answers; the others find the store complete
        teacher = (lambda: endpoint) if endpoint else (
            lambda: load_model(cfg.teacher.name, cfg.teacher.precision, cfg.teacher.trust_remote_code))
        answers = stored_answers(answered_by, teacher, build_t.tok, build_t, chosen, cfg.kd.answer_tokens, store,
                                 desc="teacher answers", endpoint=url)
    encoded = [build_s.encode_train(ex, answers[ex.id]) for ex in chosen if answers[ex.id]]
    data = [e for e in encoded if e is not None]
    if not data:
        raise DataError(str(store), None, "prediction", "the teacher answered none of the training prompts")
    run.update(train_examples=len(data), skipped_too_long=len(examples) - len(fitting) + len(encoded) - len(data),
               teacher_answers={"file": str(store), "answered": len(encoded), "empty": len(chosen) - len(encoded)})

    torch.manual_seed(cfg.train.seed)
    student = load_student(cfg)
    objective = SFTObjective()
    train(student, objective, data, cfg.train, run, partial(collate_right, pad_id=build_s.tok.pad_token_id),
          validation=validation)
    finish(cfg, run, student, build_s.tok, objective)
    return run.path
