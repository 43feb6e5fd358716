"""N-gram overlap metrics from maintained libraries (rouge-score, sacrebleu).

ROUGE uses rouge-score's scorer with Porter stemming, but with a Unicode-aware tokenizer
(rouge-score's default drops every non-ASCII character, so text in other scripts would score
0 even against itself). BLEU-n is sacrebleu's sentence BLEU with n-grams up to n, exponential
smoothing (Chen & Cherry 2014, method 3) and effective order, scaled to 0-1.
"""

from __future__ import annotations

import re
import shutil
from functools import lru_cache
from pathlib import Path


class UnicodeTokenizer:
    """Lower-cased word tokens of any script; ASCII words are Porter-stemmed as rouge-score does."""

    def __init__(self):
        from nltk.stem import porter

        self._stem = porter.PorterStemmer().stem

    def tokenize(self, text: str) -> list[str]:
        tokens = _words(text)
        return [self._stem(t) if t.isascii() and len(t) > 3 else t for t in tokens]


@lru_cache(maxsize=None)
def _rouge(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], tokenizer=UnicodeTokenizer())


def rouge(kind: str):
    def score(predictions: list[str], references: list[list[str]]) -> list[float]:
        scorer = _rouge(kind)
        return [scorer.score_multi(refs, pred)[kind].fmeasure for pred, refs in zip(predictions, references)]

    return score


def bleu(order: int):
    def score(predictions: list[str], references: list[list[str]]) -> list[float]:
        from sacrebleu.metrics import BLEU

        scorer = BLEU(max_ngram_order=order, effective_order=True, smooth_method="exp")
        return [scorer.sentence_score(pred, refs).score / 100.0 for pred, refs in zip(predictions, references)]

    return score


def chrf(predictions: list[str], references: list[list[str]]) -> list[float]:
    from sacrebleu.metrics import CHRF

    scorer = CHRF()
    return [scorer.sentence_score(pred, refs).score / 100.0 for pred, refs in zip(predictions, references)]


WORDNET_DIRS = ("/usr/share/wordnet",)
# WordNet 3.0's lexicographer file names (lexnames(5WN)); nltk reads them from a `lexnames`
# file that Debian's wordnet-base does not ship, so distillqa writes it next to a copy of the rest.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()
_POS_NUMBER = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}


def _plain_wordnet_class():
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class PlainWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # METEOR needs no mapping to other WordNet versions (that would need nltk_data)

    return PlainWordNet


@lru_cache(maxsize=None)
def _wordnet():
    """WordNet for METEOR, read from Debian's wordnet-base files (or nltk_data if present)."""
    import nltk

    from distillqa.cache import cache_root
    from distillqa.errors import ConfigError

    for d in map(Path, WORDNET_DIRS):
        if (d / "data.noun").is_file():
            local = cache_root() / "wordnet"
            local.mkdir(parents=True, exist_ok=True)
            for f in d.iterdir():
                if f.is_file() and not (local / f.name).exists():
                    shutil.copyfile(f, local / f.name)  # nltk refuses links that leave its root
            (local / "lexnames").write_text(
                "".join(f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)))
            if str(local) not in nltk.data.path:
                nltk.data.path.append(str(local))  # nltk only reads corpora below its data path roots
            return _plain_wordnet_class()(str(local), None)
    try:
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        raise ConfigError("metric meteor needs WordNet: apt-get install wordnet-base wordnet-sense-index "
                          "(or nltk's wordnet corpus in nltk_data)") from None


def meteor(predictions: list[str], references: list[list[str]]) -> list[float]:
    from nltk.translate.meteor_score import meteor_score

    wn = _wordnet()
    return [meteor_score([_words(r) for r in refs], _words(pred), wordnet=wn) for pred, refs in zip(predictions, references)]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())
