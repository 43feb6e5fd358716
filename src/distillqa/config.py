"""Pydantic schemas for every command's YAML config, with dotted `--set key=value` overrides.

One schema per command (as TRL pairs a config with each trainer); the field descriptions are
the documentation: `distillqa config COMMAND` prints every key with its default and description. Unknown keys and invalid values are
rejected with a message that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distillqa.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name: str = Field(
        "smollm2-135m",
        description="Registry name (`distillqa models`), Hugging Face hub id, local model directory, "
        "finished run directory, or `<model>@layers=<spec>` for a layer-pruned student.",
    )
    trust_remote_code: bool = Field(False, description="Allow custom model code from the hub (off unless asked for).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: fp32 on CPU (bf16 is far slower there), bf16 on a GPU that supports it."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


class DataConfig(Section):
    source: str = Field("bundled:telecom-sample", description="A data file path, or `bundled:telecom-sample`.")
    format: Literal["auto", "jsonl", "squad", "cqa"] = Field("auto", description="File format; `auto` guesses from the file.")
    explanations: str | None = Field(None, description="CoS-E jsonl to join onto CommonsenseQA by id.")
    include_unanswerable: bool = Field(False, description="Keep SQuAD-style unanswerable questions (left out of generative QA by default).")
    on_bad_answer: Literal["error", "skip"] = Field(
        "skip", description="SQuAD-style answers that are empty or whose offset does not match the context: stop with an error, or drop and count them."
    )
    split_fractions: tuple[float, float, float] = Field((0.7, 0.1, 0.2), description="Train/validation/test fractions, grouped by context.")
    split_seed: int = Field(0, description="Seed of the split.")
    max_train_examples: int | None = Field(None, ge=1, description="Use at most this many training examples (first by id order of the split).")
    max_eval_examples: int | None = Field(None, ge=1, description="Use at most this many validation/test examples "
                                          "(or, with split `all`, the first this many of the file).")

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v):
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("must be three non-negative numbers that sum to 1")
        if v[0] == 0:
            raise ValueError("the training fraction must be positive (to answer every question of a file, use split=all)")
        return v


class PromptConfig(Section):
    template: Literal["auto", "chat", "plain"] = Field(
        "auto", description="`auto`: the model's chat template if it has one, else the plain template."
    )
    instruction: str = Field(
        "Answer the question using the context. Reply with the answer only.",
        description="Instruction placed before the context and question.",
    )
    max_length: int = Field(512, ge=32, description="Maximum tokens of prompt + answer; longer contexts are truncated (see docs).")


class LoraConfig(Section):
    enabled: bool = Field(True, description="Train LoRA adapters (true) or all weights (false).")
    preset: Literal["custom", "paper"] = Field("custom", description="`paper`: the studies' r=256, alpha=8, dropout=0.1 (explicit fields still win).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Names of the linear layers that get adapters.",
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("preset") == "paper":
            return {"r": 256, "alpha": 8.0, "dropout": 0.1, **v}
        return v


class TrainConfig(Section):
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch (per device).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="Decay after warm-up.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables clipping.")
    seed: int = Field(0, description="Seed for data order, dropout and initialisation of new weights.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk while the run trains (the newest).")
    keep_checkpoints_when_finished: bool = Field(False, description="Keep them after the final model is written (they "
                                                 "serve resumption only; with all weights training, one holds weights and "
                                                 "optimizer state: about 1.3 GB for a 100M-parameter model).")
    log_every: int = Field(10, ge=1, description="Log the training loss every this many steps.")


class GenerationConfig(Section):
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per answer.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (left-padded, KV-cached).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (with do_sample).")
    seed: int = Field(0, description="Sampling seed.")


class MCQConfig(Section):
    """How multiple-choice questions (examples with `choices`) are asked and scored; others are unaffected."""

    method: Literal["generate", "loglikelihood"] = Field(
        "generate", description="`generate`: the model writes an answer (metric choice_accuracy maps it to a choice); "
        "`loglikelihood`: nothing is generated, each choice's log-likelihood after the prompt is recorded "
        "(metrics acc, acc_norm), as lm-evaluation-harness scores multiple choice.")
    options: Literal["inline", "lettered", "hidden"] = Field(
        "inline", description="How the prompt shows the choices: `inline` (`Choices: a; b; c`), `lettered` (one per "
        "line, `A. a`; loglikelihood then scores the letters) or `hidden` (a cloze question; loglikelihood scores the texts).")


class SFTConfig(Section):
    """`distillqa sft`: supervised fine-tuning on answer tokens."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = Field("runs/sft", description="Run directory (config, log, checkpoints, final model).")


class GenerateConfig(Section):
    """`distillqa generate`: answers for one split, written to predictions.jsonl."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    split: Literal["train", "validation", "test", "all"] = Field(
        "test", description="Which split to answer; `all`: every question of the file, in file order (a test-only file).")
    mcq: MCQConfig = Field(default_factory=MCQConfig)
    output_dir: str = Field("runs/generate", description="Directory for predictions.jsonl.")


class KDConfig(Section):
    algorithm: Literal["vanilla", "dskd", "dskd-cma", "uld", "seqkd"] = Field(
        "vanilla", description="vanilla and dskd need one tokenizer for both models; dskd-cma and uld work across vocabularies; "
        "seqkd (sequence-level KD) trains on the teacher's greedy answers instead of the references, any two vocabularies."
    )
    divergence: Literal[
        "forward_kl", "reverse_kl", "js", "skewed_forward_kl", "skewed_reverse_kl", "tvd", "adaptive_kl", "generalized_jsd"
    ] = Field("forward_kl", description="Token-level divergence for vanilla KD and for the DSKD student-space term.")
    kd_rate: float = Field(0.5, ge=0, le=1, description="r in loss = (1 - r) * CE + r * KD (not used by seqkd).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature applied to teacher and student logits alike.")
    skew: float = Field(0.1, gt=0, lt=1, description="lambda of the skewed KL divergences.")
    beta: float = Field(0.5, gt=0, lt=1, description="beta of the generalized JSD.")
    head_mass: float = Field(0.5, gt=0, lt=1, description="mu of adaptive KL: teacher mass that makes up the head.")
    chunk_size: int | None = Field(32, ge=1, description="Answer tokens projected to the vocabulary at a time (null: all at once).")
    projector_lr: float = Field(1e-3, gt=0, description="Learning rate of the DSKD projectors.")
    lmbda: float = Field(0.0, ge=0, le=1, description="On-policy KD (GKD): the probability that a batch's answers are "
                         "sampled from the student itself and scored by the teacher instead of the references (0: "
                         "supervised KD; 1: fully on-policy). The student's CE term then has its sampled tokens as labels; "
                         "GKD as published is kd_rate 1. Any algorithm but seqkd; across vocabularies the sampled text is "
                         "tokenised again for the teacher (dskd-cma, uld). In a grid: the `-onpolicy` cells' lmbda.")
    sample_temperature: float = Field(1.0, gt=0, description="On-policy KD: temperature of the student's sampling.")
    sample_max_new_tokens: int = Field(48, ge=1, description="On-policy KD: new tokens per sampled answer.")
    answer_tokens: int = Field(48, ge=1, description="seqkd: new tokens per teacher answer.")
    teacher_answers: str | None = Field(None, description="seqkd: JSONL store of the teacher's answers, shared by the runs "
                                        "that name it (default: teacher_answers.jsonl in the run directory).")
    teacher_cache: str | None = Field(None, description="A `distillqa teacher cache` directory: vanilla KD reads the "
                                      "teacher's sparse distributions from it instead of loading the teacher (its "
                                      "manifest must match teacher.name, the student's tokenizer, data and prompt; "
                                      "temperature 1; a sampling cache needs divergence forward_kl).")

    @model_validator(mode="after")
    def _options_agree(self):
        if self.lmbda and self.algorithm == "seqkd":
            raise ValueError("lmbda: seqkd trains on the teacher's answers; on-policy KD (lmbda > 0) needs a token-level "
                             "algorithm (vanilla, dskd, dskd-cma, uld)")
        if self.lmbda and self.teacher_cache:
            raise ValueError("teacher_cache: a cache holds the teacher's distributions on the reference answers, not on "
                             "the student's samples; on-policy KD (lmbda > 0) needs the teacher loaded")
        if self.teacher_cache and self.algorithm != "vanilla":
            raise ValueError(f"teacher_cache: only 'vanilla' KD trains from a cache, not '{self.algorithm}' (DSKD and "
                             "DSKD-CMA need the teacher's hidden states, ULD the teacher's own tokenisation)")
        if self.teacher_cache and self.temperature != 1:
            raise ValueError("teacher_cache: a cache holds log-probabilities at temperature 1, whose tail mass at another "
                             f"temperature is unknown; set temperature=1 (got {self.temperature:g})")
        return self


class CacheSettings(Section):
    """What a teacher cache stores per answer token (`distillqa teacher cache`, `grid.teacher_cache`)."""

    method: Literal["topk", "sampling"] = Field(
        "topk", description="`topk`: the k most likely tokens and the log of the remaining mass (a tail bucket); "
        "`sampling`: `samples` tokens drawn from the teacher with replacement, with weights count / samples "
        "(an unbiased forward-KL target, Anshumann et al. 2025).")
    k: int = Field(16, ge=1, description="topk: tokens kept per answer token (16 x (4 + 2) + 4 = 100 bytes at float16, plus 8 per example).")
    samples: int = Field(32, ge=1, le=4096, description="sampling: draws per answer token.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Storage type of the log-probabilities "
                                                              "(the tail is always float32).")
    shard_examples: int = Field(256, ge=1, description="Training examples per shard (the unit written, checked and resumed).")
    batch_size: int = Field(8, ge=1, description="Examples per teacher forward pass.")
    seed: int = Field(0, description="Seed of the sampling draws (per example, so a resumed cache is identical).")


class TeacherCacheConfig(Section):
    """`distillqa teacher cache`: the teacher's sparse distributions on the training answers, once, for KD without it."""

    teacher: ModelConfig = Field(default_factory=ModelConfig, description="The teacher (any model name or finished run directory).")
    data: DataConfig = Field(default_factory=DataConfig, description="Its training split is cached (the KD run's own data config).")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="The KD run's prompt settings.")
    cache: CacheSettings = Field(default_factory=CacheSettings)
    output_dir: str = Field("runs/teacher-cache", description="Cache directory (manifest.json, shards/); rerun to resume.")


class HealConfig(Section):
    """Healing of a layer-pruned student: forward KL from its parent over every token of a corpus."""

    steps: int = Field(0, ge=0, description="Optimizer steps of healing (0: no healing).")
    corpus: str = Field("train", description="`train`: the training split's prompts with their reference answers, in the "
                        "model's chat format; `parent-answers`: the same prompts with the parent's own greedy answers; "
                        "or a .txt file, or a .jsonl file with a `text` field per line.")
    answer_tokens: int = Field(48, ge=1, description="New tokens per parent answer (corpus `parent-answers`).")
    batch_size: int = Field(4, ge=1, description="Sequences per step.")
    max_length: int = Field(256, ge=16, description="Tokens per sequence (longer text is cut into pieces of this size).")
    lr: float = Field(5e-4, gt=0, description="Peak learning rate (all weights train; cosine decay after 5% warm-up).")
    chunk_size: int | None = Field(128, ge=1, description="Token positions projected to the vocabulary at a time (null: all).")
    calibration_examples: int = Field(32, ge=1, description="Corpus sequences on which measured layer specs "
                                      "(`angular:K`, `block-influence:K`) rank the layers.")
    eval_examples: int = Field(16, ge=0, description="Validation questions answered after healing for the recorded "
                               "zero-shot ROUGE-L (needs a QA data source; 0: skip).")
    seed: int = Field(0, description="Seed of the data order.")
    checkpoint_every: int = Field(20, ge=1, description="Save a resumable checkpoint every this many steps.")


class JudgeConfig(Section):
    url: str | None = Field(None, description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1.")
    model: str | None = Field(None, description="Judge model name sent to the endpoint.")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (the key itself is never written).")
    local_model: str | None = Field(None, description="Use a local model as judge instead of an endpoint (slow).")
    concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")
    retries: int = Field(3, ge=0, description="Retries of a failed request, with exponential backoff.")
    parse_retries: int = Field(2, ge=0, description="Re-asks of a reply that cannot be parsed before it is recorded as missing.")
    max_tokens: int = Field(256, ge=1, description="Tokens per judge reply.")
    cache: str | None = Field(None, description="SQLite reply cache (default $DISTILLQA_CACHE/judge.sqlite).")

    @model_validator(mode="after")
    def _one_kind(self):
        if self.local_model and self.url:
            raise ValueError("set either url (with model) or local_model, not both")
        if self.url and not self.model:
            raise ValueError("an endpoint judge needs judge.model")
        return self


class EvaluateConfig(Section):
    """`distillqa evaluate`: per-example scores and a summary for a predictions file."""

    metrics: str = Field("default", description="'default' (14), 'offline' (11, no judge), families, or names, comma-separated.")
    embedding_model: str | None = Field(None, description="Sentence-transformers model directory (default: bundled all-MiniLM-L6-v2).")
    bertscore_layers: int | None = Field(None, ge=1, description="Layer BERTScore reads (default: the embedding model's last).")
    batch_size: int = Field(64, ge=1, description="Batch size of embedding and BERTScore models.")
    judge: JudgeConfig = Field(default_factory=JudgeConfig)


class DistillConfig(Section):
    """`distillqa distill`: distil a student from a frozen teacher."""

    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(name="smollm2-135m"))
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name="smollm2-135m@layers=angular:22"))
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    output_dir: str = Field("runs/distill", description="Run directory (config, log, checkpoints, final student).")


# A grid's algorithms: those of `kd.algorithm`, and the token-level ones on-policy (`-onpolicy`, with `distill.kd.lmbda`).
ON_POLICY = "-onpolicy"
Algorithm = Literal["vanilla", "dskd", "dskd-cma", "uld", "seqkd",
                    "vanilla-onpolicy", "dskd-onpolicy", "dskd-cma-onpolicy", "uld-onpolicy"]
State = Literal["base", "sft"]


class DeriveConfig(Section):
    """`distillqa derive-student`: a layer-pruned student, optionally healed from its parent."""

    parent: ModelConfig = Field(default_factory=ModelConfig, description="The model whose layers are pruned.")
    layers: str = Field("angular:22", description="Layers kept: `every-other`, indices and ranges (`0-3,8`), or measured on "
                        "the corpus: `angular:K` (drop the most redundant contiguous block) or `block-influence:K`.")
    data: DataConfig = Field(default_factory=DataConfig, description="QA data: the `train` corpus and the zero-shot check.")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    heal: HealConfig = Field(default_factory=HealConfig)
    output_dir: str = Field("runs/student", description="The student: a model directory, or a run directory when healed.")


class TeacherSpec(Section):
    name: str = Field(..., description="Teacher model (any model name).")
    algorithms: list[Algorithm] = Field(..., min_length=1, description="KD algorithms run with this teacher; "
                                        "`<algorithm>-onpolicy` is that algorithm on-policy, with lmbda `distill.kd.lmbda` "
                                        "(the other cells train on the references, lmbda 0).")


class GridConfig(Section):
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name="smollm2-135m@layers=angular:22"),
                                 description="The student of every cell; `<parent>@layers=<spec>` prunes a parent model.")
    heal: HealConfig = Field(default_factory=lambda: HealConfig(steps=120), description="Healing of a pruned student "
                             "(`@layers=` in its name) before anything else; its result is the grid's student base. "
                             "Cached by parent, layers, corpus and budget, and shared by experiments.")
    teachers: list[TeacherSpec] = Field(
        default_factory=lambda: [TeacherSpec(name="smollm2-135m", algorithms=["vanilla", "dskd"]),
                                 TeacherSpec(name="gemma3-270m", algorithms=["dskd-cma", "uld"])],
        min_length=1, description="Teachers and the algorithms each is distilled with; same or different "
        "vocabulary is detected from the tokenizers.")
    teacher_states: list[State] = Field(["base", "sft"], min_length=1, description="Teacher as it is and/or SFT'd first.")
    student_states: list[State] = Field(["base", "sft"], min_length=1, description="Student as it is and/or SFT'd first.")
    teacher_cache: bool = Field(False, description="Cache each teacher state once (EXP/teacher_cache/, `distill.cache` "
                                "settings) and train every vanilla KD cell from it without loading the teacher. It pays "
                                "when the cells of a teacher state together see more examples than the training split holds.")

    @field_validator("teachers")
    @classmethod
    def _unique_teachers(cls, v):
        names = [t.name for t in v]
        if len(set(names)) != len(names):
            raise ValueError(f"each teacher may appear once (got {names})")
        return v


class SFTStageConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


class DistillStageConfig(Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    cache: CacheSettings = Field(default_factory=CacheSettings, description="The teacher caches of `grid.teacher_cache`.")


class StatsConfig(Section):
    test: Literal["wilcoxon", "ttest", "permutation"] = Field("wilcoxon", description="Paired test per metric.")
    correction: Literal["holm", "bh", "none"] = Field("holm", description="Correction across the metrics of a hypothesis.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Significance level (on adjusted p-values).")
    algorithm_pairs: list[tuple[Algorithm, Algorithm]] = Field(
        [("dskd", "vanilla"), ("dskd-cma", "uld")], description="Algorithm comparisons, each its own hypothesis (A vs B).")


# Presets fill in what the user leaves out; explicit keys always win.
EXPERIMENT_PRESETS: dict[str, dict] = {
    # 13 minutes on a 2-core CPU once the student is healed (first run: + 4.6 minutes of healing):
    # the bundled sample, all 36 test questions, one algorithm per teacher (8 cells), a few steps a stage.
    # Distillation and the SFT-only baselines train every weight: on the healed student, 8 steps of 4
    # reach ROUGE-L 0.24 fully fine-tuned (lr 3e-4) against 0.08 with LoRA (lr 1e-3), at the same step time.
    "quick": {
        "data": {"source": "bundled:telecom-sample"},
        "prompt": {"max_length": 256},
        "grid": {"heal": {"steps": 40},
                 "teachers": [{"name": "smollm2-135m", "algorithms": ["vanilla"]},
                              {"name": "gemma3-270m", "algorithms": ["uld"]}]},
        "sft": {"train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2}},
        "distill": {"lora": {"enabled": False},
                    "train": {"max_steps": 8, "batch_size": 4, "lr": 3e-4, "checkpoint_every": 4}},
        "generation": {"max_new_tokens": 16, "batch_size": 18},
        "evaluate": {"metrics": "offline"},
    },
    # TeleQuAD (or any QA file) from a path you give, sized for at most 2 hours on a 2-core CPU:
    # 200 test questions, 8 cells as in quick, 24 steps of 8 per SFT, 16 per KD cell and SFT-only baseline.
    "cpu": {
        "data": {"format": "auto", "max_train_examples": 400, "max_eval_examples": 200},
        "prompt": {"max_length": 384},
        "grid": {"heal": {"steps": 60},
                 "teachers": [{"name": "smollm2-135m", "algorithms": ["vanilla"]},
                              {"name": "gemma3-270m", "algorithms": ["uld"]}]},
        "sft": {"train": {"max_steps": 24, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 8}},
        "distill": {"lora": {"enabled": False},
                    "train": {"max_steps": 16, "batch_size": 8, "lr": 3e-4, "checkpoint_every": 8}},
        "generation": {"max_new_tokens": 24, "batch_size": 25},
        "evaluate": {"metrics": "offline"},
    },
    # The telecom study's settings, for GPUs.
    "paper": {
        "prompt": {"max_length": 512},
        "sft": {"lora": {"preset": "paper"}, "train": {"epochs": 10, "lr": 1e-3}},
        "distill": {"lora": {"preset": "paper"}, "train": {"epochs": 10, "lr": 1e-3},
                    "kd": {"kd_rate": 0.5, "temperature": 2.0}},
        "evaluate": {"metrics": "default"},
    },
}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_preset(presets: dict[str, dict], default: str, raw: Any) -> Any:
    """The raw config laid over its preset's values (explicit keys win)."""
    if isinstance(raw, dict) and (preset := raw.get("preset", default)) in presets:
        return _deep_merge(presets[preset], raw)
    return raw


class HeldOutConfig(Section):
    """An extra test set that every row of the experiment answers, with its own statistics."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Its name: the directory "
                      "held_out/NAME/ and its section of the report.")
    data: DataConfig = Field(..., description="Its file (`data.source`) and format; `data.max_eval_examples` limits it.")
    split: Literal["train", "validation", "test", "all"] = Field(
        "all", description="The part of the file answered; `all`: every question (a file meant only for testing).")
    mcq: MCQConfig = Field(default_factory=MCQConfig)
    metrics: str | None = Field(None, description="Metrics for this set (default: evaluate.metrics); e.g. "
                                "`acc,acc_norm` with mcq.method=loglikelihood, `choice_accuracy` with generate.")

    @model_validator(mode="after")
    def _metrics_match_method(self):
        names = {m.strip() for m in (self.metrics or "").split(",")}
        if names & {"acc", "acc_norm"} and self.mcq.method != "loglikelihood":
            raise ValueError(f"held-out set '{self.name}': metrics acc and acc_norm need mcq.method=loglikelihood")
        return self


class ExperimentConfig(Section):
    """`distillqa experiment run`: the teacher x student x algorithm x vocabulary grid, statistics and report."""

    preset: Literal["quick", "cpu", "paper", "none"] = Field(
        "quick", description="Defaults for the rest: quick (bundled sample, minutes on a CPU), cpu (your data file, "
        "overnight on a CPU), paper (the study's settings, GPUs), none.")
    grid: GridConfig = Field(default_factory=GridConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig, description="SFT of teachers and student.")
    distill: DistillStageConfig = Field(default_factory=DistillStageConfig, description="Every KD cell.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stats: StatsConfig = Field(default_factory=StatsConfig)
    held_out: list[HeldOutConfig] = Field(
        [], description="Extra test files, each answered by every row and given its own rows and hypothesis tables, e.g. "
        "`[{name: cqa, data: {source: dev.jsonl}, mcq: {method: loglikelihood}, metrics: 'acc,acc_norm'}]`. "
        "Sets may be added to an experiment that has run; a set's definition may not change.")
    output_dir: str = Field("runs/experiment", description="Experiment directory (all stages, results and report).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, v: Any) -> Any:
        return apply_preset(EXPERIMENT_PRESETS, "quick", v)

    @model_validator(mode="after")
    def _needs(self):
        names = [h.name for h in self.held_out]
        if len(set(names)) != len(names):
            raise ValueError(f"held_out: names must be unique, got {names}")
        if self.grid.teacher_cache and self.distill.kd.temperature != 1:
            raise ValueError("grid.teacher_cache: a teacher cache holds log-probabilities at temperature 1; "
                             f"set distill.kd.temperature=1 (got {self.distill.kd.temperature:g})")
        if self.grid.teacher_cache and self.distill.cache.method == "sampling" and self.distill.kd.divergence != "forward_kl":
            raise ValueError("grid.teacher_cache: a sampling cache is an unbiased target for forward KL only; set "
                             "distill.kd.divergence=forward_kl or distill.cache.method=topk")
        on_policy = sorted({a for t in self.grid.teachers for a in t.algorithms if a.endswith(ON_POLICY)})
        if on_policy and not self.distill.kd.lmbda:
            raise ValueError(f"grid.teachers: {on_policy} sample the student's answers with probability distill.kd.lmbda, "
                             "which is 0; set it (1: every batch on-policy)")
        if self.preset == "cpu" and self.data.source.startswith("bundled:"):
            raise ValueError("preset 'cpu' needs data.source: the path of your QA file (e.g. TeleQuAD-v4-full.json)")
        specs = [self.evaluate.metrics] + [h.metrics for h in self.held_out if h.metrics]
        judged = any(m.strip() in ("default", "judge", "faithfulness", "answer_correctness", "answer_relevance")
                     for spec in specs for m in spec.split(","))
        if judged and not (self.evaluate.judge.url or self.evaluate.judge.local_model):
            raise ValueError("evaluate.metrics includes judge metrics: set evaluate.judge.url and evaluate.judge.model "
                             "(or evaluate.judge.local_model), or use evaluate.metrics=offline")
        return self


class RationaleGenerateConfig(Section):
    """`distillqa rationales generate`: teacher rationales, critique-revisions and counterfactuals."""

    teacher: JudgeConfig = Field(default_factory=JudgeConfig, description="The teacher: `local_model` (any model "
                                 "name), or `url` + `model` of an OpenAI-compatible endpoint; cache, concurrency, retries, "
                                 "max_tokens as for the judge.")
    data: DataConfig = Field(default_factory=lambda: DataConfig(source="train_rand_split.jsonl", format="cqa"),
                             description="Multiple-choice questions, e.g. CommonsenseQA train.")
    limit: int | None = Field(None, ge=1, description="The first N questions.")
    kinds: list[Literal["revised", "counterfactual"]] = Field(
        ["revised", "counterfactual"], description="Besides the rationale: critique-revised rationales, counterfactual rationales.")
    revisions: int = Field(2, ge=1, description="Critique-revision instruction pairs sampled per question.")
    templates: str = Field("v1", description="Version of the prompt templates (src/distillqa/rationales/templates/).")
    batch_size: int = Field(8, ge=1, description="Questions per batch of teacher requests.")
    seed: int = Field(0, description="Seed of the instruction-pair sampling.")
    output: str = Field("runs/teacher-rationales.jsonl", description="Output JSONL (distillqa's rationale layout).")


RATIONALE_PRESETS: dict[str, dict] = {
    # A CPU-sized run: a subset of CQA train, a subset of dev, a few minutes per cell.
    "cpu": {
        "max_train_examples": 64, "max_eval_examples": 60,
        "train": {"max_steps": 16, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 8},
        # CF writes the whole rationale before its answer: revised rationales run to ~115 tokens.
        "generation": {"max_new_tokens": 160, "batch_size": 25},
    },
    # Hendriks et al.: lr 5e-5, batch 48, 5,000 steps, input and output length 300, full fine-tuning
    # (their students were T5-v1.1 base/large: set student.name to one).
    "paper": {
        "lora": {"enabled": False},
        "prompt": {"max_length": 300},
        "train": {"max_steps": 5000, "batch_size": 48, "lr": 5e-5, "checkpoint_every": 500},
        "generation": {"max_new_tokens": 300, "batch_size": 64},
    },
}


class RationaleExperimentConfig(Section):
    """`distillqa rationales experiment`: method x rationale type x seed, accuracy and ANOVA."""

    preset: Literal["cpu", "paper", "none"] = Field("cpu", description="cpu (minutes per cell on a CPU), paper "
                                                    "(the study's settings, GPUs), none.")
    student: ModelConfig = Field(default_factory=ModelConfig, description="The student: a causal LM or an encoder-decoder LM (T5).")
    train_file: str | None = Field(None, description="Rationale JSONL for training (distillqa's layout or the "
                                   "Llama-2 teacher outputs' columns), e.g. .../cqa-teacher-llama2/train.jsonl.")
    eval_file: str | None = Field(None, description="Rationale JSONL whose questions, choices and answers are "
                                  "the test set, e.g. .../cqa-teacher-llama2/test.jsonl (CQA dev).")
    max_train_examples: int | None = Field(None, ge=1, description="The first N training questions.")
    max_eval_examples: int | None = Field(None, ge=1, description="The first N test questions.")
    methods: list[Literal["mt", "cf", "mt+cf"]] = Field(["mt", "cf", "mt+cf"], min_length=1, description="Training methods.")
    rationale_types: list[Literal["unrevised", "revised"]] = Field(
        ["unrevised", "revised"], min_length=1, description="Explanation targets: few-shot or critique-revised rationales.")
    seeds: list[int] = Field([0, 1], min_length=1, description="Seeds (data order, LoRA init, counterfactual choice).")
    alpha: float = Field(0.5, ge=0, le=1, description="MT: alpha * L_answer + (1 - alpha) * L_explain.")
    beta: float = Field(0.5, ge=0, le=1, description="CF: beta * L_factual + (1 - beta) * L_counterfactual.")
    gamma: float = Field(0.5, ge=0, le=1, description="MT+CF: gamma * MT + (1 - gamma) * CF.")
    explain_examples: int = Field(20, ge=0, description="Test questions that also get an explanation written (MT, MT+CF).")
    iqr_outlier: float = Field(1.5, ge=0, description="Drop runs beyond this many IQRs from their group's quartiles "
                               "before the ANOVA (0 keeps all).")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    output_dir: str = Field("runs/rationales", description="Experiment directory.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, v: Any) -> Any:
        return apply_preset(RATIONALE_PRESETS, "cpu", v)


C = TypeVar("C", bound=BaseModel)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key.sub=value` overrides; values are parsed as YAML (`1e-4`, `true`, `[a, b]`)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}': expected key=value, e.g. train.lr=1e-4")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({getattr(e, 'problem', None) or 'parse error'})") from None
    return raw


def load_config(schema: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Build `schema` from an optional YAML file plus overrides, with errors that name the key."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {path} is a directory, not a YAML file") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start + 1}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file {path} cannot be read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            raise ConfigError(f"config file {path}: invalid YAML: {where}{getattr(e, 'problem', None) or e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping of keys to values")
    raw = apply_overrides(raw, overrides or [])
    return validate_config(schema, raw, source=str(path) if path else "config")


def validate_config(schema: type[C], raw: dict, source: str = "config") -> C:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {msg}")
        raise ConfigError(f"{source}: invalid configuration: " + "; ".join(problems)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def upgraded(schema: type[BaseModel], raw: Any) -> Any:
    """A config an earlier version wrote, read with today's schema: keys added since take their
    defaults, so a new option does not make an old run look changed. Kept as it is when today's
    schema rejects it (a key removed since), so the comparison shows what differs."""
    try:
        return schema.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw


SCHEMAS: dict[str, type[BaseModel]] = {
    "sft": SFTConfig, "distill": DistillConfig, "generate": GenerateConfig, "evaluate": EvaluateConfig,
    "experiment": ExperimentConfig, "teacher-cache": TeacherCacheConfig, "rationales": RationaleExperimentConfig,
    "rationales-generate": RationaleGenerateConfig,
}


def describe_config(schema: type[BaseModel]) -> str:
    """A commented YAML file of every key of `schema` with its default and description."""
    lines: list[str] = []

    def walk(model: BaseModel, indent: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                lines.append(f"{indent}{name}:")
                walk(value, indent + "  ")
                continue
            dumped = yaml.safe_dump({name: model.model_dump(mode="json")[name]},
                                    default_flow_style=True, width=1000).strip().strip("{}")
            comment = f"  # {field.description}" if field.description else ""
            lines.append(f"{indent}{dumped}{comment}")

    walk(schema(), "")
    return "\n".join(lines) + "\n"
