"""What `distillqa config COMMAND` prints: every command's config schema by that name (the core
commands' from `distillqa.config`, each study's from beside its code), described key by key."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from distillqa.config import DistillConfig, EvaluateConfig, GenerateConfig, SFTConfig, TeacherCacheConfig
from distillqa.experiment.config import ExperimentConfig
from distillqa.rationales.config import RationaleExperimentConfig, RationaleGenerateConfig

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
