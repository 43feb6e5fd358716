"""SQuAD exact match and token F1, with the official SQuAD v1.1 answer normalisation
(lower-case, strip punctuation, the articles a/an/the and extra white space); the best
reference counts. No maintained offline package provides these (`evaluate` needs the hub).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(pred: str, ref: str) -> float:
    p, r = normalize(pred).split(), normalize(ref).split()
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r:
        return float(p == r)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def exact_match(predictions: list[str], references: list[list[str]]) -> list[float]:
    return [max(float(normalize(p) == normalize(r)) for r in refs) for p, refs in zip(predictions, references)]


def token_f1(predictions: list[str], references: list[list[str]]) -> list[float]:
    return [max(_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
