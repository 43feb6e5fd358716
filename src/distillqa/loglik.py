"""Log-likelihood of a continuation given a prompt, batched: what multiple-choice scoring needs.

Sequences are left-padded, so every continuation ends at the last position and only the last
`longest continuation` positions are projected to the vocabulary (never batch x length x vocab).
Position ids count real tokens only, so padding changes no score.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sequence_logprobs(model, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Sum over the continuation's tokens of log p(token | everything before it), per (prompt ids,
    continuation ids) pair."""
    model.eval()
    device = next(model.parameters()).device
    width = max(len(p) + len(c) for p, c in pairs)
    keep = max(len(c) for _, c in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (prompt, cont) in enumerate(pairs):
        seq = prompt + cont
        ids[i, width - len(seq):], mask[i, width - len(seq):] = torch.tensor(seq), 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Logits at position t predict token t + 1: the last `keep` tokens need the `keep` logits before them.
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)
    targets = ids[:, width - keep:]
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return [float(token_logp[i, keep - len(cont):].sum()) for i, (_, cont) in enumerate(pairs)]
