"""Which decoder layers a pruned student keeps, chosen by measured importance on sample text.

Two measures, both from the hidden state entering and leaving decoder layers, averaged over
every non-padding token of the calibration batches:
- `angular:K` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"):
  drop the contiguous block of n = L - K layers whose input x_l and output x_(l+n) are closest
  in angle, d = arccos(cos(x_l, x_(l+n))) / pi; keep the rest.
- `block-influence:K` (ShortGPT, Men et al. 2024): a layer's influence is 1 - cos(x_in, x_out);
  keep the K layers of highest influence.
A layer that changes nothing (an identity) has distance and influence 0: it goes first.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from distillqa.errors import ModelError
from distillqa.models.traits import decoder_layers

MEASURED_SPEC = re.compile(r"(angular|block-influence):(\d+)")


@torch.no_grad()
def layer_boundaries(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Hidden states at the L + 1 layer boundaries (input of layer 0 .. output of layer L-1) at
    every non-padding token of the batches, [L + 1, N, H], and the decoder layers."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor] = []

    def grab_input(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).float())

    def grab_output(module, args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).float())

    hooks = [layer.register_forward_pre_hook(grab_input, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(grab_output))
    per_batch = []
    try:
        model.eval()
        for batch in batches:
            captured.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            keep = batch["attention_mask"].bool()
            per_batch.append(torch.stack([h[keep] for h in captured]))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(per_batch, dim=1), layers


def _mean_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
    return float(torch.arccos(cos).mean() / math.pi)


def angular_distances(states: torch.Tensor, n: int) -> list[float]:
    """d(x_l, x_(l+n)) for every start l of a block of n layers (states: [L + 1, N, H])."""
    return [_mean_angle(states[start], states[start + n]) for start in range(states.shape[0] - n)]


def block_influence(states: torch.Tensor) -> list[float]:
    """1 - mean cos(x_in, x_out) of each layer (states: [L + 1, N, H])."""
    cos = torch.nn.functional.cosine_similarity(states[:-1], states[1:], dim=-1)
    return (1 - cos.mean(dim=1)).tolist()


def choose_layers(spec: str, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[list[int], dict]:
    """Layers to keep for a measured spec (`angular:K` or `block-influence:K`), and the measurements."""
    m = MEASURED_SPEC.fullmatch(spec.strip())
    if not m:
        raise ModelError(f"layer spec '{spec}': expected 'angular:K' or 'block-influence:K'")
    method, keep_count = m.group(1), int(m.group(2))
    states, layers = layer_boundaries(model, batches)
    total = len(layers)
    if not 1 <= keep_count <= total:
        raise ModelError(f"layer spec '{spec}': K must be between 1 and the model's {total} layers")
    if method == "angular":
        n = total - keep_count
        if n == 0:
            return list(range(total)), {"method": method, "distances": []}
        distances = angular_distances(states, n)
        start = min(range(len(distances)), key=distances.__getitem__)
        keep = [i for i in range(total) if not start <= i < start + n]
        return keep, {"method": method, "block": [start, start + n - 1], "distances": distances}
    influence = block_influence(states)
    ranked = sorted(range(total), key=lambda i: influence[i], reverse=True)[:keep_count]
    return sorted(ranked), {"method": method, "influence": influence}
