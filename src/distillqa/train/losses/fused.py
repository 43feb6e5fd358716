"""Vanilla KD's loss and its gradient in one chunked pass over the answer tokens (fused linear KD).

For N answer tokens with student states h_i, head weight W (logits s_i = W h_i, softcapped where the
model does), teacher logits t_i, targets y_i, temperature T and r = kd_rate:

    loss = (1 - r) * 1/N sum_i CE(s_i, y_i) + r * 1/N sum_i D(p_i || q_i),  p_i = softmax(t_i / T), q_i = softmax(s_i / T)
    dloss/ds_i = [(1 - r) (softmax(s_i) - onehot(y_i)) + r / T * dD/dz_i] / N,  z_i = s_i / T

with dD/dz from the divergence's `value_and_grad`: a closed form for forward KL, reverse KL, JS,
generalized JSD, total variation and adaptive KL; autograd on one chunk for the skewed KLs.

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

from distillqa.train.losses.base import Divergence
from distillqa.train.objectives import softcapped


class FusedLinearKD(torch.autograd.Function):
    """(loss, CE, KD) of the formula above; only the loss is differentiable (CE and KD are for the logs)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, targets: torch.Tensor,
                teacher_logits: Callable[[slice], torch.Tensor], divergence: Divergence, kd_rate: float, chunk: int | None):
        n, temperature = hidden.shape[0], divergence.temperature
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        sums = torch.zeros(2, device=hidden.device)  # CE, KD
        step = chunk or max(n, 1)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            h, y = hidden[rows].to(weight.dtype), targets[rows]
            logits = softcapped(F.linear(h, weight), softcap).float()
            logp = torch.log_softmax(logits, dim=-1)
            teacher = teacher_logits(rows)
            v = min(logits.shape[-1], teacher.shape[-1])  # embedding rows past the tokenizer are padding
            # At T = 1 over the whole vocabulary the KD term's student distribution is the CE term's.
            same = temperature == 1 and v == logits.shape[-1]
            student_logp = logp if same else torch.log_softmax(logits[:, :v] / temperature, dim=-1)
            teacher_logp = torch.log_softmax(teacher[:, :v] if temperature == 1 else teacher[:, :v] / temperature, dim=-1)
            kd, kd_grad = divergence.value_and_grad(student_logp, teacher_logp)
            ce = -logp.gather(-1, y[:, None])[:, 0]
            sums += torch.stack([ce.sum(), kd.sum()])
            if grad_hidden is None and grad_weight is None:
                continue
            # In place, each a single pass over the chunk's logits (logp is not read again); the 1 / N
            # is applied to the small products below instead.
            grad = logp.exp_().mul_(1 - kd_rate)
            grad[torch.arange(len(y), device=y.device), y] -= 1 - kd_rate
            grad[:, :v].add_(kd_grad, alpha=kd_rate / temperature)
            if softcap:  # d(c tanh(x / c))/dx = 1 - (out / c)^2
                grad *= 1 - (logits / softcap) ** 2
            grad = grad.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad @ weight) / n
            if grad_weight is not None:
                grad_weight.addmm_(grad.T, h, alpha=1 / n)
        ce, kd = sums / max(n, 1)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(ce, kd)
        return (1 - kd_rate) * ce + kd_rate * kd, ce, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss for g in (grad_hidden, grad_weight)]
        return *scaled, None, None, None, None, None, None
