"""The shared shape of a divergence, its registry, and chunked averaging over tokens."""

from __future__ import annotations

import inspect
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


class Divergence(nn.Module):
    """D(p || q) per token, p = softmax(teacher_logits / T), q = softmax(student_logits / T).

    Subclasses implement `per_token(student_logp, teacher_logp) -> [N]` on log-probabilities
    (float32 or float64), summing over the vocabulary, and where it is simple override
    `value_and_grad` with the closed-form gradient that the fused KD step (`fused.py`) uses.

    A subclass declared with a name (`class ForwardKL(Divergence, name="forward_kl")`) registers itself
    in `DIVERGENCES` under it, with its constructor's keyword arguments as its parameters: so a new
    divergence is one file in this package, and `kd.divergence` / `kd.losses` accept it at once.
    `vocabulary_free` divergences compare distributions without a token correspondence (ULD), so
    they also work between two vocabularies.
    """

    name: ClassVar[str]
    vocabulary_free: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is not None:
            if name in DIVERGENCES or name == "ce":
                raise TypeError(f"divergence name '{name}' is taken")
            cls.name = name
            DIVERGENCES[name] = cls

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def per_token(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Per-token divergence [N] from logits [N, V] (temperature applied to both sides)."""
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        s = torch.log_softmax(student_logits.to(dtype) / self.temperature, dim=-1)
        t = torch.log_softmax(teacher_logits.to(dtype) / self.temperature, dim=-1)
        return self.per_token(s, t)

    def value_and_grad(self, student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`per_token` [N], its gradient [N, V] w.r.t. z, the student's logits / T, where student_logp = log_softmax(z)).

        This default differentiates `per_token` by autograd, one chunk at a time; a closed form avoids
        autograd's intermediates. One follows from G = dD/d(student_logp), the log-probabilities taken
        as free variables: dD/dz = G - q * sum_v G_v (`softmax_backward`).
        """
        with torch.enable_grad():
            z = student_logp.detach().requires_grad_()
            value = self.per_token(torch.log_softmax(z, dim=-1), teacher_logp)
            (grad,) = torch.autograd.grad(value.sum(), z)
        return value.detach(), grad


DIVERGENCES: dict[str, type[Divergence]] = {}


def parameters(name: str) -> dict[str, Any]:
    """The parameters of a registered divergence and their defaults, e.g. {'temperature': 1.0, 'skew': 0.1}."""
    signature = inspect.signature(DIVERGENCES[name].__init__)
    return {p.name: p.default for p in list(signature.parameters.values())[1:]
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_fraction(name: str, value: float) -> float:
    if not 0 < value < 1:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
    return value


def softmax_backward(logp: torch.Tensor, grad_logp: torch.Tensor) -> torch.Tensor:
    """The gradient w.r.t. z of a function of logp = log_softmax(z), from its gradient G w.r.t. logp:
    G - softmax(z) * sum_v G_v."""
    return grad_logp - logp.exp() * grad_logp.sum(-1, keepdim=True)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v), per row; 0 * log 0 taken as 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), 0.0).sum(-1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q), computed stably in log space."""
    w = torch.tensor(weight_p, dtype=logp.dtype, device=logp.device)
    return torch.logaddexp(logp + torch.log(w), logq + torch.log1p(-w))


def chunk_slices(n: int, chunk: int | None, device: torch.device) -> list[slice]:
    """Slices of at most `chunk` rows (all n at once without `chunk`) covering n rows.

    In a launch of several processes each process gets as many slices as the one with the most rows, the extra
    ones empty: under DeepSpeed ZeRO-3 every call of a head module gathers its weights from all processes, and
    DeepSpeed prefetches the weights of the modules that followed last time, so a process calling the heads
    fewer times than another would leave it waiting for a gather forever.
    """
    if chunk and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor(n, device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        n = int(most)
    step = chunk or max(n, 1)
    return [slice(start, start + step) for start in range(0, max(n, 1), step)]


def chunked_mean(
    per_token: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], chunk: int | None
) -> torch.Tensor:
    """Mean over rows of `per_token(*row_slices)`, holding at most `chunk` rows of logits at a time.

    `per_token` maps row slices of `inputs` (e.g. hidden states and targets) to per-row losses,
    [n] or [n, k] for k loss terms at once, typically projecting to the vocabulary first. With
    `chunk`, each slice is wrapped in activation checkpointing, so its [chunk, V] logits are
    freed after the forward and recomputed in the backward: peak memory is one chunk's logits
    instead of all N rows'. The slices are `chunk_slices`' (as many in every process). Returns a scalar, or [k]
    (0 for no rows).
    """
    n = inputs[0].shape[0]
    slices = chunk_slices(n, chunk, inputs[0].device)
    if len(slices) == 1:
        return per_token(*inputs).sum(0) / max(n, 1)
    total = 0.0
    for rows in slices:
        part = tuple(x[rows] for x in inputs)
        if torch.is_grad_enabled():
            total = total + checkpoint(lambda *a: per_token(*a).sum(0), *part, use_reentrant=False)
        else:
            total = total + per_token(*part).sum(0)
    return total / max(n, 1)
