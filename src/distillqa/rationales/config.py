"""The schemas of `distillqa rationales generate` and `distillqa rationales experiment`, and the
experiment's presets (cpu | paper), built from the shared sections of `distillqa.config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from distillqa.config import (DataConfig, GenerationConfig, JudgeConfig, LoraConfig, ModelConfig, PromptConfig, Section,
                              TrainConfig, apply_preset)


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

    @model_validator(mode="after")
    def _in_process(self):
        if self.generation.endpoint:
            raise ValueError("generation.endpoint: rationale experiments generate with the models they train, in-process")
        return self


class RationaleCellConfig(Section):
    """What shapes the training of one cell: its run directory's config.yaml, against which a resumed cell is checked."""

    method: Literal["mt", "cf", "mt+cf"]
    rationale_type: Literal["unrevised", "revised"]
    seed: int
    experiment: RationaleExperimentConfig = Field(description="The experiment's config, with the keys that change the "
                                                  "statistics alone at their defaults.")
