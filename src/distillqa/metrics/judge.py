"""LLM-as-judge metrics in the spirit of RAGAS, with any OpenAI-compatible endpoint or a local model
as the judge (a chat client of `clients.py`).

Prompts (version `PROMPT_VERSION`) ask for a JSON object; a reply that cannot be parsed is
asked again (up to `parse_retries` times, sampling at temperature 0.7 instead of greedy), then
recorded as missing (None): never silently scored 0 or 1. Replies are cached by (judge model,
prompt, attempt), so a rerun never pays for the same request twice.

- faithfulness = supported claims / claims of the answer, judged against the context;
- answer_correctness = 0.75 * F1 + 0.25 * cosine(answer, reference), F1 = TP / (TP + (FP + FN) / 2)
  over the statements the judge classifies (true positives, false positives, false negatives);
- answer_relevance = cosine(question, question the judge infers from the answer), 0 if the
  judge finds the answer noncommittal.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from distillqa.errors import ConfigError
from distillqa.metrics.embedding import embed, reference_cosines
from distillqa.metrics.settings import EvalSettings

if TYPE_CHECKING:
    from distillqa.clients import ChatClient

PROMPT_VERSION = "1"
_JSON_ONLY = "Reply with one JSON object and nothing else."

PROMPTS = {
    "faithfulness": (
        "You check whether an answer is faithful to a context.\n"
        "Split the answer into short factual claims and decide, for each claim, whether the context supports it.\n\n"
        "Context: {context}\n\nQuestion: {question}\n\nAnswer: {answer}\n\n"
        '{json_only} Format: {{"claims": <number of claims in the answer>, "supported": <number of them the context supports>}}'
    ),
    "answer_correctness": (
        "You compare an answer with a reference answer to the same question.\n"
        "Split both into short factual statements. TP: statements of the answer that the reference supports. "
        "FP: statements of the answer that the reference does not support. FN: statements of the reference missing "
        "from the answer.\n\nQuestion: {question}\n\nReference: {reference}\n\nAnswer: {answer}\n\n"
        '{json_only} Format: {{"TP": <int>, "FP": <int>, "FN": <int>}}'
    ),
    "answer_relevance": (
        "Read an answer and write the one question it most directly answers. Say whether the answer is "
        "noncommittal (evasive, vague, or saying it does not know).\n\nContext: {context}\n\nAnswer: {answer}\n\n"
        '{json_only} Format: {{"question": "<the question>", "noncommittal": <0 or 1>}}'
    ),
}


def _first_json_object(reply: str) -> dict | None:
    """The first JSON object in the reply, decoded from each `{` in turn, so that braces inside
    strings and nested objects are read as JSON reads them."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", reply):
        try:
            obj, _ = decoder.raw_decode(reply, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _ints(obj: dict | None, *keys: str) -> tuple[int, ...] | None:
    if obj is None:
        return None
    values = []
    for k in keys:
        v = obj.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
            return None
        values.append(int(v))
    return tuple(values)


def parse_faithfulness(reply: str) -> float | None:
    counts = _ints(_first_json_object(reply), "claims", "supported")
    if counts is None or counts[0] == 0 or counts[1] > counts[0]:
        return None
    return counts[1] / counts[0]


def parse_correctness_f1(reply: str) -> float | None:
    counts = _ints(_first_json_object(reply), "TP", "FP", "FN")
    if counts is None or sum(counts) == 0:
        return None
    tp, fp, fn = counts
    return tp / (tp + 0.5 * (fp + fn))


def parse_relevance(reply: str) -> tuple[str, int] | None:
    obj = _first_json_object(reply)
    flag = _ints(obj, "noncommittal")
    if obj is None or flag is None or flag[0] > 1 or not isinstance(obj.get("question"), str) or not obj["question"].strip():
        return None
    return obj["question"].strip(), flag[0]


def _judge(settings: EvalSettings) -> ChatClient:
    if settings.judge is None:
        raise ConfigError("judge metrics need a judge: pass --judge-url and --judge-model (an OpenAI-compatible "
                          "endpoint) or --judge-local MODEL, or use --metrics offline")
    return settings.judge


def _fill(name: str, **fields: str) -> str:
    return PROMPTS[name].format(json_only=_JSON_ONLY, **fields)


def faithfulness(rows, settings: EvalSettings) -> list[float | None]:
    prompts = [_fill("faithfulness", context=r.get("context", ""), question=r.get("question", ""), answer=r["prediction"]) for r in rows]
    return _judge(settings).ask(prompts, parse_faithfulness)


def answer_correctness(rows, settings: EvalSettings) -> list[float | None]:
    judge = _judge(settings)
    preds = [r["prediction"] for r in rows]
    # The judge compares against the reference closest in meaning; the cosine part uses the same one.
    best_refs, cosines = [], []
    for r, sims in zip(rows, reference_cosines(preds, [r["references"] for r in rows], settings)):
        j = max(range(len(sims)), key=sims.__getitem__)
        best_refs.append(r["references"][j])
        cosines.append(sims[j])
    prompts = [_fill("answer_correctness", question=r.get("question", ""), reference=ref, answer=p)
               for r, ref, p in zip(rows, best_refs, preds)]
    f1s = judge.ask(prompts, parse_correctness_f1)
    return [None if f1 is None else 0.75 * f1 + 0.25 * cos for f1, cos in zip(f1s, cosines)]


def answer_relevance(rows, settings: EvalSettings) -> list[float | None]:
    prompts = [_fill("answer_relevance", context=r.get("context", ""), answer=r["prediction"]) for r in rows]
    parsed = _judge(settings).ask(prompts, parse_relevance)
    ok = [i for i, p in enumerate(parsed) if p is not None]
    scores: list[float | None] = [None] * len(rows)
    if ok:
        generated = embed([parsed[i][0] for i in ok], settings)
        original = embed([rows[i].get("question", "") for i in ok], settings)
        for k, i in enumerate(ok):
            scores[i] = 0.0 if parsed[i][1] else float(generated[k] @ original[k])
    return scores
