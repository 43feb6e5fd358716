"""What changed between a config a previous run wrote and today's: the one rule by which a run
directory, a generation, a rationale file and an experiment refuse to continue under another config.

A config an earlier version wrote is first read with today's schema (`upgraded`), so an option
added since, at its default, never makes a finished run look changed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


def previous_config(path: Path) -> Any:
    """The config a previous run wrote at `path`, parsed (None if it is damaged: then every key differs)."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


def upgraded(schema: type[BaseModel], raw: Any) -> Any:
    """A config an earlier version wrote, read with today's schema: keys added since take their
    defaults, so a new option does not make an old run look changed. Kept as it is when today's
    schema rejects it (a key removed since), so the comparison shows what differs."""
    try:
        return schema.model_validate(raw).model_dump(mode="json")
    except ValidationError:
        return raw


def changed_keys(cfg: BaseModel, previous: Any) -> list[str]:
    """The dotted keys in which `previous` (a config a run wrote, as parsed YAML) differs from `cfg`."""
    return diff_keys(upgraded(type(cfg), previous), cfg.model_dump(mode="json"))


def diff_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]
