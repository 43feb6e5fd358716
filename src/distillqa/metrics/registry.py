"""The metric registry: each metric's family, range and direction live here and only here.

A metric scores one prediction against its references (the best reference counts, as in
SQuAD) and returns a float in its range. An empty or whitespace-only prediction scores the
metric's worst value, by definition, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from distillqa.errors import ConfigError
from distillqa.metrics import ngram, squad


@dataclass(frozen=True)
class Metric:
    name: str
    family: str  # "ngram" | "lexical" | later "embedding", "judge"
    low: float
    high: float
    higher_is_better: bool
    default: bool
    description: str
    score_batch: Callable[[list[str], list[list[str]]], list[float]]

    def score(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        worst = self.low if self.higher_is_better else self.high
        scores = [worst] * len(predictions)
        live = [i for i, p in enumerate(predictions) if p.strip()]
        if live:
            for i, s in zip(live, self.score_batch([predictions[i] for i in live], [references[i] for i in live])):
                scores[i] = s
        return scores


_ALL = [
    Metric("rouge_l", "ngram", 0.0, 1.0, True, True, "ROUGE-L F-measure, Porter-stemmed (rouge-score)", ngram.rouge_l),
    Metric("bleu", "ngram", 0.0, 1.0, True, True, "sentence BLEU-4 with exponential smoothing (sacrebleu), scaled to 0-1", ngram.bleu),
    Metric("exact_match", "lexical", 0.0, 1.0, True, True, "SQuAD exact match after SQuAD answer normalisation", squad.exact_match),
    Metric("token_f1", "lexical", 0.0, 1.0, True, True, "SQuAD token-overlap F1 after SQuAD answer normalisation", squad.token_f1),
]
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
DEFAULT_METRICS = [m.name for m in _ALL if m.default]


def resolve_metrics(spec: str | list[str]) -> list[Metric]:
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Metric] = []
    for name in (n.strip() for n in names):
        if name == "default":
            out += [METRICS[n] for n in DEFAULT_METRICS]
        elif name in METRICS:
            out.append(METRICS[name])
        elif name:
            raise ConfigError(f"metrics: unknown metric '{name}'; known: {', '.join(METRICS)} (or 'default')")
    return list(dict.fromkeys(out))
