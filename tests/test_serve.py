"""`distillqa serve` under bad requests (issue 11): every one gets an OpenAI-style JSON 4xx error
(nothing hangs, nothing goes unanswered), limits hold, and the server stays up and correct under
200 bad requests and 20 concurrent good ones on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from distillqa.serve import make_server

PATH = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "Which function terminates NAS signalling?"}]


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    srv = make_server(tiny_chat_model, port=0, max_tokens_limit=64, max_prompt_tokens=256, max_body_bytes=64 * 1024,
                      read_timeout=1.0, max_pending=32)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def raw(server, data: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one response: (status, headers, body). The socket has a deadline, so a
    server that hangs fails the test instead of stalling it."""
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body


def request(server, method: str = "POST", path: str = PATH, body: bytes | None = None, headers: dict | None = None,
            length: str | None = None) -> tuple[int, dict, bytes]:
    hdrs = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close", **(headers or {})}
    if body is not None and length is None:
        length = str(len(body))
    if length is not None:
        hdrs["Content-Length"] = length
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return raw(server, head.encode() + (body or b""))


def chat(**fields) -> bytes:
    return json.dumps({"model": "tiny", "messages": MSG, **fields}).encode()


def text(**fields) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "Which function terminates NAS signalling?", **fields}).encode()


# (name, request kwargs, expected status, text the error message or param must hold)
BAD = [
    ("max-tokens-negative", dict(body=chat(max_tokens=-5)), 400, "max_tokens"),
    ("max-tokens-zero", dict(body=chat(max_tokens=0)), 400, "max_tokens"),
    ("max-tokens-string", dict(body=chat(max_tokens="10")), 400, "max_tokens"),
    ("max-tokens-bool", dict(body=chat(max_tokens=True)), 400, "max_tokens"),
    ("max-tokens-over-limit", dict(body=chat(max_tokens=100000)), 422, "max_tokens"),
    ("max-completion-tokens-over-limit", dict(body=chat(max_completion_tokens=65)), 422, "max_completion_tokens"),
    ("top-p-string", dict(body=chat(top_p="abc")), 400, "top_p"),
    ("top-p-zero", dict(body=chat(top_p=0)), 400, "top_p"),
    ("temperature-too-high", dict(body=chat(temperature=5)), 400, "temperature"),
    ("temperature-string", dict(body=chat(temperature="0.5")), 400, "temperature"),
    ("seed-float", dict(body=chat(seed=1.5)), 400, "seed"),
    ("stream", dict(body=chat(stream=True)), 422, "stream"),
    ("n-two", dict(body=chat(n=2)), 422, "n"),
    ("messages-missing", dict(body=b'{"model": "tiny"}'), 400, "messages"),
    ("messages-not-list", dict(body=b'{"messages": 5}'), 400, "messages"),
    ("messages-empty", dict(body=json.dumps({"messages": []}).encode()), 400, "messages"),
    ("message-bad-role", dict(body=json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode()), 400, "role"),
    ("message-content-number", dict(body=json.dumps({"messages": [{"role": "user", "content": 5}]}).encode()), 400, "content"),
    ("message-not-object", dict(body=json.dumps({"messages": ["hi"]}).encode()), 400, "messages.0"),
    ("body-not-json", dict(body=b"{not json"), 400, "JSON"),
    ("body-not-utf8", dict(body=b'{"messages": "\xff"}'), 400, "JSON"),
    ("body-json-array", dict(body=b"[1, 2]"), 400, "object"),
    ("body-empty", dict(body=b""), 400, "JSON"),
    ("prompt-too-long", dict(body=chat(messages=[{"role": "user", "content": "AMF " * 2000}])), 400, "tokens"),
    ("prompt-far-too-long", dict(body=chat(messages=[{"role": "user", "content": "x" * 60000}])), 400, "limit"),
    ("content-length-negative", dict(body=b"", length="-1"), 400, "Content-Length"),
    ("content-length-not-number", dict(body=b"", length="abc"), 400, "Content-Length"),
    ("content-length-missing", dict(), 411, "Content-Length"),
    ("body-too-large", dict(length=str(10 * 1024 * 1024)), 413, "at most"),
    ("chunked", dict(headers={"Transfer-Encoding": "chunked"}, body=b"0\r\n\r\n"), 411, "Transfer-Encoding"),
    ("put", dict(method="PUT", body=chat()), 405, "PUT"),
    ("delete", dict(method="DELETE"), 405, "DELETE"),
    ("patch", dict(method="PATCH", body=chat()), 405, "PATCH"),
    ("get-on-completions", dict(method="GET"), 405, "GET"),
    ("post-on-models", dict(path="/v1/models", body=chat()), 405, "POST"),
    ("unknown-path", dict(path="/v2/whatever", body=chat()), 404, "unknown path"),
    ("unknown-method", dict(method="BREW", body=b""), 501, ""),
    ("completion-prompt-missing", dict(path=COMPLETIONS, body=b'{"model": "tiny"}'), 400, "prompt"),
    ("completion-prompt-tokens", dict(path=COMPLETIONS, body=text(prompt=[1, 2, 3])), 400, "prompt"),
    ("completion-prompt-empty", dict(path=COMPLETIONS, body=text(prompt="")), 400, "prompt"),
    ("completion-special-tokens-string", dict(path=COMPLETIONS, body=text(add_special_tokens="no")), 400, "add_special_tokens"),
    ("completion-prompt-too-long", dict(path=COMPLETIONS, body=text(prompt="AMF " * 2000)), 400, "tokens"),
    ("completion-max-tokens-over-limit", dict(path=COMPLETIONS, body=text(max_tokens=65)), 422, "max_tokens"),
    ("get-on-text-completions", dict(method="GET", path=COMPLETIONS), 405, "GET"),
]


@pytest.mark.parametrize("kwargs,status,text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_an_openai_style_json_error(server, kwargs, status, text):
    got, headers, body = request(server, **kwargs)
    assert got == status, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert text in error["message"] or text == (error["param"] or ""), error


def test_a_stalled_client_is_disconnected(server):
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=10) as s:
        s.sendall(f"POST {PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{\"mess".encode())
        assert s.recv(1024) == b""  # closed by the server after its read timeout, without a reply
    assert time.monotonic() - start < 8


def test_good_requests_and_finish_reason(server):
    status, _, body = request(server, body=chat(max_tokens=3, temperature=0))
    reply = json.loads(body)
    assert status == 200 and reply["object"] == "chat.completion"
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] <= 3
    if choice["finish_reason"] == "length":
        assert reply["usage"]["completion_tokens"] == 3
    # Text parts are accepted as content; the answer is the same as for the plain string.
    parts = chat(max_tokens=3, temperature=0, messages=[{"role": "user", "content": [{"type": "text", "text": MSG[0]["content"]}]}])
    assert json.loads(request(server, body=parts)[2])["choices"][0]["message"] == choice["message"]
    status, _, body = request(server, method="GET", path="/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["object"] == "model"


def test_text_completions_continue_the_prompt_as_given(server, tiny_chat_model):
    """/v1/completions answers the prompt text as it is: the chat's rendered prompt, sent with
    add_special_tokens false (as generate sends it), gets the chat route's answer."""
    from distillqa.clients import chat_prompt_ids
    from distillqa.models.registry import load_tokenizer

    reply = json.loads(request(server, body=chat(max_tokens=4, temperature=0))[2])
    tok = load_tokenizer(tiny_chat_model)
    rendered = tok.decode(chat_prompt_ids(tok, MSG))
    status, _, body = request(server, path=COMPLETIONS, body=text(prompt=rendered, add_special_tokens=False, max_tokens=4,
                                                                  temperature=0))
    completion = json.loads(body)
    assert status == 200 and completion["object"] == "text_completion"
    assert completion["choices"][0]["text"] == reply["choices"][0]["message"]["content"]
    assert completion["usage"] == reply["usage"] and completion["choices"][0]["finish_reason"] == reply["choices"][0]["finish_reason"]


def test_stays_up_after_200_bad_requests_and_under_20_concurrent_good_ones(server):
    start = time.monotonic()
    statuses = [request(server, **BAD[i % len(BAD)][1])[0] for i in range(200)]
    assert all(400 <= s < 600 and s != 500 for s in statuses)
    expected = json.loads(request(server, body=chat(max_tokens=4, temperature=0))[2])["choices"][0]["message"]["content"]
    before = server.stats["requests"]
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: request(server, body=chat(max_tokens=4, temperature=0)), range(20)))
    assert all(status == 200 for status, _, _ in replies)
    assert all(json.loads(body)["choices"][0]["message"]["content"] == expected for _, _, body in replies)  # greedy: identical
    assert server.stats["requests"] == before + 20
    assert threading.active_count() < 60  # handler threads end with their connections
    assert time.monotonic() - start < 120
