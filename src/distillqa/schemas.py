"""What `distillqa config COMMAND` prints: every command's config schema by that name (the core
commands' from `distillqa.config`, each study's from beside its code), described key by key."""

from __future__ import annotations

import json
from typing import get_args

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


def optional_section(annotation) -> type[BaseModel] | None:
    """The section a field such as `endpoint: EndpointConfig | None` holds when it is set."""
    return next((a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


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
                                    default_flow_style=True, width=1000).strip()[1:-1]  # the braces of {name: value}
            comment = f"  # {field.description}" if field.description else ""
            lines.append(f"{indent}{dumped}{comment}")
            if value is None and (section := optional_section(field.annotation)):  # its keys, commented out
                for key, sub in section.model_fields.items():
                    default = "required" if sub.is_required() else json.dumps(sub.default)
                    lines.append(f"{indent}#   {key}: {default}  # {sub.description}")

    walk(schema(), "")
    return "\n".join(lines) + "\n"
