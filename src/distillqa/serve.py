"""`distillqa serve`: an OpenAI-compatible chat-completions endpoint for any model name
(registry model, run directory, local path), on the standard library's HTTP server.

Endpoints: GET /v1/models, POST /v1/chat/completions (messages, max_tokens, temperature,
top_p, seed). Requests are answered one at a time (the model is not thread-safe); it is meant
for local use: judges, demos, trying a distilled student.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from distillqa.config import GenerationConfig
from distillqa.generate import generate_batch
from distillqa.metrics.judge import chat_prompt_ids
from distillqa.models.registry import load_model, load_tokenizer


def make_server(model_name: str, host: str = "127.0.0.1", port: int = 8000, max_tokens_limit: int = 1024) -> ThreadingHTTPServer:
    tok, model = load_tokenizer(model_name), load_model(model_name)
    if torch.cuda.is_available():
        model.to("cuda")
    lock = threading.Lock()
    stats = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, code: int, message: str) -> None:
            self._send(code, {"error": {"message": message, "type": "invalid_request_error"}})

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "distillqa"}]})
            else:
                self._error(404, f"unknown path {self.path}")

        def do_POST(self):  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._error(404, f"unknown path {self.path}")
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                messages = req["messages"]
                if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                    raise ValueError("messages must be a list of {role, content} objects")
                max_tokens = min(int(req.get("max_tokens") or 256), max_tokens_limit)
                temperature = float(req.get("temperature", 1.0) or 0.0)
            except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
                return self._error(400, f"bad request: {e}")
            ids = chat_prompt_ids(tok, messages)
            cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                                   top_p=float(req.get("top_p", 1.0)))
            with lock:
                stats["requests"] += 1
                text = generate_batch(model, tok, [ids], cfg, seed=int(req.get("seed") or 0))[0]
            completion = len(tok(text, add_special_tokens=False)["input_ids"])
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion},
            })

        def log_message(self, *args):  # keep the terminal for progress, not access logs
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.stats = stats  # type: ignore[attr-defined]
    return server
