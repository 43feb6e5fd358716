"""Layer-pruned students: keep a subset of a loaded model's decoder layers (same vocabulary).

`every-other` keeps layers 0, 2, 4, ... (SmolLM2's 30 layers become 15). An explicit spec
lists indices and ranges: `0-3,8,12-14`. A measured spec, `angular:K` or `block-influence:K`,
keeps K layers ranked on calibration text (see `importance.py`); a model name such as
`smollm2-135m@layers=angular:20` calibrates on the bundled telecom sample's prompts. A model
name with `@layers=` is built from these by the registry (`registry.derive_student`).
"""

from __future__ import annotations

import re

from torch import nn

from distillqa.errors import ModelError
from distillqa.models.importance import MEASURED_SPEC, choose_layers
from distillqa.models.traits import decoder_layers


def parse_layer_spec(spec: str, num_layers: int) -> list[int]:
    spec = spec.strip()
    if spec == "every-other":
        return list(range(0, num_layers, 2))
    keep: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+))?\s*", part)
        if not m:
            raise ModelError(f"layer spec '{spec}': expected 'every-other' or indices and ranges like '0-3,8'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        keep.extend(range(lo, hi + 1))
    if not keep or sorted(set(keep)) != keep or keep[-1] >= num_layers:
        raise ModelError(f"layer spec '{spec}': indices must be increasing, unique and below {num_layers}")
    return keep


def prune_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep only the decoder layers in `keep`, in place, and make the config agree."""
    layers = decoder_layers(model)
    model.model.layers = nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(model.model.layers):
        # The KV cache is indexed by each attention module's layer_idx.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    cfg = model.config
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)
    return model


def is_measured(spec: str) -> bool:
    return bool(MEASURED_SPEC.fullmatch(spec.strip()))


def select_layers(model: nn.Module, spec: str, calibration: list[dict] | None = None) -> tuple[list[int], dict]:
    """The layers `spec` keeps, and how they were chosen (with the measurements, for measured
    specs, which need `calibration`: token batches with input_ids and attention_mask)."""
    if not is_measured(spec):
        return parse_layer_spec(spec, model.config.num_hidden_layers), {"method": "explicit", "spec": spec}
    if not calibration:
        raise ModelError(f"layer spec '{spec}' ranks layers on calibration text, and none was given")
    return choose_layers(spec, model, calibration)


def bundled_calibration(tok, count: int = 32) -> list[dict]:
    """The bundled telecom sample's first training prompts with answers, in batches of 8."""
    from distillqa.config import DataConfig, PromptConfig
    from distillqa.data import load_splits
    from distillqa.data.prompts import PromptBuilder, collate_right

    prompt = PromptConfig(max_length=256)
    builder = PromptBuilder(tok, prompt.template, prompt.instruction, prompt.max_length)
    encoded = [e for ex in load_splits(DataConfig())[0]["train"][:count] if (e := builder.encode_train(ex))]
    return [collate_right(encoded[i : i + 8], tok.pad_token_id) for i in range(0, len(encoded), 8)]
