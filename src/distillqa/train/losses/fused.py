"""Losses over heads' logits in one chunked pass, gradients in closed form (fused linear losses).

A fused linear loss takes m heads, each hidden states h_j [N, H_j] through a weight W_j [V_j, H_j] (logits
z_j = softcapped(h_j W_j^T), where the model softcaps), and a per-chunk function that returns the chunk's loss
summed over its rows, the sums of the values it logs, and dloss/dz_j in closed form. Chunk by chunk it computes
each z_j once, the loss and dloss/dz_j, and from them the chunk's share of the gradients w.r.t. h_j
(dloss/dz_j W_j) and W_j (sum_i dloss/dz_ij^T h_ij) of the mean over the N rows; the backward only scales them.
Autograd through checkpointed chunks (`chunked_mean`) instead computes the logits twice (forward, then again in
the backward) and differentiates log_softmax and the divergences op by op, for the same gradients. Peak memory:
one chunk's logits and gradients, plus the gradients of h_j and W_j (only those that train), which autograd holds
too. The trick is Liger-Kernel's fused linear cross-entropy. On CPU two more things count as much as the passes
themselves: the logits go into buffers that every chunk reuses (a fresh tensor per chunk pays its page faults
again), and `chunk_loss` runs on blocks of rows small enough to stay in cache through its passes.

Vanilla KD (`fused_vanilla_kd`): two heads, the student's (trains) and the teacher's (logits t_i only); with the
loss's terms (`LossTerms`: CE weight w_ce, divergences D_j with weights w_j and temperatures T_j),

    loss = w_ce * 1/N sum_i CE(s_i, y_i) + sum_j w_j * 1/N sum_i D_j(p_ij || q_ij),  p_ij = softmax(t_i / T_j), q_ij = softmax(s_i / T_j)
    dloss/ds_i = [w_ce (softmax(s_i) - onehot(y_i)) + sum_j w_j / T_j * dD_j/dz_ij] / N,  z_ij = s_i / T_j

with dD/dz from each divergence's `value_and_grad`: a closed form for forward KL, reverse KL, JS,
generalized JSD, total variation and adaptive KL; autograd on one chunk for the skewed KLs and ULD.
ULD (`kd.ULD`) is the same over the student's answer tokens, its divergences weighted by whether a token has a teacher
partner; DSKD's two sides (`dskd.py`) are fused linear losses of two heads each (the teacher side's second head
giving the teacher's logits).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from distillqa.train.losses.base import chunk_slices
from distillqa.train.losses.terms import LossTerms
from distillqa.train.objectives import softcapped

# (rows, each head's fp32 logits for those rows, whether each head's gradient is wanted) ->
# (the loss summed over the rows, the logged values summed over the rows [k], dloss/dz_j per head or None)
ChunkLoss = Callable[[slice, list[torch.Tensor], list[bool]], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]]


class FusedLinearLoss(torch.autograd.Function):
    """(mean loss over the rows, the logged values' means [k]); only the loss is differentiable. `tensors` are
    h_1, W_1, h_2, W_2, ...; `softcaps` one per head. A head whose h_j and W_j both need no gradient only gives logits
    (a frozen teacher's).

    Each chunk's logits are one product per head, written into a buffer reused by every chunk (a fresh [chunk, V]
    tensor per chunk costs its page faults again on CPU); `chunk_loss` then runs on blocks of `block_rows` rows, which
    on CPU stay in cache through its passes, and each block's gradient goes into the chunk's gradient buffer, from which
    one product per trained tensor takes the chunk's share."""

    @staticmethod
    def forward(ctx, chunk_loss: ChunkLoss, softcaps: list[float | None], chunk: int | None, *tensors: torch.Tensor):
        hiddens, weights = tensors[0::2], tensors[1::2]
        needs = ctx.needs_input_grad[3:]
        grad_hiddens = [torch.empty_like(h) if need else None for h, need in zip(hiddens, needs[0::2])]
        grad_weights = [torch.zeros_like(w) if need else None for w, need in zip(weights, needs[1::2])]
        wanted = [gh is not None or gw is not None for gh, gw in zip(grad_hiddens, grad_weights)]
        n = hiddens[0].shape[0]
        count = max(n, 1)  # a process without rows still runs (empty) chunks: chunk_slices
        slices = chunk_slices(n, chunk, hiddens[0].device)  # as many chunks in every process (see chunk_slices)
        size = slices[0].stop - slices[0].start
        logit_buffers = [hiddens[0].new_empty(size, w.shape[0], dtype=torch.float32) for w in weights]
        grad_buffers = [torch.empty_like(b) if want else None for b, want in zip(logit_buffers, wanted)]
        block = block_rows(hiddens[0].device, max(w.shape[0] for w in weights), size)
        loss, logged = 0.0, 0.0
        for rows in slices:
            inputs = [h[rows].to(w.dtype) for h, w in zip(hiddens, weights)]
            m = len(inputs[0])
            logits = [head_logits(x, w, c, b[:m]) for x, w, c, b in zip(inputs, weights, softcaps, logit_buffers)]
            for start in range(0, max(m, 1), block):
                part = slice(start, min(start + block, m))  # of the chunk; of all rows:
                block_sum, block_logged, grads = chunk_loss(slice(rows.start + part.start, rows.start + part.stop),
                                                            [z[part] for z in logits], wanted)
                loss, logged = loss + block_sum, logged + block_logged
                for j, grad in enumerate(grads):
                    if not wanted[j]:
                        continue
                    if softcaps[j]:  # d(c tanh(x / c))/dx = 1 - (out / c)^2
                        grad *= 1 - (logits[j][part] / softcaps[j]) ** 2
                    grad_buffers[j][part].copy_(grad)
            for j in range(len(weights)):
                if not wanted[j]:
                    continue
                grad = grad_buffers[j][:m].to(weights[j].dtype)  # the 1 / N is applied to the small products below
                if grad_hiddens[j] is not None:
                    grad_hiddens[j][rows] = (grad @ weights[j]) / count
                if grad_weights[j] is not None:
                    grad_weights[j].addmm_(grad.T, inputs[j], alpha=1 / count)
        ctx.save_for_backward(*(g for pair in zip(grad_hiddens, grad_weights) for g in pair))
        means = logged / count
        ctx.mark_non_differentiable(means)
        return loss / count, means

    @staticmethod
    def backward(ctx, grad_loss, _grad_logged):
        return None, None, None, *(None if g is None else g * grad_loss for g in ctx.saved_tensors)


CACHE_BLOCK = 2**20


def block_rows(device: torch.device, vocabulary: int, chunk_rows: int) -> int:
    """Rows of a chunk that `chunk_loss` takes at a time: on CPU about 2^20 logits (4 MiB in fp32, 21 rows of a 49k
    vocabulary), so that its passes over a block run in cache (vanilla KD's passes over 128 rows of 49k logits: 17 ms
    in blocks of 16 rows, 52 ms all at once, on a 2-core CPU); on a GPU the whole chunk, one launch per op."""
    if device.type == "cuda":
        return max(chunk_rows, 1)
    return max(1, CACHE_BLOCK // max(vocabulary, 1))


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None, out: torch.Tensor) -> torch.Tensor:
    """fp32 softcapped(hidden W^T) into `out`: a head's logits from its weight, not through its module (under ZeRO-3 a
    module call would partition the weight again when it returns, while the fused loss still uses it)."""
    if weight.dtype != torch.float32:
        return out.copy_(softcapped(F.linear(hidden, weight), softcap))
    torch.mm(hidden, weight.T, out=out)
    return out.div_(softcap).tanh_().mul_(softcap) if softcap else out


WIDE_VOCABULARY = 65536


def rows_per_chunk(chunk: int | None, vocabulary: int) -> int | None:
    """`chunk` rows for vocabularies up to 65,536 tokens, proportionally fewer for wider ones (a quarter at Gemma's 262k),
    so that a chunk's logits never take more memory than `chunk` rows of a 65k vocabulary would: with 128 rows of 262k
    logits DSKD-CMA and ULD held 1.11-1.15x their floor's peak memory, with 32 rows 1.00x (benchmarks/kd_step.py)."""
    return None if chunk is None else max(1, min(chunk, chunk * WIDE_VOCABULARY // vocabulary))


def fused_linear_loss(chunk_loss: ChunkLoss, heads: list[tuple[torch.Tensor, torch.Tensor, float | None]],
                      chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`FusedLinearLoss` over `heads`, each (hidden [N, H_j], weight [V_j, H_j], softcap); a detached weight does not train,
    and a head of which neither trains only gives its logits. `chunk` rows at a time (`rows_per_chunk` of the widest
    head). Under ZeRO-3 the caller gathers the weights first (`shards.zero_gathered`), before detaching any."""
    widest = max(w.shape[0] for _, w, _ in heads)
    return FusedLinearLoss.apply(chunk_loss, [c for _, _, c in heads], rows_per_chunk(chunk, widest),
                                 *(t for h, w, _ in heads for t in (h, w)))


def ce_and_divergences(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, terms: LossTerms,
                       want_grad: bool, row_weight: torch.Tensor | None = None,
                       same_vocabulary: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sums over the rows of CE and of each divergence D_j(teacher || student) times `row_weight` [1 + k], the gradient
    w.r.t. `logits` of w_ce * CE + sum_j w_j * row_weight * D_j summed over the rows, or None without `want_grad`).
    With `same_vocabulary` the divergences see the first min(V_student, V_teacher) tokens of both (the rest are
    embedding rows past a tokenizer); without, each side whole (vocabulary-free divergences: ULD)."""
    logp = torch.log_softmax(logits, dim=-1)
    v = min(logits.shape[-1], teacher.shape[-1]) if same_vocabulary else logits.shape[-1]
    values, kd_grad = [-logp.gather(-1, targets[:, None])[:, 0].sum()], None
    for w, divergence in zip(terms.weights, terms.divergences):
        pair = (log_softmax_pair(logp, logits, teacher, v, divergence.temperature) if same_vocabulary else
                (torch.log_softmax(logits / divergence.temperature, -1), torch.log_softmax(teacher / divergence.temperature, -1)))
        value, grad = divergence.value_and_grad(*pair)
        if row_weight is not None:
            value, grad = value * row_weight, grad.mul_(row_weight[:, None])
        values.append(value.sum())
        grad.mul_(w / divergence.temperature)
        kd_grad = grad if kd_grad is None else kd_grad.add_(grad)
    if not want_grad:
        return torch.stack(values), None
    grad = ce_grad_(logp, targets, terms.ce_weight)  # logp is not read again
    grad[:, :v].add_(kd_grad)
    return torch.stack(values), grad


def ce_grad_(logp: torch.Tensor, targets: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * (softmax - onehot(targets)), the gradient of weight * CE w.r.t. the logits, formed in place of their
    log-softmax `logp` (a single pass over the chunk's logits)."""
    grad = logp.exp_().mul_(weight)
    grad[torch.arange(len(targets), device=targets.device), targets] -= weight
    return grad


def cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool, weight: float = 1.0):
    """(CE per row, the gradient of weight * CE w.r.t. `logits`, or None without `want_grad`)."""
    logp = torch.log_softmax(logits, dim=-1)
    ce = -logp.gather(-1, targets[:, None])[:, 0]
    return ce, ce_grad_(logp, targets, weight) if want_grad else None


def fused_vanilla_kd(student: tuple[torch.Tensor, torch.Tensor, float | None], targets: torch.Tensor,
                     teacher: tuple[torch.Tensor, torch.Tensor, float | None], terms: LossTerms, chunk: int | None):
    """(loss, CE, the divergences' averages [k]) of vanilla KD (the formula above); `student` and `teacher` are heads
    (hidden [N, H], weight [V, H], softcap), the teacher's frozen."""

    def chunk_loss(rows, logits, wanted):
        values, grad = ce_and_divergences(logits[0], targets[rows], logits[1], terms, wanted[0])
        return terms.total(values[0], terms.kd(values[1:])), values, [grad, None]

    loss, means = fused_linear_loss(chunk_loss, [student, teacher], chunk)
    return loss, means[0], means[1:]


def log_softmax_pair(logp: torch.Tensor, logits: torch.Tensor, teacher: torch.Tensor, v: int, temperature: float):
    """The student's and the teacher's log-probabilities at `temperature` over the first v tokens; at T = 1 over
    the whole vocabulary the student's are the CE term's `logp`."""
    if temperature == 1:
        return (logp if v == logits.shape[-1] else torch.log_softmax(logits[:, :v], dim=-1)), torch.log_softmax(teacher[:, :v], dim=-1)
    return torch.log_softmax(logits[:, :v] / temperature, dim=-1), torch.log_softmax(teacher[:, :v] / temperature, dim=-1)
