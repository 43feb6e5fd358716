"""Logit distillation objectives: vanilla KD (same vocabulary; live, or from a teacher cache) and ULD (any two vocabularies).

Both mix the student's own cross-entropy with distillation terms over answer tokens as their
`LossTerms` weigh them (w_ce * CE + sum_i w_i * D_i; with the shorthand keys (1 - r) * CE + r * KD).
The teacher is frozen: eval mode, no gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillqa.data.prompts import IGNORE
from distillqa.errors import DistillQAError
from distillqa.train.losses import LossTerms, chunked_mean
from distillqa.train.losses.fused import ce_and_divergences, fused_linear_loss, fused_vanilla_kd
from distillqa.train.objectives import answer_states, causal_lm_parts, linear_head, project_to_vocab
from distillqa.train.shards import zero_gathered


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
    """KD terms D_i(p_teacher || q_student) averaged over answer tokens, both models tokenised identically.

    loss = w_ce * CE(student) + sum_i w_i * D_i (`terms`), `chunk` answer tokens at a time. Where both heads are plain
    linear layers (`linear_head`) the fused step (`losses/fused.py`: each chunk's logits once, gradients in closed
    form); where either carries an adapter or a bias, autograd through checkpointed chunks (`chunked_mean`). Both
    give the same loss and gradients.
    """

    def __init__(self, teacher: nn.Module, terms: LossTerms, chunk: int | None):
        super().__init__(teacher)
        self.terms, self.chunk = terms, chunk

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        hidden_s, targets = answer_states(student, batch)
        with torch.no_grad():
            hidden_t, _ = answer_states(self.teacher, batch)
        heads = linear_head(student), linear_head(self.teacher)
        if all(heads):
            (w_s, c_s), (w_t, c_t) = heads
            with zero_gathered([w_s, w_t]):
                loss, ce, kd = fused_vanilla_kd((hidden_s, w_s, c_s), targets, (hidden_t, w_t, c_t), self.terms, self.chunk)
            return loss, self.terms.logs(ce, kd)

        def per_token(h_s, h_t, y):
            logits_s = project_to_vocab(student, h_s)
            with torch.no_grad():
                logits_t = project_to_vocab(self.teacher, h_t)
            v = min(logits_s.shape[-1], logits_t.shape[-1])  # embedding rows past the tokenizer are padding
            ce = F.cross_entropy(logits_s, y, reduction="none")
            return torch.cat([ce[:, None], self.terms.per_token(logits_s[:, :v], logits_t[:, :v])], dim=-1)

        ce, *kd = chunked_mean(per_token, (hidden_s, hidden_t, targets), self.chunk)
        return self.terms.combine(ce, torch.stack(kd))


class CachedKD(nn.Module):
    """Vanilla KD from a teacher cache, with no teacher loaded: each of `terms`' divergences is computed
    against the cached teacher target by its sparse form (`sparse[i]`: `TopKTail` or `SampledKL`) and
    averaged over answer tokens, then weighed as `terms` says.

    The batch carries the targets as `cache_<key>` tensors, one row per answer token in `answer_states`
    order (`teacher_cache.collate_cached`).
    """

    def __init__(self, terms: LossTerms, sparse: list[nn.Module], chunk: int | None):
        super().__init__()
        self.terms, self.sparse, self.chunk = terms, nn.ModuleList(sparse), chunk
        self.keys = list(dict.fromkeys(k for s in sparse for k in s.keys))  # every cached tensor a term reads, once

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        hidden, targets = answer_states(student, batch)
        cached = tuple(batch[f"cache_{k}"] for k in self.keys)
        if cached[0].shape[0] != hidden.shape[0]:
            raise DistillQAError(f"the teacher cache holds {cached[0].shape[0]} answer tokens for this batch, the batch "
                                 f"has {hidden.shape[0]}: it was built for other examples")

        def per_token(h, y, *target):
            logits, named = project_to_vocab(student, h), dict(zip(self.keys, target))
            kd = (s(logits, *(named[k] for k in s.keys)) for s in self.sparse)
            return torch.stack([F.cross_entropy(logits, y, reduction="none"), *kd], dim=-1)

        ce, *kd = chunked_mean(per_token, (hidden, targets, *cached), self.chunk)
        return self.terms.combine(ce, torch.stack(kd))


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
    """ULD (Boizard et al. 2024): the i-th answer token of the student is paired with the i-th answer token
    of the teacher (each tokenised by its own tokenizer), up to the shorter of the two answers.

    loss = w_ce * CE(student, all answer tokens) + sum_i w_i * mean over pairs of D_i, with `terms`'
    divergences vocabulary-free (the ULD distance, `losses/uld.py`: no token correspondence needed). With plain
    linear heads on both models a fused step (`fused`), else autograd through checkpointed chunks; the same result.
    """

    def __init__(self, teacher: nn.Module, terms: LossTerms, chunk: int | None):
        super().__init__(teacher)
        self.terms, self.chunk = terms, chunk

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        h_s, valid_s, _ = aligned_answer_states(student, batch)
        with torch.no_grad():
            h_t, valid_t, _ = aligned_answer_states(self.teacher, batch, "teacher_")
        targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE]
        if linear_head(student) and linear_head(self.teacher):
            return self.fused(student, h_s, valid_s, h_t, valid_t, targets)
        ce = chunked_mean(lambda h, y: F.cross_entropy(project_to_vocab(student, h), y, reduction="none"),
                          (h_s[valid_s], targets), self.chunk)
        width = min(h_s.shape[1], h_t.shape[1])
        pair = valid_s[:, :width] & valid_t[:, :width]

        def per_token(hs, ht):
            with torch.no_grad():
                logits_t = project_to_vocab(self.teacher, ht)
            return self.terms.per_token(project_to_vocab(student, hs), logits_t)

        kd = chunked_mean(per_token, (h_s[:, :width][pair], h_t[:, :width][pair]), self.chunk)
        return self.terms.combine(ce, kd)

    def fused(self, student, h_s, valid_s, h_t, valid_t, targets):
        """One fused linear loss over the student's answer tokens (`losses/fused.py`): CE on every one, the divergences
        on those with a teacher partner, weighted N / (number of pairs) so that they average over the pairs."""
        (w_s, c_s), (w_t, c_t) = linear_head(student), linear_head(self.teacher)
        extra = h_s.shape[1] - h_t.shape[1]  # the teacher's answers padded to the student's width: no partner there
        h_t, valid_t = F.pad(h_t, (0, 0, 0, max(extra, 0))), F.pad(valid_t, (0, max(extra, 0)))
        rows, positions = valid_s.nonzero(as_tuple=True)  # the order of h_s[valid_s]
        paired = valid_t[rows, positions].float()
        partners, weight = h_t[rows, positions], paired * len(paired) / paired.sum().clamp_min(1)

        def chunk_loss(rows, logits, wanted):
            values, grad = ce_and_divergences(logits[0], targets[rows], logits[1], self.terms, wanted[0], weight[rows],
                                              same_vocabulary=False)
            return self.terms.total(values[0], self.terms.kd(values[1:])), values, [grad, None]

        with zero_gathered([w_s, w_t]):
            loss, means = fused_linear_loss(chunk_loss, [(h_s[valid_s], w_s, c_s), (partners, w_t, c_t)], self.chunk)
        return loss, self.terms.logs(means[0], means[1:])
