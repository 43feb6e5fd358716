"""On-policy distillation (GKD, Agarwal et al. 2024) around any token-level KD objective.

With probability `kd.lmbda` a micro-batch's answers are the student's own: it samples a continuation
of each training prompt (temperature `kd.sample_temperature`, at most `kd.sample_max_new_tokens`
tokens, through the one generation routine `generate.generate_ids`), and the wrapped objective
(vanilla KD, DSKD, DSKD-CMA or ULD) scores those answers exactly as it scores the references: the
teacher's distributions on the student's tokens against the student's, with `kd.divergence` (e.g.
`generalized_jsd` with `kd.beta`). The student's cross-entropy term then has the sampled tokens as
labels and is still mixed in by `kd.kd_rate`; GKD as published trains on the divergence alone, which
is `kd.kd_rate: 1`. `kd.lmbda: 0` is supervised KD.

Same vocabulary: the sampled tokens are the teacher's answer tokens too. Different vocabularies:
the sampled answer is decoded to text and tokenised again by the teacher's prompt builder, as a
reference answer would be, after the teacher's own tokenisation of the same prompt; the wrapped
objective (DSKD-CMA or ULD) aligns the two tokenisations as it does for references.

The coin and the sampling are seeded by the batch's `seed` (`loop.batch_seed`), so a resumed run
samples what an uninterrupted run would have. The validation loss (in eval mode) is the wrapped objective on the
validation references. The prompts are the training prompts as encoded for
the reference answer, so a sampled sequence may exceed `prompt.max_length` by up to
`kd.sample_max_new_tokens` minus the reference's length.
"""

from __future__ import annotations

import torch
from torch import nn

from distillqa.config import GenerationConfig, KDConfig
from distillqa.data.prompts import IGNORE, Encoded, PromptBuilder, collate_pairs
from distillqa.generate import generate_ids


def training_prompts(batch: dict[str, torch.Tensor], prefix: str = "") -> list[list[int]]:
    """Each row's prompt: its tokens before the first answer token (right padding drops out)."""
    starts = (batch[prefix + "labels"] != IGNORE).int().argmax(dim=1)
    return [ids[:start].tolist() for ids, start in zip(batch[prefix + "input_ids"], starts.tolist())]


def until_end(tokens: list[int], eos: int) -> tuple[list[int], bool]:
    """A sampled continuation up to and including its end-of-sequence token, and whether it had one
    (if not, `max_new_tokens` cut it)."""
    if eos in tokens:
        return tokens[: tokens.index(eos) + 1], True
    return tokens, False


def with_answer(prompt: list[int], answer: list[int]) -> Encoded:
    return Encoded("", prompt + answer, [IGNORE] * len(prompt) + answer)


class OnPolicyKD(nn.Module):
    """`objective` on the student's sampled answers with probability `cfg.lmbda`, else on the batch as it is.

    `teacher_builder` is the teacher's prompt builder when its vocabulary differs from the student's
    (the sampled text is tokenised again for it), None when both share `student_tok`."""

    def __init__(self, objective: nn.Module, cfg: KDConfig, student_tok, teacher_builder: PromptBuilder | None):
        super().__init__()
        self.objective, self.lmbda = objective, cfg.lmbda
        self.sampling = GenerationConfig(max_new_tokens=cfg.sample_max_new_tokens, do_sample=True,
                                         temperature=cfg.sample_temperature)
        self.student_tok, self.teacher_builder = student_tok, teacher_builder

    def forward(self, student: nn.Module, batch: dict[str, torch.Tensor]):
        if not self.training:  # the validation loss: the wrapped objective on the references, nothing drawn
            return self.objective(student, batch)
        seed = int(batch["seed"])
        on_policy = torch.rand((), generator=torch.Generator().manual_seed(seed)).item() < self.lmbda
        if on_policy:
            batch = self.with_student_answers(student, batch, seed)
        loss, logs = self.objective(student, batch)
        return loss, {**logs, "on_policy": float(on_policy)}

    def with_student_answers(self, student: nn.Module, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        """The batch with each row's answer replaced by a continuation the student samples for its prompt."""
        tok = self.student_tok
        prompts = training_prompts(batch)
        sampled = [until_end(row, tok.eos_token_id) for row in generate_ids(student, tok, prompts, self.sampling, seed).tolist()]
        student_rows = [with_answer(p, answer) for p, (answer, _) in zip(prompts, sampled)]
        if self.teacher_builder is None:
            teacher_rows, teacher_pad = student_rows, tok.pad_token_id
        else:
            build = self.teacher_builder
            texts = [(tok.decode(answer, skip_special_tokens=True), ended) for answer, ended in sampled]
            teacher_rows = [with_answer(p, build.answer_ids(text) if ended else build.continuation_ids(text))
                            for p, (text, ended) in zip(training_prompts(batch, "teacher_"), texts)]
            teacher_pad = build.tok.pad_token_id
        rebuilt = collate_pairs(list(zip(student_rows, teacher_rows)), tok.pad_token_id, teacher_pad)
        return {**batch, **{k: v.to(batch["input_ids"].device) for k, v in rebuilt.items()}}
