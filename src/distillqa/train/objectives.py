"""Training objectives for the one loop in `loop.py`.

An objective is an `nn.Module` called as `objective(model, batch) -> (loss, logs)`. Modules
of its own (e.g. projectors of later distillation objectives) are its submodules, so the loop
trains, synchronises across processes and checkpoints them with the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distillqa.data.prompts import IGNORE


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(backbone, lm_head, logit softcap) of a causal LM, looking through a PEFT wrapper. Never a DDP wrapper:
    the loop wraps the whole loss (`loop.TrainingLoss`), so objectives always get the model itself."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model, inner.get_output_embeddings(), getattr(inner.config, "final_logit_softcapping", None)


def answer_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict answer tokens, and those tokens.

    Returns (hidden [N, H], targets [N]) for the N answer tokens of the batch. Only these
    positions are projected to the vocabulary later, which keeps memory at N x V, not B x T x V.
    """
    backbone, _, _ = causal_lm_parts(model)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def project_to_vocab(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits of `hidden` through the model's head; `hidden` may come in another dtype (an fp32 projector's output
    into a bf16 model), and is cast to the head's."""
    _, head, softcap = causal_lm_parts(model)
    return softcapped(head(hidden.to(head.weight.dtype)), softcap).float()


def softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """c * tanh(logits / c) for a model with final logit softcapping c (Gemma 2), else the logits."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def linear_head(model: nn.Module) -> tuple[torch.Tensor, float | None] | None:
    """(weight W, softcap) if the model's logits are softcapped(h @ W^T), with no bias or adapter on the head, else None."""
    _, head, softcap = causal_lm_parts(model)
    return (head.weight, softcap) if type(head) is nn.Linear and head.bias is None else None


class SFTObjective(nn.Module):
    """Cross-entropy on answer tokens: L = -1/N * sum_i log p(y_i | prompt, y_<i)."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        hidden, targets = answer_states(model, batch)
        loss = F.cross_entropy(project_to_vocab(model, hidden), targets)
        return loss, {"ce": loss.item()}
