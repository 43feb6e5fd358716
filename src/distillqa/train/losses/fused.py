"""Vanilla KD's loss and its gradient in one chunked pass over the answer tokens (fused linear KD).

For N answer tokens with student states h_i, head weight W (logits s_i = W h_i, softcapped where the
model does), teacher logits t_i, targets y_i and the loss's terms (`LossTerms`: CE weight w_ce,
divergences D_j with weights w_j and temperatures T_j):

    loss = w_ce * 1/N sum_i CE(s_i, y_i) + sum_j w_j * 1/N sum_i D_j(p_ij || q_ij),  p_ij = softmax(t_i / T_j), q_ij = softmax(s_i / T_j)
    dloss/ds_i = [w_ce (softmax(s_i) - onehot(y_i)) + sum_j w_j / T_j * dD_j/dz_ij] / N,  z_ij = s_i / T_j

with dD/dz from each divergence's `value_and_grad`: a closed form for forward KL, reverse KL, JS,
generalized JSD, total variation and adaptive KL; autograd on one chunk for the skewed KLs and ULD.

The forward computes, chunk by chunk, the student's and the teacher's logits once, the loss, dloss/ds,
and from it the chunk's share of the gradients w.r.t. h (dloss/ds W) and W (sum_i dloss/ds_i^T h_i);
the backward only scales them. Autograd through checkpointed chunks (`chunked_mean`) instead computes
both models' logits twice (forward, then again in the backward) and differentiates log_softmax and the
divergence op by op, for the same gradients. Peak memory: one chunk's logits and gradient, plus the
gradients of h [N, H] and of W [V, H] (only when W trains), which autograd holds too. The trick is
Liger-Kernel's fused linear cross-entropy.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from distillqa.train.losses.base import chunk_slices
from distillqa.train.losses.terms import LossTerms
from distillqa.train.objectives import softcapped


class FusedLinearKD(torch.autograd.Function):
    """(loss, CE, the divergences' averages [k]) of the formula above; only the loss is differentiable (CE and
    the divergences are for the logs)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, targets: torch.Tensor,
                teacher_logits: Callable[[slice], torch.Tensor], terms: LossTerms, chunk: int | None):
        n, ce_weight = hidden.shape[0], terms.ce_weight
        count = max(n, 1)  # a process without answer tokens still runs (empty) chunks: chunk_slices
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        sums = torch.zeros(1 + len(terms.divergences), device=hidden.device)  # CE, each divergence
        for rows in chunk_slices(n, chunk, hidden.device):  # as many chunks in every process (see chunk_slices)
            h, y = hidden[rows].to(weight.dtype), targets[rows]
            logits = softcapped(F.linear(h, weight), softcap).float()
            logp = torch.log_softmax(logits, dim=-1)
            teacher = teacher_logits(rows)
            v = min(logits.shape[-1], teacher.shape[-1])  # embedding rows past the tokenizer are padding
            values, kd_grad = [-logp.gather(-1, y[:, None])[:, 0].sum()], None
            for w, divergence in zip(terms.weights, terms.divergences):
                value, grad = divergence.value_and_grad(*log_softmax_pair(logp, logits, teacher, v, divergence.temperature))
                values.append(value.sum())
                grad.mul_(w / divergence.temperature)
                kd_grad = grad if kd_grad is None else kd_grad.add_(grad)
            sums += torch.stack(values)
            if grad_hidden is None and grad_weight is None:
                continue
            # In place, each a single pass over the chunk's logits (logp is not read again); the 1 / N
            # is applied to the small products below instead.
            grad = logp.exp_().mul_(ce_weight)
            grad[torch.arange(len(y), device=y.device), y] -= ce_weight
            grad[:, :v].add_(kd_grad)
            if softcap:  # d(c tanh(x / c))/dx = 1 - (out / c)^2
                grad *= 1 - (logits / softcap) ** 2
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad @ weight) / count
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h, alpha=1 / count)
        means = sums / count
        ce, kd_values = means[0], means[1:]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce, kd_values)
        return terms.total(ce, terms.kd(kd_values)), ce, kd_values

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss for g in (grad_hidden, grad_weight)]
        return *scaled, None, None, None, None, None


def log_softmax_pair(logp: torch.Tensor, logits: torch.Tensor, teacher: torch.Tensor, v: int, temperature: float):
    """The student's and the teacher's log-probabilities at `temperature` over the first v tokens; at T = 1 over
    the whole vocabulary the student's are the CE term's `logp`."""
    if temperature == 1:
        return (logp if v == logits.shape[-1] else torch.log_softmax(logits[:, :v], dim=-1)), torch.log_softmax(teacher[:, :v], dim=-1)
    return torch.log_softmax(logits[:, :v] / temperature, dim=-1), torch.log_softmax(teacher[:, :v] / temperature, dim=-1)
