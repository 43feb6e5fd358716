"""Chat clients: one interface to an OpenAI-compatible endpoint or a local model, used by the judge
metrics, teacher rationale generation (the teacher is a client) and `distillqa serve` (the chat
prompt format of a local model); and `CompletionsClient`, the text completions of prompts already in
a model's chat format, through which generation and sequence-level KD use an endpoint.

A client sends prompts in batches (`complete_many`), concurrently for an endpoint, and caches
every reply in SQLite by (model, prompt, attempt), so a rerun never pays for the same request
twice. `ask` adds the parse-retry loop: a reply its parser cannot read is asked again (up to
`parse_retries` times, sampling at temperature 0.7 instead of greedy), then given as None. An
endpoint's transient failures (timeouts, 408/409/429, 5xx) are retried with backoff.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from distillqa.cache import cache_root
from distillqa.config import EndpointConfig, GenerationConfig, JudgeConfig, http_url
from distillqa.errors import ConfigError


class EndpointError(ConfigError):
    """An endpoint could not be reached after retries."""


class ReplyCache:
    """Replies in SQLite, keyed by sha256(model, prompt, attempt, max_tokens); safe across threads."""

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


class ChatClient:
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


def check_url(base_url: str, label: str = "judge") -> None:
    try:
        http_url(base_url)
    except ValueError as e:
        raise ConfigError(f"{label}.url: {e}") from None


class EndpointClient(ChatClient):
    """An OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama, hosted APIs,
    `distillqa serve`). The API key is read from the environment variable `api_key_env` and is
    never logged or written anywhere. `label` is the config key that names the endpoint in errors."""

    path = "/chat/completions"

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout: float = 120.0,
                 retries: int = 3, label: str = "judge", **kwargs):
        super().__init__(model, **kwargs)
        check_url(base_url, label)
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + self.path
        self.timeout, self.retries, self.label = timeout, retries, label
        self._api_key_env = api_key_env
        if api_key_env and not os.environ.get(api_key_env):
            raise ConfigError(f"{label}.api_key_env: environment variable {api_key_env} is not set")

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key_env:
            headers["Authorization"] = f"Bearer {os.environ[self._api_key_env]}"
        return headers

    def _body(self, prompt: str, attempt: int) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": 0.0 if attempt == 0 else 0.7, "max_tokens": self.max_tokens, "seed": attempt + 100 * self.repeat}

    @staticmethod
    def _reply(response: dict) -> str:
        return response["choices"][0]["message"]["content"] or ""

    def _request(self, prompt: str, attempt: int) -> str:
        body = json.dumps(self._body(prompt, attempt)).encode()
        last = ""
        for k in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return self._reply(json.loads(resp.read()))
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}{error_message(e)}"
                if e.code not in (408, 409, 429) and e.code < 500:
                    break  # a client error will not go away by retrying
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, json.JSONDecodeError) as e:
                last = type(e).__name__ + (f": {e.reason}" if isinstance(e, urllib.error.URLError) else "")
            time.sleep(min(30.0, 0.5 * 2**k))
        raise EndpointError(f"{self.label} endpoint {self.url} failed after {k + 1} tries ({last})")

    def _complete(self, prompts: list[str], attempt: int) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda p: self._request(p, attempt), prompts))

    def check_served(self) -> None:
        """Refuse, before any work starts, an endpoint that cannot be reached or does not list `model` in /models."""
        where = f"{self.label}: {self.base_url}/models"
        try:
            req = urllib.request.Request(self.base_url + "/models", headers=self._headers())
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                served = [m["id"] for m in json.loads(resp.read())["data"]]
        except urllib.error.HTTPError as e:
            raise EndpointError(f"{where} answered HTTP {e.code}{error_message(e)}; is this an OpenAI-compatible API?") from None
        except (urllib.error.URLError, OSError) as e:
            raise EndpointError(f"{where} cannot be reached ({getattr(e, 'reason', e)}); is the server running?") from None
        except (ValueError, KeyError, TypeError):
            raise EndpointError(f"{where} did not answer with an OpenAI model list") from None
        if self.model not in served:
            raise EndpointError(f"{self.label}: {self.base_url} serves {served}, not '{self.model}'; set {self.label}.model "
                                "to the name it serves, or serve the model under this name")


class CompletionsClient(EndpointClient):
    """Text completions (`/completions`) of prompts already in the model's chat format, as `generation`
    describes them (greedy: temperature 0): how generation and sequence-level KD use an endpoint.
    Nothing is cached here: the predictions file and the answers store are what a rerun resumes
    from, and a model name (a run directory's path) need not mean the same weights twice."""

    path = "/completions"

    def __init__(self, base_url: str, model: str, generation: GenerationConfig, **kwargs):
        super().__init__(base_url, model, cache=None, parse_retries=0, max_tokens=generation.max_new_tokens, **kwargs)
        self.generation = generation

    def _body(self, prompt: str, attempt: int) -> dict:
        g = self.generation
        sampling = {"temperature": g.temperature, "top_p": g.top_p, "seed": g.seed} if g.do_sample else {"temperature": 0.0}
        # add_special_tokens=false (vLLM, distillqa serve): the prompt already holds the template's BOS and turn markers
        return {"model": self.model, "prompt": prompt, "max_tokens": self.max_tokens, "add_special_tokens": False, **sampling}

    @staticmethod
    def _reply(response: dict) -> str:
        return (response["choices"][0]["text"] or "").strip()


def completions_client(cfg: EndpointConfig, model_name: str, generation: GenerationConfig, label: str) -> CompletionsClient:
    """A client of the endpoint `cfg`, asking for `cfg.model` (default `model_name`), checked to serve it."""
    client = CompletionsClient(cfg.url, cfg.model or model_name, generation, api_key_env=cfg.api_key_env,
                               timeout=cfg.timeout, retries=cfg.retries, concurrency=cfg.concurrency, label=label)
    client.check_served()
    return client


def error_message(e: urllib.error.HTTPError) -> str:
    """': ' and the message of an OpenAI-style error body, or '' if it has none."""
    try:
        return f": {json.loads(e.read())['error']['message'][:300]}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


class LocalClient(ChatClient):
    """A local causal LM (any registry name, path or run directory); slow, for offline use."""

    def __init__(self, model_name: str, batch_size: int = 8, **kwargs):
        import torch

        from distillqa.models.registry import load_model, load_tokenizer

        super().__init__(model_name, **kwargs)
        self.tok, self.lm, self.batch_size = load_tokenizer(model_name), load_model(model_name), batch_size
        if torch.cuda.is_available():
            self.lm.to("cuda")

    def _complete(self, prompts: list[str], attempt: int) -> list[str]:
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


def make_client(cfg: JudgeConfig) -> ChatClient | None:
    """The client `cfg` describes (a judge, or a teacher), with its reply cache; None if it names none."""
    if not (cfg.url or cfg.local_model):
        return None
    if cfg.url:
        check_url(cfg.url)  # before the cache file is created
    if cfg.url and cfg.api_key_env and not os.environ.get(cfg.api_key_env):
        raise ConfigError(f"judge.api_key_env: environment variable {cfg.api_key_env} is not set")
    cache = ReplyCache(cfg.cache or cache_root() / "judge.sqlite")
    common = dict(cache=cache, concurrency=cfg.concurrency, parse_retries=cfg.parse_retries, max_tokens=cfg.max_tokens)
    if cfg.local_model:
        return LocalClient(cfg.local_model, **common)
    return EndpointClient(cfg.url, cfg.model, cfg.api_key_env, timeout=cfg.timeout, retries=cfg.retries, **common)
