"""The shared shape of a divergence, and chunked averaging over tokens."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Divergence(nn.Module):
    """D(p || q) per token, p = softmax(teacher_logits / T), q = softmax(student_logits / T).

    Subclasses implement `per_token(student_logp, teacher_logp) -> [N]` on log-probabilities
    (float32 or float64), summing over the vocabulary.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Per-token divergence [N] from logits [N, V] (temperature applied to both sides)."""
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        s = torch.log_softmax(student_logits.to(dtype) / self.temperature, dim=-1)
        t = torch.log_softmax(teacher_logits.to(dtype) / self.temperature, dim=-1)
        return self.per_token(s, t)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), per row; 0 * log 0 taken as 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q), computed stably in log space."""
    w = torch.tensor(weight_p, dtype=logp.dtype, device=logp.device)
    return torch.logaddexp(logp + torch.log(w), logq + torch.log1p(-w))


def chunked_mean(
    per_token: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], chunk: int | None
) -> torch.Tensor:
    """Mean over rows of `per_token(*row_slices)`, holding at most `chunk` rows of logits at a time.

    `per_token` maps row slices of `inputs` (e.g. hidden states and targets) to per-row losses,
    [n] or [n, k] for k loss terms at once, typically projecting to the vocabulary first. With
    `chunk`, each slice is wrapped in activation checkpointing, so its [chunk, V] logits are
    freed after the forward and recomputed in the backward: peak memory is one chunk's logits
    instead of all N rows'. Returns a scalar, or [k].
    """
    n = inputs[0].shape[0]
    if n == 0:
        return per_token(*inputs).sum(0) * 0.0
    if chunk is None or chunk >= n:
        return per_token(*inputs).sum(0) / n
    total = 0.0
    for start in range(0, n, chunk):
        part = tuple(x[start : start + chunk] for x in inputs)
        if torch.is_grad_enabled():
            total = total + checkpoint(lambda *a: per_token(*a).sum(0), *part, use_reentrant=False)
        else:
            total = total + per_token(*part).sum(0)
    return total / n
