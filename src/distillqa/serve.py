"""`distillqa serve`: an OpenAI-compatible chat-completions and completions endpoint for any model
name (registry model, run directory, local path), on the standard library's HTTP server.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages, max_tokens or
max_completion_tokens, temperature, top_p, seed, n=1), POST /v1/completions (prompt: one string,
the same fields, and vLLM's `add_special_tokens`, default true: whether the tokenizer's own special
tokens, such as BOS, are added to the prompt; `distillqa generate` sends prompts already in the
chat format with it false). Requests are generated one at a time (the
model is not thread-safe); it is meant for local use: judges, demos, trying a distilled student.

Every request is checked before any generation and every failure is an OpenAI-style JSON error
(`{"error": {"message", "type", "param", "code"}}`): 400 for a body that is not JSON or a prompt
that does not fit the model or a field that breaks the schema (the message and `param` name it), 411/400
for a missing or invalid Content-Length, 413 for a body over `max_body_bytes` (never read), 422 for a
valid request this server does not do (`stream`, `n` > 1, `max_tokens` over its limit), 404/405
for unknown paths and methods, 503 when `max_pending` requests already wait. `max_tokens` above
`max_tokens_limit` is refused; an answer cut by `max_tokens` reports `finish_reason: "length"`.
A client that stops sending for `read_timeout` seconds is disconnected.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from distillqa.clients import chat_prompt_ids
from distillqa.config import GenerationConfig
from distillqa.errors import ConfigError
from distillqa.generate import generate_batch
from distillqa.models.registry import load_model, load_tokenizer

log = logging.getLogger(__name__)

Number = Union[StrictInt, StrictFloat]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class CompletionFields(BaseModel):
    """The request fields this server honours on both routes; other OpenAI fields are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = None
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = Field(False, description="streaming is not supported")


class ChatRequest(CompletionFields):
    messages: list[Message] = Field(..., min_length=1)


class TextRequest(CompletionFields):
    prompt: StrictStr = Field(..., min_length=1)
    add_special_tokens: StrictBool = True


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def parse_request(body: bytes, max_tokens_limit: int, default_max_tokens: int,
                  schema: type[CompletionFields] = ChatRequest) -> tuple[CompletionFields, int]:
    """The validated request and its max_tokens; RequestError (400 or 422) names the field."""
    try:
        raw = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(raw, dict):
        raise RequestError(400, "the body must be a JSON object", code="invalid_json")
    try:
        req = schema.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise RequestError(400, f"{field}: {err['msg']}{more}", param=field, code="invalid_value") from None
    if req.stream:
        raise RequestError(422, "stream: streaming is not supported by distillqa serve", param="stream", code="unsupported")
    if req.n != 1:
        raise RequestError(422, "n: distillqa serve answers with one choice per request (n=1)", param="n", code="unsupported")
    max_tokens = req.max_completion_tokens or req.max_tokens or min(default_max_tokens, max_tokens_limit)
    if max_tokens > max_tokens_limit:
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        raise RequestError(422, f"{param}: {max_tokens} is above this server's limit of {max_tokens_limit} "
                           "(distillqa serve --max-tokens)", param=param, code="invalid_value")
    return req, max_tokens


def make_server(model_name: str, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 1024,
                max_prompt_tokens: int = 8192, max_body_bytes: int = 1 << 20, read_timeout: float = 30.0,
                max_pending: int = 64, default_max_tokens: int = 256) -> ThreadingHTTPServer:
    tok, model = load_tokenizer(model_name), load_model(model_name)
    if torch.cuda.is_available():
        model.to("cuda")
    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    lock = threading.Lock()
    pending = threading.BoundedSemaphore(max_pending)
    stats = {"requests": 0, "errors": 0}

    def check_length(chars: int, param: str) -> None:
        if chars > max(max_prompt_tokens, 1) * 64:
            raise RequestError(400, f"{param}: the prompt is far longer than this server's limit of {max_prompt_tokens} "
                               "tokens", param=param, code="context_length_exceeded")

    def chat(body: bytes) -> dict:
        req, max_tokens = parse_request(body, max_tokens_limit, default_max_tokens)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        check_length(sum(len(m["content"]) for m in messages), "messages")
        try:
            ids = chat_prompt_ids(tok, messages)
        except Exception as e:  # a chat template that rejects these roles or their order
            raise RequestError(400, f"messages: the model's chat template cannot format them ({str(e)[:200]})",
                               param="messages") from None
        text, finish, usage = answer(req, ids, max_tokens, "messages")
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name, "usage": usage,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}

    def text_completion(body: bytes) -> dict:
        req, max_tokens = parse_request(body, max_tokens_limit, default_max_tokens, TextRequest)
        check_length(len(req.prompt), "prompt")
        ids = tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"]
        text, finish, usage = answer(req, ids, max_tokens, "prompt")
        return {"id": f"cmpl-{uuid.uuid4().hex[:12]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "usage": usage,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

    def answer(req: CompletionFields, ids: list[int], max_tokens: int, param: str) -> tuple[str, str, dict]:
        """(text, finish_reason, usage) of the prompt `ids`, generated in turn with every other request."""
        room = min(max_prompt_tokens, context - max_tokens)
        if len(ids) > room:
            raise RequestError(400, f"{param}: the prompt has {len(ids)} tokens; at most {max(room, 0)} fit with max_tokens "
                               f"{max_tokens} (model context {context}, server limit {max_prompt_tokens})",
                               param=param, code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                               top_p=1.0 if req.top_p is None else float(req.top_p))
        if not pending.acquire(blocking=False):
            raise RequestError(503, f"server busy: {max_pending} requests are already waiting; retry later",
                               kind="server_error", code="overloaded")
        try:
            with lock:
                stats["requests"] += 1
                text, finish, completion = generate_batch(model, tok, [ids], cfg, seed=req.seed or 0, details=True)[0]
        finally:
            pending.release()
        return text, finish, {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}

    posts = {"/v1/chat/completions": chat, "/v1/completions": text_completion}

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout  # socket timeout: a client that stops sending is dropped
        protocol_version = "HTTP/1.1"
        error_content_type = "application/json"

        def _send(self, code: int, obj: dict, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, e: RequestError, headers: dict | None = None) -> None:
            stats["errors"] += 1
            self._send(e.status, {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}, headers)

        def send_error(self, code, message=None, explain=None):  # the base class's own errors, as JSON too
            self.close_connection = True
            try:
                self._error(RequestError(code, message or self.responses.get(code, ("error",))[0]))
            except OSError:
                pass

        def _route(self) -> str | None:
            path = self.path.split("?", 1)[0].rstrip("/")
            return path if path == "/v1/models" or path in posts else None

        def do_GET(self):  # noqa: N802 - http.server's naming
            route = self._route()
            if route == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "distillqa"}]})
            elif route:
                self._error(RequestError(405, f"method GET is not allowed on {route}; use POST"), {"Allow": "POST"})
            else:
                self._error(RequestError(404, f"unknown path {self.path[:200]}", code="not_found"))

        def _not_allowed(self):
            route = self._route()
            self._drain()
            if not route:
                return self._error(RequestError(404, f"unknown path {self.path[:200]}", code="not_found"))
            allow = "GET" if route == "/v1/models" else "POST"
            self._error(RequestError(405, f"method {self.command} is not allowed on {route}; use {allow}"), {"Allow": allow})

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815
        do_HEAD = do_GET  # noqa: N815

        def _drain(self) -> None:
            """Read (and drop) a small body so that the connection stays usable; close it otherwise."""
            length = self.headers.get("Content-Length")
            if length and length.isdigit() and int(length) <= max_body_bytes:
                try:
                    self.rfile.read(int(length))
                    return
                except OSError:
                    pass
            if length or self.headers.get("Transfer-Encoding"):
                self.close_connection = True

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding"):
                self.close_connection = True
                raise RequestError(411, "Transfer-Encoding is not supported; send a Content-Length", code="length_required")
            length = self.headers.get("Content-Length")
            if length is None:
                self.close_connection = True
                raise RequestError(411, "a Content-Length header is required", code="length_required")
            if not length.strip().isdigit():
                self.close_connection = True
                raise RequestError(400, f"Content-Length must be a non-negative integer, not {length[:40]!r}",
                                   code="invalid_content_length")
            if int(length) > max_body_bytes:
                self.close_connection = True  # the body is never read
                raise RequestError(413, f"the body has {int(length)} bytes; this server accepts at most {max_body_bytes}",
                                   code="request_too_large")
            body = self.rfile.read(int(length))
            if len(body) < int(length):
                self.close_connection = True
                raise RequestError(400, "the body ended before Content-Length bytes", code="incomplete_body")
            return body

        def do_POST(self):  # noqa: N802
            try:
                route = self._route()
                if route not in posts:
                    self._drain()
                    if route:
                        raise RequestError(405, f"method POST is not allowed on {route}; use GET")
                    raise RequestError(404, f"unknown path {self.path[:200]}", code="not_found")
                self._send(200, posts[route](self._body()))
            except RequestError as e:
                self._error(e, {"Allow": "GET"} if e.status == 405 else None)
            except (TimeoutError, ConnectionError):
                self.close_connection = True  # the client stopped sending or went away
            except Exception as e:  # never drop a request without an answer
                log.exception("serve: request failed")
                self.close_connection = True
                self._error(RequestError(500, f"internal error: {type(e).__name__}", kind="server_error"))

        def log_message(self, *args):  # keep the terminal for progress, not access logs
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 128

    try:
        server = Server((host, port), Handler)
    except OSError as e:
        raise ConfigError(f"serve: cannot listen on {host}:{port}: {e.strerror or e}") from None
    server.stats = stats  # type: ignore[attr-defined]
    return server
