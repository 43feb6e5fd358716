"""LLM-as-judge metrics in the spirit of RAGAS, with any OpenAI-compatible endpoint or a local model.

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

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from distillqa.errors import ConfigError
from distillqa.metrics.embedding import embed, reference_cosines
from distillqa.metrics.settings import EvalSettings

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


class JudgeError(ConfigError):
    """The judge endpoint could not be reached after retries."""


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


class ReplyCache:
    """Judge replies in SQLite, keyed by sha256(judge model, prompt, attempt, max_tokens); safe across threads."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT)")
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(model: str, prompt: str, attempt: int, max_tokens: int, repeat: int = 0) -> str:
        # A repeat (judge calibration asks the same question again) is its own request; repeat 0
        # keeps the keys replies were cached under before repeats existed.
        again = f"\0repeat {repeat}" if repeat else ""
        return hashlib.sha256(f"{model}\0{attempt}\0{max_tokens}{again}\0{prompt}".encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
            self.hits += row is not None
        return row[0] if row else None

    def put(self, key: str, reply: str) -> None:
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?)", (key, reply))


class Judge:
    """Base: caching, concurrency and the parse-retry loop; subclasses implement `_complete`."""

    def __init__(self, model: str, cache: ReplyCache | None, concurrency: int = 4, parse_retries: int = 2, max_tokens: int = 256):
        self.model, self.cache, self.concurrency = model, cache, concurrency
        self.parse_retries, self.max_tokens = parse_retries, max_tokens
        self.requests = 0
        self.repeat = 0  # > 0: ask again, past the cached replies of earlier repeats (judge calibration)
        self.asked = self.first_unparsed = self.never_parsed = 0  # prompts `ask`ed, first replies / all replies unparseable

    def _complete(self, prompts: list[str], attempt: int) -> list[str]:
        raise NotImplementedError

    def complete_many(self, prompts: list[str], attempt: int = 0) -> list[str]:
        replies: list[str | None] = [None] * len(prompts)
        keys = [ReplyCache.key(self.model, p, attempt, self.max_tokens, self.repeat) for p in prompts]
        if self.cache:
            replies = [self.cache.get(k) for k in keys]
        todo = [i for i, r in enumerate(replies) if r is None]
        if todo:
            self.requests += len(todo)
            for i, reply in zip(todo, self._complete([prompts[i] for i in todo], attempt)):
                replies[i] = reply
                if self.cache:
                    self.cache.put(keys[i], reply)
        return replies  # type: ignore[return-value]

    def ask(self, prompts: list[str], parse: Callable[[str], Any]) -> list[Any]:
        """Parsed replies; None where every attempt gave an unparseable reply."""
        results: list[Any] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        for attempt in range(1 + self.parse_retries):
            if not pending:
                break
            replies = self.complete_many([prompts[i] for i in pending], attempt)
            parsed = [(i, parse(r)) for i, r in zip(pending, replies)]
            for i, value in parsed:
                results[i] = value
            pending = [i for i, value in parsed if value is None]
            if attempt == 0:
                self.first_unparsed += len(pending)
        self.asked += len(prompts)
        self.never_parsed += len(pending)
        return results


def check_url(base_url: str) -> None:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"judge.url: '{base_url}' is not an http(s) URL such as http://127.0.0.1:8000/v1")


class EndpointJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama, hosted APIs,
    `distillqa serve`). The API key is read from the environment variable `api_key_env` and is
    never logged or written anywhere."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout: float = 120.0,
                 retries: int = 3, **kwargs):
        super().__init__(model, **kwargs)
        check_url(base_url)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.timeout, self.retries = timeout, retries
        self._api_key_env = api_key_env
        if api_key_env and not os.environ.get(api_key_env):
            raise ConfigError(f"judge.api_key_env: environment variable {api_key_env} is not set")

    def _request(self, prompt: str, attempt: int) -> str:
        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "temperature": 0.0 if attempt == 0 else 0.7, "max_tokens": self.max_tokens,
                           "seed": attempt + 100 * self.repeat}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self._api_key_env]}"
        last = ""
        for k in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, json.JSONDecodeError) as e:
                last = type(e).__name__ + (f": {e.reason}" if isinstance(e, urllib.error.URLError) else "")
            time.sleep(min(30.0, 0.5 * 2**k))
        raise JudgeError(f"judge endpoint {self.url} failed after {self.retries + 1} tries ({last})")

    def _complete(self, prompts: list[str], attempt: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._request(p, attempt), prompts))


class LocalJudge(Judge):
    """A local causal LM as judge (any registry name, path or run directory); slow, for offline use."""

    def __init__(self, model_name: str, batch_size: int = 8, **kwargs):
        import torch

        from distillqa.models.registry import load_model, load_tokenizer

        super().__init__(model_name, **kwargs)
        self.tok, self.lm, self.batch_size = load_tokenizer(model_name), load_model(model_name), batch_size
        if torch.cuda.is_available():
            self.lm.to("cuda")

    def _complete(self, prompts: list[str], attempt: int) -> list[str]:
        from distillqa.config import GenerationConfig
        from distillqa.generate import generate_batch

        cfg = GenerationConfig(max_new_tokens=self.max_tokens, do_sample=attempt > 0, temperature=0.7)
        ids = [chat_prompt_ids(self.tok, [{"role": "user", "content": p}]) for p in prompts]
        out: list[str] = []
        for start in range(0, len(ids), self.batch_size):
            out += generate_batch(self.lm, self.tok, ids[start : start + self.batch_size], cfg, seed=attempt)
        return out


def chat_prompt_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of a chat: the tokenizer's chat template, or `role: content` lines ending in `assistant:`."""
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\n\nassistant:"
    return tok(text)["input_ids"]


def _judge(settings: EvalSettings) -> Judge:
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
