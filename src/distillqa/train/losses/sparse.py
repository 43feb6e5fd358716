"""Distillation terms against a sparse teacher distribution, as a teacher cache stores it.

Both take the student's logits [N, V], the cached token ids [N, k] and the teacher's
log-probabilities at those ids [N, k] (at temperature 1), plus one tensor of their own, and
return one value per token [N]. `keys` names the cached tensors they read, in order.
"""

from __future__ import annotations

import torch
from torch import nn

from distillqa.train.losses.base import Divergence


class TopKTail(nn.Module):
    """D(p' || q') over the partition {v_1, ..., v_k, tail}: the teacher's k most likely tokens, and
    one bucket for every other token.

    p' = (p_v1, ..., p_vk, 1 - sum_i p_vi) and q' = (q_v1, ..., q_vk, 1 - sum_i q_vi), q = softmax(student
    logits); D is any `Divergence` (its `per_token` on the k + 1 log-probabilities). With k = V the
    tail is empty and this is D(p || q) exactly. For k < V it does not see how the student spreads
    the tail mass, so it is biased low (for an f-divergence D(p' || q') <= D(p || q)). With `kept`
    only the first `kept` columns are the top k (a cache with tail draws after them).
    """

    keys = ("ids", "logp", "log_tail")

    def __init__(self, divergence: Divergence, kept: int | None = None):
        super().__init__()
        self.divergence, self.kept = divergence, kept

    def forward(self, student_logits, ids, teacher_logp, teacher_log_tail):
        ids, teacher_logp = ids[:, : self.kept], teacher_logp[:, : self.kept]
        logq = torch.log_softmax(student_logits.float(), dim=-1)
        # The student's tail: its mass on the tokens not kept (finite even when every token is kept).
        rest = logq.scatter(-1, ids, torch.finfo(logq.dtype).min)
        student = torch.cat([logq.gather(-1, ids), rest.logsumexp(-1, keepdim=True)], dim=-1)
        teacher = torch.cat([teacher_logp.float(), teacher_log_tail.float()[:, None]], dim=-1)
        return self.divergence.per_token(student, teacher)


class SampledKL(nn.Module):
    """Forward KL estimated from tokens drawn from the teacher (random-sampling KD, Anshumann et al. 2025).

    x_1, ..., x_S ~ p with replacement; w_v = count(v) / S; KL^ = sum_v w_v (log p_v - log q_v).
    E[w_v] = p_v, so E[KL^] = KL(p || q) and E[grad KL^] = grad KL(p || q): unbiased, where top-k is
    not. Unused slots (fewer than S distinct tokens drawn) have w = 0. Any weights with E[w_v] = p_v
    serve, such as a top-k cache's kept tokens at w = p_v and draws from its tail at w = p_tail / S.
    """

    keys = ("ids", "logp", "weight")

    def forward(self, student_logits, ids, teacher_logp, weight):
        logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, ids)
        return (weight.float() * (teacher_logp.float() - logq)).sum(-1)
