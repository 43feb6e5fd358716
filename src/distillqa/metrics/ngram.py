"""N-gram overlap metrics from maintained libraries (rouge-score, sacrebleu)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def _rouge(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def rouge_l(predictions: list[str], references: list[list[str]]) -> list[float]:
    scorer = _rouge("rougeL")
    return [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(predictions, references)]


def bleu(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Sentence BLEU-4 with sacrebleu's exponential smoothing (Chen & Cherry 2014, method 3)."""
    from sacrebleu.metrics import BLEU

    scorer = BLEU(effective_order=True, smooth_method="exp")
    return [scorer.sentence_score(pred, refs).score / 100.0 for pred, refs in zip(predictions, references)]
