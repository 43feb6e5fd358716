"""Embedding metrics: sentence-embedding cosine (sentence-transformers) and BERTScore (bert-score),
both with a local model (all-MiniLM-L6-v2 from a PyPI package by default), batched."""

from __future__ import annotations

import torch

from distillqa.errors import ConfigError
from distillqa.metrics.settings import EvalSettings


def sentence_encoder(settings: EvalSettings):
    def load():
        from sentence_transformers import SentenceTransformer

        path = settings.embedding_path()
        try:
            return SentenceTransformer(path, device="cuda" if torch.cuda.is_available() else "cpu")
        except Exception as e:  # missing or corrupt files raise many kinds of errors
            raise ConfigError(f"embedding_model: could not load {path}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__}") from None

    return settings.memo(("sentence-encoder",), load)


def embed(texts: list[str], settings: EvalSettings) -> torch.Tensor:
    """Unit-length sentence embeddings [len(texts), D]."""
    model = sentence_encoder(settings)
    return model.encode(texts, batch_size=settings.batch_size, convert_to_tensor=True, normalize_embeddings=True,
                        show_progress_bar=False).cpu().float()


def reference_cosines(predictions: list[str], references: list[list[str]], settings: EvalSettings) -> list[list[float]]:
    """Cosine of each prediction with each of its references, all embedded in one batched pass."""
    flat = [r for refs in references for r in refs]
    vectors = embed(predictions + flat, settings)
    preds, refs = vectors[: len(predictions)], vectors[len(predictions):]
    out, start = [], 0
    for i, rs in enumerate(references):
        out.append((refs[start : start + len(rs)] @ preds[i]).tolist())
        start += len(rs)
    return out


def cosine(rows, settings: EvalSettings) -> list[float]:
    sims = reference_cosines([r["prediction"] for r in rows], [r["references"] for r in rows], settings)
    return [max(s) for s in sims]


def bertscore(part: str):
    """BERTScore P, R or F1 against the best reference (bert-score picks it by F1)."""

    def score(rows, settings: EvalSettings) -> list[float]:
        preds, refs = [r["prediction"] for r in rows], [r["references"] for r in rows]
        key = ("bertscore", tuple(preds), tuple(tuple(x) for x in refs))
        p, r, f = settings.memo(key, lambda: _bertscore(preds, refs, settings))
        return {"P": p, "R": r, "F": f}[part]

    return score


def _bertscore(preds, refs, settings: EvalSettings):
    import transformers
    from bert_score import score as bert_score

    path = settings.embedding_path()
    try:
        layers = settings.bertscore_layers or transformers.AutoConfig.from_pretrained(path).num_hidden_layers
    except Exception as e:
        raise ConfigError(f"embedding_model: could not read the config of {path}: {str(e).strip().splitlines()[0][:300]}") from None
    p, r, f = bert_score(preds, refs, model_type=path, num_layers=layers, batch_size=settings.batch_size,
                         device="cuda" if torch.cuda.is_available() else "cpu", verbose=False)
    return p.tolist(), r.tolist(), f.tolist()
