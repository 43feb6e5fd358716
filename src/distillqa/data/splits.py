"""Deterministic, seeded train/validation/test splits.

Examples that share a context are kept in the same split (TeleQuAD has several questions per
3GPP paragraph), so no test context is ever seen in training. Examples without a context are
their own group.
"""

from __future__ import annotations

import hashlib
import random

from distillqa.data.records import QAExample

SPLITS = ("train", "validation", "test")


def group_key(ex: QAExample) -> str:
    text = ex.context if ex.context else f"id:{ex.id}"
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def split_examples(
    examples: list[QAExample], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[QAExample]]:
    """Split by context groups so that each split gets about its fraction of the examples.

    Groups are ordered by a seeded shuffle of their (sorted) keys, then filled into the
    splits greedily; the result depends only on the examples and the seed, not on file order.
    """
    groups: dict[str, list[QAExample]] = {}
    for ex in examples:
        groups.setdefault(group_key(ex), []).append(ex)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    total = len(examples)
    targets = [f * total for f in fractions]
    out: dict[str, list[QAExample]] = {name: [] for name in SPLITS}
    filled = [0.0, 0.0, 0.0]
    for key in keys:
        # Give the group to the split that is furthest below its target, relative to it.
        i = min(range(3), key=lambda j: (filled[j] / targets[j]) if targets[j] > 0 else float("inf"))
        out[SPLITS[i]].extend(groups[key])
        filled[i] += len(groups[key])
    for name in SPLITS:
        out[name].sort(key=lambda e: e.id)
    return out
