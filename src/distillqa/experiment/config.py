"""The schema of `distillqa experiment run` and its presets (quick | cpu | paper), built from the
shared sections of `distillqa.config`."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from distillqa.config import (ON_POLICY, Algorithm, CacheSettings, DataConfig, EvaluateConfig, GenerationConfig, HealConfig, KDConfig,
                              LoraConfig, MCQConfig, ModelConfig, PromptConfig, Section, TrainConfig, apply_preset)
from distillqa.metrics.registry import asks_for_judge

State = Literal["base", "sft"]


class TeacherSpec(Section):
    name: str = Field(..., description="Teacher model (any model name).")
    algorithms: list[Algorithm] = Field(..., min_length=1, description="KD algorithms run with this teacher; "
                                        "`<algorithm>-onpolicy` is that algorithm on-policy, with lmbda `distill.kd.lmbda` "
                                        "(the other cells train on the references, lmbda 0).")


class GridConfig(Section):
    student: ModelConfig = Field(default_factory=lambda: ModelConfig(name="smollm2-135m@layers=angular:26"),
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


class SlurmConfig(Section):
    cluster: Literal["slurm", "local"] = Field("slurm", description="submitit's cluster: slurm (sbatch), or local "
                                               "(each stage a process on this machine, to try a configuration).")
    partition: str | None = Field(None, description="SLURM partition (sbatch --partition); unset: the cluster's default.")
    timeout_min: int = Field(240, gt=0, description="Time limit of each stage's job in minutes; a stage cut off is "
                             "submitted again (`dispatch.retries`) and resumes where it stopped.")
    cpus_per_task: int = Field(8, gt=0, description="CPUs of each stage's job.")
    gpus_per_node: int = Field(1, ge=0, description="GPUs of each stage's job.")
    mem_gb: int = Field(64, gt=0, description="Memory of each stage's job, GB.")
    additional: dict[str, str] = Field({}, description="Further sbatch options, e.g. `{account: myproject, qos: high}`.")


class DispatchConfig(Section):
    """Where the stages run. Results do not depend on it, so it may change between runs of an experiment."""

    backend: Literal["local", "ray", "slurm"] = Field(
        "local", description="local: one stage after another in this process; ray: concurrently on a Ray cluster; "
        "slurm: each stage a SLURM job (through submitit). A stage starts once the stages it needs are done. Every "
        "worker must see the experiment directory and $DISTILLQA_CACHE at the same paths as this machine.")
    max_concurrent: int | None = Field(None, gt=0, description="At most this many stages at once (default: every stage "
                                       "that is ready; Ray also fits them to the resources each asks for).")
    retries: int = Field(2, ge=0, description="A stage whose worker is lost (killed, preempted, out of time) is started "
                         "again up to this many times and resumes from what it had finished; a stage that fails with "
                         "an error stops the experiment.")
    ray_address: str | None = Field(None, description="Ray cluster to join ('auto': the one started on this machine "
                                    "with `ray start`; 'ray://HOST:10001'); unset: a local one on this machine's CPUs.")
    cpus_per_stage: float = Field(1, gt=0, description="Ray: CPUs each stage reserves (its torch threads too).")
    gpus_per_stage: float | None = Field(None, ge=0, description="Ray: GPUs each stage reserves (unset: 1 when the "
                                         "cluster has GPUs, else 0).")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="The jobs of backend slurm.")

    @field_validator("backend")
    @classmethod
    def _installed(cls, v):
        package = {"ray": "ray", "slurm": "submitit"}.get(v)
        if package and importlib.util.find_spec(package) is None:
            raise ValueError(f"backend {v} needs {package}, which is not installed: pip install -e '.[scale]' "
                             f"(or pip install {package})")
        return v


EXPERIMENT_PRESETS: dict[str, dict] = {
    # The bundled sample, all 36 test questions, one algorithm per teacher (8 cells), a few steps a stage.
    # Distillation and the SFT-only baselines train every weight (8 steps of 4, lr 3e-4). Measured on the
    # bundled sample (ROUGE-L): a 22-layer student plateaus near 0.23 whatever it learns from (SFT alone
    # 0.24 at 8 steps, 0.20 at 16), a 26-layer one reaches 0.32; with the Gemma teacher, ULD and DSKD-CMA
    # carry no sign of the teacher's SFT at this budget (0.22 from the base teacher, 0.20 from the SFT'd
    # one) while sequence-level KD does (0.14 -> 0.37), so the different-vocabulary teacher uses seqkd here.
    "quick": {
        "data": {"source": "bundled:telecom-sample"},
        "prompt": {"max_length": 256},
        "grid": {"heal": {"steps": 40},
                 "teachers": [{"name": "smollm2-135m", "algorithms": ["vanilla"]},
                              {"name": "gemma3-270m", "algorithms": ["seqkd"]}]},
        # No validation loss: runs of 6-8 steps would each spend about 13 s on it (2.5 of the demo's minutes).
        "sft": {"train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 2, "eval_every": 0}},
        "distill": {"lora": {"enabled": False},
                    "train": {"max_steps": 8, "batch_size": 4, "lr": 3e-4, "checkpoint_every": 4, "eval_every": 0},
                    "kd": {"answer_tokens": 24}},
        "generation": {"max_new_tokens": 16, "batch_size": 18},
        "evaluate": {"metrics": "offline"},
    },
    # TeleQuAD (or any QA file) from a path you give, sized for at most 2 hours on a 2-core CPU:
    # 200 test questions, 8 cells as in quick (vanilla KD, seqkd), 24 steps of 8 per SFT, 16 per KD cell and SFT-only baseline.
    "cpu": {
        "data": {"format": "auto", "max_train_examples": 400, "max_eval_examples": 200},
        "prompt": {"max_length": 384},
        "grid": {"heal": {"steps": 60},
                 "teachers": [{"name": "smollm2-135m", "algorithms": ["vanilla"]},
                              {"name": "gemma3-270m", "algorithms": ["seqkd"]}]},
        "sft": {"train": {"max_steps": 24, "batch_size": 8, "lr": 1e-3, "checkpoint_every": 8}},
        "distill": {"lora": {"enabled": False},
                    "train": {"max_steps": 16, "batch_size": 8, "lr": 3e-4, "checkpoint_every": 8},
                    "kd": {"answer_tokens": 32}},
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
    dispatch: DispatchConfig = Field(default_factory=DispatchConfig)
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
        kd = self.distill.kd
        if kd.losses is not None and any(a.removesuffix(ON_POLICY) == "uld" for t in self.grid.teachers for a in t.algorithms):
            kd.model_copy(update={"algorithm": "uld"})._check_losses()  # one distill.kd serves every cell
        if self.grid.teacher_cache and (t := kd.temperatures() - {1}):
            raise ValueError("grid.teacher_cache: a teacher cache holds log-probabilities at temperature 1; "
                             f"set distill.kd.temperature=1 (got {', '.join(f'{x:g}' for x in sorted(t))})")
        if self.grid.teacher_cache and self.distill.cache.method == "sampling" and kd.divergence_names() != {"forward_kl"}:
            raise ValueError("grid.teacher_cache: a sampling cache is an unbiased target for forward KL only; set "
                             "distill.kd.divergence=forward_kl or distill.cache.method=topk")
        for key, endpoint in (("generation.endpoint", self.generation.endpoint),
                              ("distill.kd.teacher_endpoint", self.distill.kd.teacher_endpoint)):
            if endpoint and endpoint.model:
                raise ValueError(f"{key}.model: the grid's rows and teachers are different models; leave it unset, "
                                 "so that each asks the endpoint for its own model by name")
        on_policy = sorted({a for t in self.grid.teachers for a in t.algorithms if a.endswith(ON_POLICY)})
        if on_policy and not self.distill.kd.lmbda:
            raise ValueError(f"grid.teachers: {on_policy} sample the student's answers with probability distill.kd.lmbda, "
                             "which is 0; set it (1: every batch on-policy)")
        if self.preset == "cpu" and self.data.source.startswith("bundled:"):
            raise ValueError("preset 'cpu' needs data.source: the path of your QA file (e.g. TeleQuAD-v4-full.json)")
        specs = [self.evaluate.metrics] + [h.metrics for h in self.held_out if h.metrics]
        if any(asks_for_judge(spec) for spec in specs) and not (self.evaluate.judge.url or self.evaluate.judge.local_model):
            raise ValueError("evaluate.metrics includes judge metrics: set evaluate.judge.url and evaluate.judge.model "
                             "(or evaluate.judge.local_model), or use evaluate.metrics=offline")
        return self
