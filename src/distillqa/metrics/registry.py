"""The metric registry: each metric's family, range and direction live here and only here.

A metric scores each row of a predictions file (prediction, references, question, context)
and returns a float in its range, or None where it could not be computed (a judge reply that
could not be parsed); None is counted as missing, never turned into a number. Multiple
references: the best one counts, as in SQuAD. An empty or whitespace-only prediction scores
the metric's worst value by definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from distillqa.errors import ConfigError
from distillqa.metrics import choices, embedding, judge, ngram, squad
from distillqa.metrics.settings import EvalSettings

Rows = list[dict]


def _text_metric(fn: Callable[[list[str], list[list[str]]], list[float]]):
    return lambda rows, settings: fn([r["prediction"] for r in rows], [r["references"] for r in rows])


@dataclass(frozen=True)
class Metric:
    name: str
    family: str  # "ngram" | "embedding" | "judge" | "lexical" | "choice"
    low: float
    high: float
    higher_is_better: bool
    default: bool
    description: str
    compute: Callable[[Rows, EvalSettings], list[float | None]]
    needs: tuple[str, ...] = ()  # fields every predictions row must have besides prediction and references

    def score(self, rows: Rows, settings: EvalSettings) -> list[float | None]:
        worst = self.low if self.higher_is_better else self.high
        scores: list[float | None] = [worst] * len(rows)
        live = [i for i, r in enumerate(rows) if r["prediction"].strip()]
        if live:
            for i, s in zip(live, self.compute([rows[i] for i in live], settings)):
                scores[i] = s
        return scores


_ALL = [
    *[Metric(f"bleu_{n}", "ngram", 0.0, 1.0, True, True,
             f"sentence BLEU with n-grams up to {n} (sacrebleu, exponential smoothing), 0-1", _text_metric(ngram.bleu(n)))
      for n in (1, 2, 3, 4)],
    *[Metric(f"rouge_{k}", "ngram", 0.0, 1.0, True, True, f"ROUGE-{k.upper()} F-measure, Porter-stemmed (rouge-score)",
             _text_metric(ngram.rouge(f"rouge{k.upper()}"))) for k in ("1", "2", "l")],
    Metric("cosine", "embedding", -1.0, 1.0, True, True,
           "cosine similarity of sentence embeddings (all-MiniLM-L6-v2 by default)", embedding.cosine),
    Metric("bertscore_p", "embedding", -1.0, 1.0, True, True, "BERTScore precision (bert-score, local model)", embedding.bertscore("P")),
    Metric("bertscore_r", "embedding", -1.0, 1.0, True, True, "BERTScore recall (bert-score, local model)", embedding.bertscore("R")),
    Metric("bertscore_f1", "embedding", -1.0, 1.0, True, True, "BERTScore F1 (bert-score, local model)", embedding.bertscore("F")),
    Metric("faithfulness", "judge", 0.0, 1.0, True, True,
           "share of the answer's claims that the context supports (LLM judge)", judge.faithfulness),
    Metric("answer_correctness", "judge", 0.0, 1.0, True, True,
           "0.75 x claim-level F1 against the reference (LLM judge) + 0.25 x embedding cosine", judge.answer_correctness),
    Metric("answer_relevance", "judge", -1.0, 1.0, True, True,
           "cosine between the question and the one the judge infers from the answer; 0 if noncommittal", judge.answer_relevance),
    Metric("exact_match", "lexical", 0.0, 1.0, True, False, "SQuAD exact match after SQuAD answer normalisation", _text_metric(squad.exact_match)),
    Metric("token_f1", "lexical", 0.0, 1.0, True, False, "SQuAD token-overlap F1 after SQuAD answer normalisation", _text_metric(squad.token_f1)),
    Metric("chrf", "ngram", 0.0, 1.0, True, False, "sentence chrF (sacrebleu), 0-1", _text_metric(ngram.chrf)),
    Metric("meteor", "ngram", 0.0, 1.0, True, False, "METEOR (nltk; needs WordNet, see README)", _text_metric(ngram.meteor)),
    Metric("choice_accuracy", "choice", 0.0, 1.0, True, False, "1 if the generated answer maps to the correct choice "
           "(label, text, then best overlap; see metrics/choices.py)", choices.choice_accuracy, needs=("choices",)),
    Metric("unmapped_choice", "choice", 0.0, 1.0, False, False,
           "1 if the generated answer maps to no choice (counted as wrong by choice_accuracy)", choices.unmapped_choice,
           needs=("choices",)),
    Metric("acc", "choice", 0.0, 1.0, True, False, "1 if the choice with the highest log-likelihood is correct "
           "(mcq.method=loglikelihood)", choices.acc, needs=("choices", "choice_logprobs")),
    Metric("acc_norm", "choice", 0.0, 1.0, True, False, "acc with log-likelihoods divided by the choices' lengths in "
           "characters", choices.acc_norm, needs=("choices", "choice_logprobs", "choice_lengths")),
]
METRICS: dict[str, Metric] = {m.name: m for m in _ALL}
DEFAULT_METRICS = [m.name for m in _ALL if m.default]
OFFLINE_METRICS = [m.name for m in _ALL if m.default and m.family != "judge"]
GROUPS: dict[str, list[str]] = {
    "default": DEFAULT_METRICS, "offline": OFFLINE_METRICS,
    **{fam: [m.name for m in _ALL if m.family == fam and m.default] for fam in ("ngram", "embedding", "judge")},
}


def resolve_metrics(spec: str | list[str]) -> list[Metric]:
    """Metric names, comma-separated; `default` (the 14), `offline` (the 11 without a judge), or families by name."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[Metric] = []
    for name in (n.strip() for n in names):
        if name in GROUPS:
            out += [METRICS[n] for n in GROUPS[name]]
        elif name in METRICS:
            out.append(METRICS[name])
        elif name:
            raise ConfigError(f"metrics: unknown metric '{name}'; known: {', '.join(METRICS)} (or {', '.join(GROUPS)})")
    return list(dict.fromkeys(out))


def asks_for_judge(spec: str) -> bool:
    """Whether a comma-separated metrics spec names a judge metric, itself or through a group; unknown
    names are left for `resolve_metrics` to refuse."""
    names = (n.strip() for n in spec.split(","))
    return any(METRICS[m].family == "judge" for n in names for m in GROUPS.get(n, [n] if n in METRICS else []))
