"""Dual-Space Knowledge Distillation (Zhang et al. 2024), for the same vocabulary and, with
cross-model attention (CMA), for different vocabularies.

Both add to the student's cross-entropy a KD term made of three parts, each averaged over
answer tokens: loss = w_ce * CE(student) + kd_weight * (CE_t2s + KD_t2s + KD_s2t), with the weights of
`LossTerms` (with the shorthand keys (1 - r) * CE + r * (...)).
- teacher space -> student space: t2s_logits = t2s(h_T) @ W_student_head^T (head detached);
  CE_t2s = CE(t2s_logits, y) trains the projector; KD_t2s = the terms' weighted mean of
  D_i(t2s_logits || student), with the t2s side detached, teaches the student (for CMA only where
  argmax t2s_logits = y);
- student space -> teacher space: s2t_logits = teacher_head(s2t(h_S)); KD_s2t =
  KL(teacher || s2t_logits) at `temperature` teaches the student through the frozen teacher head.

When both heads are plain linear layers (`linear_head`), each side is one fused linear loss (`losses/fused.py`):
per chunk the three or two heads' logits once and their gradients in closed form (dCE/dz = softmax(z) - onehot(y);
the divergences' `value_and_grad`); otherwise autograd through checkpointed chunks. Both give the same loss and
gradients.

Precision: the projectors keep fp32 weights whatever the models' dtype (like peft's LoRA adapters,
so that small AdamW updates are not rounded away in bf16); their inputs are cast to fp32, and their
outputs to the dtype of the head they go through (`project_to_vocab`, `student_space_logits`), so a
bf16 teacher, a bf16 student or both work. Logits and losses are fp32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distillqa.data.prompts import IGNORE
from distillqa.train.kd import FrozenTeacher, aligned_answer_states, pack_rows
from distillqa.train.losses import ForwardKL, LossTerms, chunked_mean
from distillqa.train.losses.fused import ce_and_divergences, cross_entropy_and_grad, fused_linear_loss
from distillqa.train.objectives import answer_states, causal_lm_parts, linear_head, project_to_vocab
from distillqa.train.shards import zero_gathered


def hidden_size(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size


def student_space_logits(student: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Project hidden states through the student head with the head detached (only the input trains)."""
    _, head, _ = causal_lm_parts(student)
    return F.linear(hidden.to(head.weight.dtype), head.weight.detach()).float()


class Projector(nn.Linear):
    """A trained linear map between two models' spaces: fp32 weights, inputs of any dtype cast to fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


class DSKD(FrozenTeacher):
    """DSKD for a teacher and student that share a tokenizer (same answer positions)."""

    def __init__(self, teacher, student, terms: LossTerms, temperature: float, chunk: int | None):
        super().__init__(teacher)
        d_t, d_s = hidden_size(teacher), hidden_size(student)
        self.t2s, self.s2t = Projector(d_t, d_s), Projector(d_s, d_t)
        self.terms, self.chunk = terms, chunk
        self.teacher_kl = ForwardKL(temperature)

    def forward(self, student, batch):
        h_s, y = answer_states(student, batch)
        with torch.no_grad():
            h_t, _ = answer_states(self.teacher, batch)
        if linear_head(student) and linear_head(self.teacher):
            return fused_dual_space(self, student, h_s, self.t2s(h_t), y, self.s2t(h_s), h_t, correct_only=False)

        def per_token(hs, ht, yy):
            logits_s = project_to_vocab(student, hs)
            t2s = student_space_logits(student, self.t2s(ht))
            with torch.no_grad():
                logits_t = project_to_vocab(self.teacher, ht)
            s2t = project_to_vocab(self.teacher, self.s2t(hs))
            return torch.cat([
                torch.stack([F.cross_entropy(logits_s, yy, reduction="none"), F.cross_entropy(t2s, yy, reduction="none"),
                             self.teacher_kl(s2t, logits_t)], dim=-1),
                self.terms.per_token(logits_s, t2s.detach()),
            ], dim=-1)

        ce, t2s_ce, s2t_kd, *t2s_kd = chunked_mean(per_token, (h_s, h_t, y), self.chunk)
        t2s_kd = self.terms.kd(torch.stack(t2s_kd))
        return self.terms.total(ce, t2s_ce + t2s_kd + s2t_kd), dual_space_logs(ce, t2s_ce, t2s_kd, s2t_kd)


def dual_space_logs(ce, t2s_ce, t2s_kd, s2t_kd, **more) -> dict[str, float]:
    """The logged parts of w_ce * CE + kd_weight * kd, kd = CE_t2s + KD_t2s + KD_s2t."""
    logs = {"ce": ce, "kd": t2s_ce + t2s_kd + s2t_kd, "t2s_ce": t2s_ce, "t2s_kd": t2s_kd, "s2t_kd": s2t_kd, **more}
    return {k: v.item() for k, v in logs.items()}


def fused_dual_space(objective: nn.Module, student: nn.Module, h_s, t2s_h, y, s2t_h, h_t, correct_only: bool):
    """(loss, logs) of DSKD as two fused linear losses, each averaged over its own rows:
    - student side, rows (h_s, t2s_h, y), heads W_s (trains) and W_s detached:
      w_ce * CE(s, y) + kd_weight * CE(a, y) + sum_j w_j * c * D_j(softmax(a) || softmax(s)), s = W_s h_s (softcapped
      where the student softcaps), a = W_s t2s_h (never softcapped, as `student_space_logits`),
      c = 1, or [argmax a = y] with `correct_only` (CMA);
      dloss/ds as in vanilla KD with a as the teacher, dloss/da = kd_weight * (softmax(a) - onehot(y));
    - teacher side, rows (s2t_h, h_t), head W_t (frozen): kd_weight * KL_T(softmax(t / T) || softmax(b / T)),
      b = W_t s2t_h, t = W_t h_t; dloss/db = kd_weight / T * (softmax(b / T) - softmax(t / T))."""
    terms, teacher_kl, kd_weight = objective.terms, objective.teacher_kl, objective.terms.kd_weight
    (w_s, c_s), (w_t, c_t) = linear_head(student), linear_head(objective.teacher)

    def student_side(rows, logits, wanted):
        s, a, yy = *logits, y[rows]
        correct = (a.argmax(-1) == yy).float() if correct_only else None  # CMA's mask (and its logged accuracy)
        values, grad_s = ce_and_divergences(s, yy, a, terms, wanted[0], correct)
        t2s_ce, grad_a = cross_entropy_and_grad(a, yy, wanted[1], kd_weight)
        loss = terms.total(values[0], t2s_ce.sum() + terms.kd(values[1:]))
        accuracy = correct.sum() if correct_only else torch.zeros((), device=s.device)
        return loss, torch.cat([values[:1], t2s_ce.sum()[None], accuracy[None], values[1:]]), [grad_s, grad_a]

    def teacher_side(rows, logits, wanted):
        temperature = teacher_kl.temperature
        teacher_logp = torch.log_softmax(logits[1] / temperature, dim=-1)
        value, grad = teacher_kl.value_and_grad(torch.log_softmax(logits[0] / temperature, dim=-1), teacher_logp)
        return kd_weight * value.sum(), value.sum()[None], [grad.mul_(kd_weight / temperature) if wanted[0] else None, None]

    with zero_gathered([w_s, w_t]):
        loss_s, (ce, t2s_ce, t2s_acc, *t2s_kd) = fused_linear_loss(
            student_side, [(h_s, w_s, c_s), (t2s_h, w_s.detach(), None)], objective.chunk)  # as student_space_logits
        loss_t, (s2t_kd,) = fused_linear_loss(teacher_side, [(s2t_h, w_t, c_t), (h_t, w_t, c_t)], objective.chunk)
    more = {"t2s_acc": t2s_acc} if correct_only else {}
    return loss_s + loss_t, dual_space_logs(ce, t2s_ce, terms.kd(torch.stack(t2s_kd)), s2t_kd, **more)


def _answer_token_embeddings(model: nn.Module, batch, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Input-token and target-token embeddings at each answer position, packed like the states."""
    ids, labels = batch[prefix + "input_ids"], batch[prefix + "labels"]
    embed = causal_lm_parts(model)[0].get_input_embeddings()
    keep = labels[:, 1:] != IGNORE
    return pack_rows(embed(ids[:, :-1]), keep)[0], pack_rows(embed(ids[:, 1:]), keep)[0]


def _std_normalise(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return x / x[valid].std().clamp_min(1e-6)


class DSKDCrossModelAttention(FrozenTeacher):
    """DSKD with cross-model attention for teachers with a different tokenizer.

    Each model tokenises the same text itself. Queries are the student's [input ; target]
    token embeddings (detached, as in the DSKD reference: the alignment trains the query
    projector, never the student's embeddings or its tied head), projected to the teacher's
    width; keys the teacher's; attention runs
    only between answer positions (padding and prompt are masked on both sides) and aligns the
    two token sequences. Values: t2s(normalised teacher state + target embedding) for the
    teacher -> student direction, s2t(student state) for the reverse (transposed attention).
    """

    def __init__(self, teacher, student, terms: LossTerms, temperature: float, chunk: int | None):
        super().__init__(teacher)
        d_t, d_s = hidden_size(teacher), hidden_size(student)
        self.query = Projector(2 * d_s, 2 * d_t)
        self.t2s, self.s2t = Projector(d_t, d_s), Projector(d_s, d_t)
        self.terms, self.chunk = terms, chunk
        self.teacher_kl = ForwardKL(temperature)

    def align(self, student, batch):
        """Attention weights [B, A_s, A_t] between answer positions, plus the packed states."""
        h_s, valid_s, _ = aligned_answer_states(student, batch)
        with torch.no_grad():
            h_t, valid_t, _ = aligned_answer_states(self.teacher, batch, "teacher_")
            input_t, target_t = (e.float() for e in _answer_token_embeddings(self.teacher, batch, "teacher_"))
            keys = _std_normalise(torch.cat([input_t, target_t], dim=-1), valid_t)
            values_t = _std_normalise(h_t.float(), valid_t) + _std_normalise(target_t, valid_t)
            student_embeddings = torch.cat(_answer_token_embeddings(student, batch), dim=-1)
        queries = self.query(student_embeddings)
        scores = queries @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])
        mask = valid_s[:, :, None] & valid_t[:, None, :]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores, h_s, valid_s, h_t, valid_t, values_t

    def forward(self, student, batch):
        scores, h_s, valid_s, h_t, valid_t, values_t = self.align(student, batch)
        t2s_hidden = torch.softmax(scores, dim=-1) @ self.t2s(values_t)  # [B, A_s, D_s]
        s2t_hidden = torch.softmax(scores.transpose(1, 2), dim=-1) @ self.s2t(h_s)  # [B, A_t, D_t]
        y = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE]
        if linear_head(student) and linear_head(self.teacher):
            return fused_dual_space(self, student, h_s[valid_s], t2s_hidden[valid_s], y, s2t_hidden[valid_t], h_t[valid_t],
                                    correct_only=True)

        def student_side(hs, t2s_h, yy):
            logits_s = project_to_vocab(student, hs)
            t2s = student_space_logits(student, t2s_h)
            correct = (t2s.argmax(-1) == yy).float()
            return torch.cat([
                torch.stack([F.cross_entropy(logits_s, yy, reduction="none"), F.cross_entropy(t2s, yy, reduction="none"),
                             correct], dim=-1),
                self.terms.per_token(logits_s, t2s.detach()) * correct[:, None],
            ], dim=-1)

        def teacher_side(s2t_h, ht):
            with torch.no_grad():
                logits_t = project_to_vocab(self.teacher, ht)
            return self.teacher_kl(project_to_vocab(self.teacher, s2t_h), logits_t)

        ce, t2s_ce, t2s_acc, *t2s_kd = chunked_mean(student_side, (h_s[valid_s], t2s_hidden[valid_s], y), self.chunk)
        s2t_kd = chunked_mean(teacher_side, (s2t_hidden[valid_t], h_t[valid_t]), self.chunk)
        t2s_kd = self.terms.kd(torch.stack(t2s_kd))
        return self.terms.total(ce, t2s_ce + t2s_kd + s2t_kd), dual_space_logs(ce, t2s_ce, t2s_kd, s2t_kd, t2s_acc=t2s_acc)
