"""Prompts, answer-only loss masks and the context truncation rule.

Template: the model's chat template when it has one (the question is the user turn, the
answer the assistant turn); otherwise the plain template

    {instruction}

    Context: {context}

    Question: {question}

    Answer: {answer}<eos>

Truncation (only the context is ever shortened, never the question or the answer):
- training: if prompt + answer exceed `max_length`, keep the window of context tokens centred
  on the first occurrence of the answer in the context (the start of the context if the
  answer does not occur in it), as large as fits;
- inference: keep the start of the context, leaving room for `max_new_tokens`;
- an example that does not fit even with an empty context is skipped and counted.
Multiple-choice questions show their choices `inline` ("Choices: a; b; c", the default),
`lettered` (one per line, "A. a") or not at all (`hidden`, a cloze question).
Labels are -100 on every prompt token, so the training loss covers answer tokens (and the
closing end-of-sequence token) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distillqa.data.records import QAExample
from distillqa.errors import ConfigError

IGNORE = -100
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PLAIN_ANSWER = "\n\nAnswer:"  # ends the plain template's prompt; the answer follows after a space


@dataclass
class Encoded:
    id: str
    input_ids: list[int]
    labels: list[int]  # same length as input_ids; IGNORE on prompt tokens


class PromptBuilder:
    def __init__(self, tokenizer, template: str = "auto", instruction: str = "", max_length: int = 512,
                 separate_output: bool = False, options: str = "inline"):
        self.tok = tokenizer
        self.options = options  # how choices are shown: "inline", "lettered" or "hidden" (see OPTIONS)
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ConfigError("prompt.template: 'chat', but the model's tokenizer has no chat template; use 'auto' or 'plain'")
        self.chat = template == "chat" or (template == "auto" and has_chat)
        self.instruction = instruction
        self.max_length = max_length
        # An encoder-decoder model reads the prompt and writes the answer in separate sequences,
        # each up to max_length; a causal LM fits both into one.
        self.separate_output = separate_output
        if tokenizer.eos_token_id is None:
            raise ConfigError("the model's tokenizer has no end-of-sequence token, which answers need")

    def user_text(self, ex: QAExample, context: str) -> str:
        return user_text(ex, context, self.instruction, self.options)

    def scored_choices(self, ex: QAExample) -> list[str]:
        return scored_choices(ex, self.options)

    def prompt_text(self, ex: QAExample, context: str) -> str:
        user = self.user_text(ex, context)
        if self.chat:
            return self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
        return f"{user}{PLAIN_ANSWER}"

    def _prompt_ids(self, ex: QAExample, context: str) -> list[int]:
        # Chat templates write their own special tokens; the plain template gets the usual BOS.
        return self.tok(self.prompt_text(ex, context), add_special_tokens=not self.chat)["input_ids"]

    def continuation_ids(self, answer: str) -> list[int]:
        """The answer's tokens as they follow the prompt (after "Answer:" with a space; a chat
        template's assistant turn without one), without the end-of-sequence token."""
        text = answer.strip() if self.chat else " " + answer.strip()
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.continuation_ids(answer) + [self.tok.eos_token_id]

    def fit_prompt(self, ex: QAExample, budget: int, anchor: str | None) -> list[int] | None:
        """Prompt ids within `budget` tokens, shortening the context around `anchor` if needed."""
        ids = self._prompt_ids(ex, ex.context)
        if len(ids) <= budget:
            return ids
        if len(self._prompt_ids(ex, "")) > budget:
            return None
        enc = self.tok(ex.context, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        keep = max(1, n - (len(ids) - budget))
        centre = 0
        if anchor and (pos := ex.context.find(anchor)) >= 0:
            centre = next((i for i, (s, e) in enumerate(offsets) if e > pos), 0)
        while keep > 0:
            start = 0 if anchor is None or centre == 0 else min(max(0, centre - keep // 2), n - keep)
            window = ex.context[offsets[start][0] : offsets[start + keep - 1][1]]
            ids = self._prompt_ids(ex, window)
            if len(ids) <= budget:
                return ids
            keep -= max(1, len(ids) - budget)
        return self._prompt_ids(ex, "")

    def encode_train(self, ex: QAExample, answer: str | None = None) -> Encoded | None:
        """Prompt + answer with an answer-only label mask; None if it cannot fit `max_length`."""
        answer = answer if answer is not None else ex.answers[0]
        ans = self.answer_ids(answer)
        prompt = self.fit_prompt(ex, self.max_length - len(ans), anchor=answer)
        if prompt is None:
            return None
        return Encoded(ex.id, prompt + ans, [IGNORE] * len(prompt) + ans)

    def encode_prompt(self, ex: QAExample, max_new_tokens: int) -> list[int] | None:
        budget = self.max_length if self.separate_output else self.max_length - max_new_tokens
        return self.fit_prompt(ex, budget, anchor=None)


def user_text(ex: QAExample, context: str, instruction: str, options: str = "inline") -> str:
    """The question as the user asks it: instruction, context, question and the choices shown as `options` says."""
    parts = [instruction] if instruction else []
    if context:
        parts.append(f"Context: {context}")
    parts.append(f"Question: {ex.question}")
    if ex.choices and options == "inline":
        parts.append("Choices: " + "; ".join(ex.choices))
    elif ex.choices and options == "lettered":
        parts.append("\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, ex.choices)))
    return "\n\n".join(parts)


def scored_choices(ex: QAExample, options: str) -> list[str]:
    """What log-likelihood scoring scores after the prompt: the letters when the prompt shows
    lettered options (as lm-evaluation-harness does for MMLU), else the choice texts."""
    return list(LETTERS[: len(ex.choices)]) if options == "lettered" else list(ex.choices)


def collate_right(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch: input_ids, attention_mask, labels."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(items: list[tuple[Encoded, Encoded]], pad_student: int, pad_teacher: int) -> dict[str, torch.Tensor]:
    """Student and teacher tokenisations of the same examples; teacher keys get a `teacher_` prefix."""
    batch = collate_right([s for s, _ in items], pad_student)
    batch.update({f"teacher_{k}": v for k, v in collate_right([t for _, t in items], pad_teacher).items()})
    return batch


def collate_left(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for batched generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return {"input_ids": ids, "attention_mask": mask}
