"""Pydantic schemas of the shared config sections and of the core commands, the preset rule, and the
loading and `--set key=value` overrides every command's config goes through.

One schema per command (as TRL pairs a config with each trainer); each study keeps its own schemas and
presets beside its code (`experiment/config.py`, `rationales/config.py`), built from the sections here.
The field descriptions are the documentation: `distillqa config COMMAND` (schemas.py) prints every key
with its default and description. Unknown keys and invalid values are rejected with a message that names the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

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
    eval_every: int = Field(50, ge=0, description="Log the loss on the validation split every this many steps and "
                            "after the last (0: never); healing, rationale runs and KD from a teacher cache have none, "
                            "sequence-level KD measures it on the references.")
    eval_examples: int = Field(64, ge=1, description="Validation examples the loss is measured on (the split's first).")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        [], description="Trackers (through accelerate) that get every logged row besides log.jsonl, from the main "
        "process; each needs its package installed. TensorBoard writes into RUN/trackers/.")

    @field_validator("report_to")
    @classmethod
    def _installed(cls, v):
        from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
        if missing := [name for name in v if not available[name]()]:
            raise ValueError(f"{', '.join(missing)} not installed; pip install {' '.join(missing)}, or leave it out")
        return v


def http_url(url: str) -> str:
    """`url`, if it is an http(s) URL; ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"'{url}' is not an http(s) URL such as http://127.0.0.1:8000/v1")
    return url


class EndpointConfig(Section):
    """An OpenAI-compatible completions endpoint (vLLM, TGI, llama.cpp server, `distillqa serve`) that answers
    instead of a model loaded in this process; the prompts are sent already in the model's chat format."""

    url: str = Field(..., description="Base URL, e.g. http://127.0.0.1:8000/v1 (prompts go to URL/completions).")
    model: str | None = Field(None, description="Model name the endpoint serves (default: the model's name in this config, "
                              "e.g. model.name, teacher.name or a grid row's model; it must be in URL/models).")
    api_key_env: str | None = Field(None, description="Environment variable holding the API key (the key itself is never written).")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout: float = Field(120.0, gt=0, description="Seconds per request.")
    retries: int = Field(3, ge=0, description="Retries of a failed request (timeouts, 408/409/429, 5xx), with exponential backoff.")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        return http_url(url)


class GenerationConfig(Section):
    max_new_tokens: int = Field(32, ge=1, description="Tokens generated per answer.")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch (left-padded, KV-cached; with an "
                            "endpoint, the requests written to disk together).")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (with do_sample).")
    seed: int = Field(0, description="Sampling seed.")
    endpoint: EndpointConfig | None = Field(None, description="Send the prompts to this OpenAI-compatible endpoint, "
                                            "batch_size at a time, instead of loading the model here (null: in-process).")


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

    @model_validator(mode="after")
    def _scored_here(self):
        if self.mcq.method == "loglikelihood" and self.generation.endpoint:
            raise ValueError("mcq.method=loglikelihood scores the choices in-process; unset generation.endpoint")
        return self


class LossTerm(BaseModel):
    """One term of a KD loss: `ce`, or a registered divergence with its weight and any of its own parameters."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = Field(..., description="`ce` (the student's cross-entropy on the answer tokens) or a divergence: "
                      "each file in distillqa/train/losses/ registers one (README: Distillation).")
    weight: float = Field(..., ge=0, description="Its weight in the sum.")

    @model_validator(mode="after")
    def _known(self):
        params = self.params()
        if self.name == "ce":
            if params:
                raise ValueError(f"loss 'ce' takes no parameters, got {', '.join(params)}")
            return self
        from distillqa.train.losses import DIVERGENCES, parameters  # torch, only for configs that name a loss
        if self.name not in DIVERGENCES:
            raise ValueError(f"unknown loss '{self.name}'; one of ce, {', '.join(DIVERGENCES)}")
        if unknown := set(params) - set(parameters(self.name)):
            raise ValueError(f"loss '{self.name}' has no parameter {', '.join(sorted(unknown))}; its parameters: "
                             f"{', '.join(parameters(self.name))}")
        try:
            DIVERGENCES[self.name](**params)
        except (TypeError, ValueError) as e:
            raise ValueError(f"loss '{self.name}': {e}") from None
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class KDConfig(Section):
    algorithm: Literal["vanilla", "dskd", "dskd-cma", "uld", "seqkd"] = Field(
        "vanilla", description="vanilla and dskd need one tokenizer for both models; dskd-cma and uld work across vocabularies; "
        "seqkd (sequence-level KD) trains on the teacher's greedy answers instead of the references, any two vocabularies."
    )
    losses: list[LossTerm] | None = Field(
        None, description="The loss as a list of weighted terms, e.g. [{name: ce, weight: 0.5}, {name: forward_kl, weight: "
        "0.5, temperature: 2.0}]: loss = sum of weight x term over answer tokens (dskd, dskd-cma: the divergences make "
        "their student-space term; uld: only vocabulary-free divergences such as `uld`; not used by seqkd). A term's parameters it does not "
        "set come from the keys below of the same name (temperature, skew, beta, head_mass). null: the shorthand "
        "[{name: ce, weight: 1 - kd_rate}, {name: DIVERGENCE, weight: kd_rate}], DIVERGENCE = `divergence` (uld: `uld`).")
    divergence: str = Field("forward_kl", description="Shorthand (with kd_rate) for `losses`: the divergence of vanilla KD "
                            "and of the DSKD student-space term, a name as in `losses` (not used by uld and seqkd).")
    kd_rate: float = Field(0.5, ge=0, le=1, description="Shorthand for `losses`: r in loss = (1 - r) * CE + r * KD "
                           "(not used by seqkd).")
    temperature: float = Field(1.0, gt=0, description="Softmax temperature applied to teacher and student logits alike "
                               "(each divergence's, unless its `losses` term sets its own; DSKD's teacher-space KL).")
    skew: float = Field(0.1, gt=0, lt=1, description="lambda of the skewed KL divergences.")
    beta: float = Field(0.5, gt=0, lt=1, description="beta of the generalized JSD.")
    head_mass: float = Field(0.5, gt=0, lt=1, description="mu of adaptive KL: teacher mass that makes up the head.")
    chunk_size: int | None = Field(128, ge=1, description="Answer tokens projected to the vocabulary at a time (null: all at once); 128 ran the fused step faster than 32 or 256 on a CPU (benchmarks/kd_step.py).")
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
    teacher_endpoint: EndpointConfig | None = Field(None, description="seqkd: the teacher answers through this OpenAI-compatible "
                                                    "endpoint (teacher.name still gives its tokenizer and chat format; "
                                                    "in a grid, the seqkd cells use it; null: the teacher is loaded here).")
    teacher_cache: str | None = Field(None, description="A `distillqa teacher cache` directory: vanilla KD reads the "
                                      "teacher's sparse distributions from it instead of loading the teacher (its "
                                      "manifest must match teacher.name, the student's tokenizer, data and prompt; "
                                      "temperature 1; a sampling cache needs divergence forward_kl).")

    @field_validator("divergence")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v == "ce":
            raise ValueError("'ce' is not a divergence; the CE term's weight is 1 - kd_rate")
        LossTerm(name=v, weight=1)
        return v

    @model_validator(mode="after")
    def _options_agree(self):
        if self.losses is not None:
            self._check_losses()
        if self.lmbda and self.algorithm == "seqkd":
            raise ValueError("lmbda: seqkd trains on the teacher's answers; on-policy KD (lmbda > 0) needs a token-level "
                             "algorithm (vanilla, dskd, dskd-cma, uld)")
        if self.lmbda and self.teacher_cache:
            raise ValueError("teacher_cache: a cache holds the teacher's distributions on the reference answers, not on "
                             "the student's samples; on-policy KD (lmbda > 0) needs the teacher loaded")
        if self.teacher_cache and self.algorithm != "vanilla":
            raise ValueError(f"teacher_cache: only 'vanilla' KD trains from a cache, not '{self.algorithm}' (DSKD and "
                             "DSKD-CMA need the teacher's hidden states, ULD the teacher's own tokenisation)")
        if self.teacher_cache and (t := self.temperatures() - {1}):
            raise ValueError("teacher_cache: a cache holds log-probabilities at temperature 1, whose tail mass at another "
                             f"temperature is unknown; set temperature=1 (got {', '.join(f'{x:g}' for x in sorted(t))})")
        return self

    def _check_losses(self):
        names = [t.name for t in self.losses]
        if names.count("ce") > 1 or names.count("ce") == len(names):
            raise ValueError("losses: list at most one `ce` and at least one divergence")
        if any(getattr(self, k) != type(self).model_fields[k].default for k in ("kd_rate", "divergence")):
            raise ValueError("losses: kd_rate and divergence are its shorthand; set the weights and divergences in "
                             "losses only")
        if self.algorithm == "uld":
            from distillqa.train.losses import DIVERGENCES
            if tied := [n for n in names if n != "ce" and not DIVERGENCES[n].vocabulary_free]:
                raise ValueError(f"losses: uld pairs tokens of two vocabularies by position, so its divergences must "
                                 f"not compare token ids; {', '.join(tied)} does (use `uld`)")

    def loss_terms(self) -> list[LossTerm]:
        """`losses`, or its shorthand [ce: 1 - kd_rate, divergence (uld: `uld`): kd_rate]."""
        if self.losses is not None:
            return self.losses
        kd = "uld" if self.algorithm == "uld" else self.divergence
        return [LossTerm(name="ce", weight=1 - self.kd_rate), LossTerm(name=kd, weight=self.kd_rate)]

    def term_params(self, term: LossTerm) -> dict[str, Any]:
        """A divergence term's parameters: its own, else this section's key of the same name, else the divergence's default."""
        from distillqa.train.losses import parameters
        return {p: term.params().get(p, getattr(self, p, default)) for p, default in parameters(term.name).items()}

    def temperatures(self) -> set[float]:
        return {self.term_params(t)["temperature"] for t in self.loss_terms() if t.name != "ce"}

    def divergence_names(self) -> set[str]:
        return {t.name for t in self.loss_terms() if t.name != "ce"}


class CacheSettings(Section):
    """What a teacher cache stores per answer token (`distillqa teacher cache`, `grid.teacher_cache`)."""

    method: Literal["topk", "sampling"] = Field(
        "topk", description="`topk`: the k most likely tokens, the log of the remaining mass (a tail bucket) and "
        "`tail_samples` draws from that remaining mass; "
        "`sampling`: `samples` tokens drawn from the teacher with replacement, with weights count / samples "
        "(an unbiased forward-KL target, Anshumann et al. 2025).")
    k: int = Field(8, ge=1, description="topk: tokens kept per answer token; with the default 8 draws from the tail "
                   "(8 + 8) x (4 + 2) + 2 = 98 bytes at float16, plus 4 per example.")
    samples: int = Field(32, ge=1, le=4096, description="sampling: draws per answer token.")
    tail_samples: int = Field(8, ge=0, le=4096, description="topk: tokens also drawn, with replacement, from the teacher's "
                              "tail (the tokens not kept), stored like the kept ones (6 bytes each). Forward KL from the cache "
                              "then weighs the kept tokens p_v and each draw (tail mass) / tail_samples: an unbiased target, "
                              "as sampling is; other divergences read the kept tokens and the tail bucket only (for them: k 16, "
                              "tail_samples 0, the same bytes). 0: plain top-k.")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Storage type of the log-probabilities "
                                                              "and of the log tail mass.")
    shard_examples: int = Field(256, ge=1, description="Training examples per shard (the unit written, checked and resumed).")
    batch_size: int = Field(8, ge=1, description="Examples per teacher forward pass.")
    seed: int = Field(0, description="Seed of the draws (per example, so a resumed cache is identical).")


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
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name="smollm2-135m@layers=angular:26"))
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    output_dir: str = Field("runs/distill", description="Run directory (config, log, checkpoints, final student).")

    @model_validator(mode="after")
    def _endpoint_teacher(self):
        if self.kd.teacher_endpoint and self.kd.algorithm != "seqkd":
            raise ValueError(f"kd.teacher_endpoint: only 'seqkd' takes the teacher's answers from an endpoint; "
                             f"'{self.kd.algorithm}' needs the teacher's distributions, so the teacher is loaded here")
        return self


# A grid's algorithms: those of `kd.algorithm`, and the token-level ones on-policy (`-onpolicy`, with `distill.kd.lmbda`).
ON_POLICY = "-onpolicy"
Algorithm = Literal["vanilla", "dskd", "dskd-cma", "uld", "seqkd",
                    "vanilla-onpolicy", "dskd-onpolicy", "dskd-cma-onpolicy", "uld-onpolicy"]


class DeriveConfig(Section):
    """`distillqa derive-student`: a layer-pruned student, optionally healed from its parent."""

    parent: ModelConfig = Field(default_factory=ModelConfig, description="The model whose layers are pruned.")
    layers: str = Field("angular:26", description="Layers kept: `every-other`, indices and ranges (`0-3,8`), or measured on "
                        "the corpus: `angular:K` (drop the most redundant contiguous block) or `block-influence:K`.")
    data: DataConfig = Field(default_factory=DataConfig, description="QA data: the `train` corpus and the zero-shot check.")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    heal: HealConfig = Field(default_factory=HealConfig)
    output_dir: str = Field("runs/student", description="The student: a model directory, or a run directory when healed.")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_preset(presets: dict[str, dict], default: str, raw: Any) -> Any:
    """The raw config laid over its preset's values: presets fill in what the user leaves out, explicit keys win."""
    if isinstance(raw, dict) and (preset := raw.get("preset", default)) in presets:
        return _deep_merge(presets[preset], raw)
    return raw


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
