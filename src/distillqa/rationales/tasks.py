"""Training sequences and the loss of the rationale-distillation methods (Hendriks et al. 2025).

Four tasks, each a prompt -> target pair built with the QA `PromptBuilder` (chat template or
plain template, loss on target tokens only):
- answer          "[answer] ..." question + choices -> "The answer is X."
- explain         "[explain] ..." question + choices -> the gold rationale
- factual         question + choices -> "<gold rationale> So the answer is X."
- counterfactual  question + choices + a rationale arguing for wrong choice W -> "So the answer is W."

Methods weight them (alpha, beta, gamma in [0, 1], 0.5 by default):
- MT     alpha * L_answer + (1 - alpha) * L_explain                  (distilling step-by-step)
- CF     beta * L_factual + (1 - beta) * L_counterfactual
- MT+CF  gamma * MT + (1 - gamma) * CF
Each L is the mean cross-entropy over that task's target tokens in the batch; one training item
is one question with all its task sequences, so every batch holds every task.

Causal LMs and encoder-decoder LMs (T5, as in the study) are both students.

At test time MT and MT+CF answer with the answer task (and explain with the explain task); CF
answers with the factual task, whose output carries its own explanation.
"""

from __future__ import annotations

import hashlib
import re

import torch
import torch.nn.functional as F
from torch import nn

from distillqa.data.prompts import IGNORE, Encoded, PromptBuilder, collate_right
from distillqa.data.records import QAExample
from distillqa.models.traits import is_encoder_decoder
from distillqa.rationales.data import RationaleExample
from distillqa.train.objectives import answer_states, project_to_vocab

TASKS = ("answer", "explain", "factual", "counterfactual")
METHODS = ("mt", "cf", "mt+cf")
INSTRUCTIONS = {
    "answer": "[answer] Choose the correct choice for the question.",
    "explain": "[explain] Explain which choice answers the question and why.",
    "factual": "Explain which choice answers the question, then give the answer.",
    "counterfactual": "Answer the question following the reasoning in the context.",
}


def task_weights(method: str, alpha: float = 0.5, beta: float = 0.5, gamma: float = 0.5) -> dict[str, float]:
    mt = {"answer": alpha, "explain": 1 - alpha}
    cf = {"factual": beta, "counterfactual": 1 - beta}
    if method == "mt":
        return mt
    if method == "cf":
        return cf
    if method == "mt+cf":
        return {**{k: gamma * w for k, w in mt.items()}, **{k: (1 - gamma) * w for k, w in cf.items()}}
    raise ValueError(f"unknown method '{method}'; use one of {', '.join(METHODS)}")


def answer_sentence(choice: str, so: bool = False) -> str:
    return f"{'So the' if so else 'The'} answer is {choice}."


def wrong_choice(ex: RationaleExample, seed: int) -> int | None:
    """The wrong choice whose counterfactual rationale trains this question (fixed per seed);
    None if the teacher wrote no counterfactual for any wrong choice."""
    wrong = [i for i, c in enumerate(ex.choices) if c != ex.answer and i < len(ex.counterfactuals) and ex.counterfactuals[i]]
    if not wrong:
        return None
    digest = int(hashlib.sha256(f"{seed}:{ex.id}".encode()).hexdigest(), 16)
    return wrong[digest % len(wrong)]


class TaskPrompts:
    """One PromptBuilder per task (they differ only in the instruction). For an encoder-decoder
    student the prompt is the encoder input and the target the decoder labels, each at most
    `max_length` tokens (the study's input and output lengths); a causal LM gets both in one
    sequence of at most `max_length`."""

    def __init__(self, tok, template: str, max_length: int, seq2seq: bool = False):
        self.builders = {t: PromptBuilder(tok, "plain" if seq2seq else template, INSTRUCTIONS[t], max_length,
                                          separate_output=seq2seq) for t in TASKS}
        self.tok, self.max_length, self.seq2seq = tok, max_length, seq2seq

    def _pair(self, task: str, qa: QAExample, target: str) -> Encoded | None:
        build = self.builders[task]
        if not self.seq2seq:
            return build.encode_train(qa, target)
        prompt = build.fit_prompt(qa, self.max_length, anchor=None)
        labels = self.tok(target.strip())["input_ids"]
        if labels[-1:] != [self.tok.eos_token_id]:  # the decoder must learn to stop
            labels.append(self.tok.eos_token_id)
        if prompt is None or len(labels) > self.max_length:  # never cut the answer off a target: skip, counted
            return None
        return Encoded(qa.id, prompt, labels)

    @staticmethod
    def as_qa(ex: RationaleExample, context: str = "") -> QAExample:
        return QAExample(ex.id, ex.question, (ex.answer,), context=context, choices=ex.choices)

    def encode(self, task: str, ex: RationaleExample, rationale_type: str, seed: int) -> Encoded | None:
        """The task's training sequence; None if it does not fit or the teacher text it needs is missing."""
        rationale = ex.explanation(rationale_type)
        if task == "answer":
            return self._pair(task, self.as_qa(ex), answer_sentence(ex.answer))
        if task in ("explain", "factual") and rationale is None:
            return None
        if task == "explain":
            return self._pair(task, self.as_qa(ex), rationale)
        if task == "factual":
            return self._pair(task, self.as_qa(ex), f"{rationale} {answer_sentence(ex.answer, so=True)}")
        if (k := wrong_choice(ex, seed)) is None:
            return None
        return self._pair(task, self.as_qa(ex, ex.counterfactuals[k]), answer_sentence(ex.choices[k], so=True))

    def prompt(self, task: str, ex: RationaleExample, max_new_tokens: int) -> list[int] | None:
        return self.builders[task].encode_prompt(self.as_qa(ex), max_new_tokens)


def training_items(prompts: TaskPrompts, examples: list[RationaleExample], weights: dict[str, float],
                   rationale_type: str, seed: int) -> tuple[list[list[tuple[Encoded, int]]], int]:
    """One item per question: its (sequence, task index) pairs; also the number of questions skipped
    (too long, or missing a teacher text one of the method's tasks needs)."""
    items, skipped = [], 0
    for ex in examples:
        seqs = [(prompts.encode(t, ex, rationale_type, seed), TASKS.index(t)) for t in weights if weights[t] > 0]
        if any(e is None for e, _ in seqs):
            skipped += 1
            continue
        items.append(seqs)
    return items, skipped


def collate_tasks(items: list[list[tuple[Encoded, int]]], pad_id: int, seq2seq: bool = False) -> dict[str, torch.Tensor]:
    flat = [pair for item in items for pair in item]
    if seq2seq:  # encoder inputs and decoder labels are padded separately
        inputs = collate_right([Encoded(e.id, e.input_ids, e.input_ids) for e, _ in flat], pad_id)
        targets = collate_right([Encoded(e.id, e.labels, e.labels) for e, _ in flat], pad_id)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": targets["labels"]}
    else:
        batch = collate_right([e for e, _ in flat], pad_id)
    batch["task"] = torch.tensor([t for _, t in flat], dtype=torch.long)
    return batch


class WeightedTaskCE(nn.Module):
    """L = sum_t w_t * CE_t, CE_t the mean cross-entropy over the target tokens of task t's sequences."""

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = {TASKS.index(t): w for t, w in weights.items() if w > 0}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if is_encoder_decoder(model):  # the decoder predicts every label position
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
            keep = labels != IGNORE
            logits, targets = logits[keep].float(), labels[keep]
        else:
            hidden, targets = answer_states(model, batch)
            keep = batch["labels"][:, 1:] != IGNORE
            logits = project_to_vocab(model, hidden)
        token_task = batch["task"][:, None].expand_as(keep)[keep]
        ce = F.cross_entropy(logits, targets, reduction="none")
        loss, logs = ce.new_zeros(()), {}
        for t, w in self.weights.items():
            mask = token_task == t
            if mask.any():
                part = ce[mask].mean()
                loss = loss + w * part
                logs[TASKS[t]] = part.item()
        return loss, logs


ANSWER_RE = re.compile(r"answer is\s*:?\s*(.+?)\s*(?:[.!\n]|$)", re.IGNORECASE)


def _norm(text: str) -> str:
    return re.sub(r"[^\w\s]", "", text.lower()).strip()


def parse_answer(text: str, choices: tuple[str, ...]) -> str | None:
    """The choice named after the last 'the answer is' (case and punctuation ignored); None if there is no
    such phrase. A phrase that names no choice returns the phrase itself (scored wrong)."""
    found = ANSWER_RE.findall(text)
    if not found:
        return None
    said = _norm(found[-1])
    for choice in choices:
        if said == _norm(choice) or said in (f"the {_norm(choice)}", f"a {_norm(choice)}", f"an {_norm(choice)}"):
            return choice
    return found[-1]
