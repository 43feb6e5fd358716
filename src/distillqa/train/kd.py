"""Logit distillation objectives: vanilla KD (same vocabulary; live, or from a teacher cache) and ULD (any two vocabularies).

Both mix the student's own cross-entropy with a distillation term over answer tokens:
loss = (1 - r) * CE + r * KD, r = `kd_rate`. The teacher is frozen: eval mode, no gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillqa.data.prompts import IGNORE
from distillqa.errors import DistillQAError
from distillqa.train.losses import Divergence, chunked_mean
from distillqa.train.losses.fused import FusedLinearKD
from distillqa.train.objectives import answer_states, causal_lm_parts, linear_head, project_to_vocab


class FrozenTeacher(nn.Module):
    """Holds the teacher so it moves with the objective but never trains and never leaves eval mode."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self


class VanillaKD(FrozenTeacher):
    """KD = mean over answer tokens of D(p_teacher || q_student), both tokenised identically.

    loss = (1 - r) * CE(student) + r * KD, `chunk` answer tokens at a time. A student whose head is a
    plain linear layer (`linear_head`) takes the fused step (`losses/fused.py`: each chunk's logits once,
    gradients in closed form); one with an adapter or bias on its head, autograd through checkpointed
    chunks (`chunked_mean`). Both give the same loss and gradients.
    """

    def __init__(self, teacher: nn.Module, divergence: Divergence, kd_rate: float, chunk: int | None):
        super().__init__(teacher)
        self.divergence, self.kd_rate, self.chunk = divergence, kd_rate, chunk

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        hidden_s, targets = answer_states(student, batch)
        with torch.no_grad():
            hidden_t, _ = answer_states(self.teacher, batch)
        head = linear_head(student)
        if head is not None:
            def teacher_logits(rows: slice) -> torch.Tensor:
                return project_to_vocab(self.teacher, hidden_t[rows])

            loss, ce, kd = FusedLinearKD.apply(hidden_s, *head, targets, teacher_logits, self.divergence, self.kd_rate, self.chunk)
            return loss, {"ce": ce.item(), "kd": kd.item()}

        def per_token(h_s, h_t, y):
            logits_s = project_to_vocab(student, h_s)
            with torch.no_grad():
                logits_t = project_to_vocab(self.teacher, h_t)
            v = min(logits_s.shape[-1], logits_t.shape[-1])  # embedding rows past the tokenizer are padding
            ce = F.cross_entropy(logits_s, y, reduction="none")
            return torch.stack([ce, self.divergence(logits_s[:, :v], logits_t[:, :v])], dim=-1)

        ce, kd = chunked_mean(per_token, (hidden_s, hidden_t, targets), self.chunk)
        loss = (1 - self.kd_rate) * ce + self.kd_rate * kd
        return loss, {"ce": ce.item(), "kd": kd.item()}


class CachedKD(nn.Module):
    """Vanilla KD from a teacher cache, with no teacher loaded: KD = mean over answer tokens of a sparse
    term (`TopKTail` or `SampledKL`) between the cached teacher target and the student.

    loss = (1 - r) * CE(student) + r * KD. The batch carries the targets as `cache_<key>` tensors,
    one row per answer token in `answer_states` order (`teacher_cache.collate_cached`).
    """

    def __init__(self, sparse: nn.Module, kd_rate: float, chunk: int | None):
        super().__init__()
        self.sparse, self.kd_rate, self.chunk = sparse, kd_rate, chunk

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        hidden, targets = answer_states(student, batch)
        cached = tuple(batch[f"cache_{k}"] for k in self.sparse.keys)
        if cached[0].shape[0] != hidden.shape[0]:
            raise DistillQAError(f"the teacher cache holds {cached[0].shape[0]} answer tokens for this batch, the batch "
                                 f"has {hidden.shape[0]}: it was built for other examples")

        def per_token(h, y, *target):
            logits = project_to_vocab(student, h)
            return torch.stack([F.cross_entropy(logits, y, reduction="none"), self.sparse(logits, *target)], dim=-1)

        ce, kd = chunked_mean(per_token, (hidden, targets, *cached), self.chunk)
        loss = (1 - self.kd_rate) * ce + self.kd_rate * kd
        return loss, {"ce": ce.item(), "kd": kd.item()}


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """ULD (Boizard et al. 2024): sum_k |p_(k) - q_(k)| over probabilities sorted in decreasing
    order, the smaller vocabulary padded with zeros. Needs no token correspondence."""
    q = torch.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p = torch.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    q, p = F.pad(q, (0, width - q.shape[-1])), F.pad(p, (0, width - p.shape[-1]))
    return (p - q).abs().sum(-1)


def aligned_answer_states(model: nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""):
    """Answer-position hidden states packed per example: ([B, A, H], targets [B, A], valid [B, A])."""
    backbone, _, _ = causal_lm_parts(model)
    hidden = backbone(input_ids=batch[prefix + "input_ids"], attention_mask=batch[prefix + "attention_mask"]).last_hidden_state
    targets = batch[prefix + "labels"][:, 1:]
    return pack_rows(hidden[:, :-1], targets != IGNORE) + (targets,)


def pack_rows(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept positions of each row to the front: values [B, T, ...] -> ([B, A, ...], valid [B, A])."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.numel() else 0
    valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    packed = values.new_zeros((values.shape[0], width, *values.shape[2:]))
    packed[valid] = values[keep]
    return packed, valid


class ULD(FrozenTeacher):
    """ULD: the i-th answer token of the student is paired with the i-th answer token of the
    teacher (each tokenised by its own tokenizer), up to the shorter of the two answers.

    loss = (1 - r) * CE(student, all answer tokens) + r * mean over pairs of ULD distance.
    """

    def __init__(self, teacher: nn.Module, kd_rate: float, temperature: float, chunk: int | None):
        super().__init__(teacher)
        self.kd_rate, self.temperature, self.chunk = kd_rate, temperature, chunk

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        h_s, valid_s, _ = aligned_answer_states(student, batch)
        with torch.no_grad():
            h_t, valid_t, _ = aligned_answer_states(self.teacher, batch, "teacher_")
        targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE]
        ce = chunked_mean(lambda h, y: F.cross_entropy(project_to_vocab(student, h), y, reduction="none"),
                          (h_s[valid_s], targets), self.chunk)
        width = min(h_s.shape[1], h_t.shape[1])
        pair = valid_s[:, :width] & valid_t[:, :width]

        def per_token(hs, ht):
            with torch.no_grad():
                logits_t = project_to_vocab(self.teacher, ht)
            return uld_distance(project_to_vocab(student, hs), logits_t, self.temperature)

        kd = chunked_mean(per_token, (h_s[:, :width][pair], h_t[:, :width][pair]), self.chunk)
        loss = (1 - self.kd_rate) * ce + self.kd_rate * kd
        return loss, {"ce": ce.item(), "kd": kd.item()}
