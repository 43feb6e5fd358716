"""The judge path end to end against a real OpenAI-compatible server on loopback (`distillqa serve`
with a tiny in-process model), plus the reply parsers on hand-written replies."""

import json
import threading

import pytest

from distillqa.clients import EndpointClient, EndpointError, ReplyCache, make_client
from distillqa.config import EvaluateConfig, JudgeConfig
from distillqa.errors import ConfigError
from distillqa.metrics.evaluate import evaluate_predictions
from distillqa.metrics.judge import parse_correctness_f1, parse_faithfulness, parse_relevance
from distillqa.serve import make_server


def test_parsers_accept_valid_json_and_refuse_the_rest():
    assert parse_faithfulness('Sure. {"claims": 4, "supported": 3} done') == 0.75
    for bad in ("no json", '{"claims": 0, "supported": 0}', '{"claims": 2, "supported": 3}', '{"claims": "2", "supported": 1}',
                '{"claims": 2.5, "supported": 1}', '{"claims": true, "supported": 1}'):
        assert parse_faithfulness(bad) is None, bad
    assert parse_correctness_f1('{"TP": 2, "FP": 1, "FN": 1}') == pytest.approx(2 / 3)
    assert parse_correctness_f1('{"TP": 0, "FP": 0, "FN": 0}') is None
    assert parse_relevance('{"question": "What is the AMF?", "noncommittal": 0}') == ("What is the AMF?", 0)
    assert parse_relevance('{"question": "", "noncommittal": 0}') is None
    assert parse_relevance('{"question": "q", "noncommittal": 2}') is None


@pytest.fixture()
def server(tiny_chat_model):
    srv = make_server(tiny_chat_model, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_judge_metrics_end_to_end_against_a_local_server(server, tmp_path, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-secret-value-123")
    rows = [{"id": f"q{i}", "question": f"Which node handles case {i}?", "context": "The AMF handles it.",
             "prediction": "The AMF", "references": ["the AMF"]} for i in range(3)]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    cfg = EvaluateConfig(metrics="judge", judge=JudgeConfig(url=url, model="tiny", api_key_env="JUDGE_KEY", parse_retries=1,
                                                           max_tokens=8, cache=str(tmp_path / "cache.sqlite")))
    summary = evaluate_predictions(tmp_path, cfg)
    # A random tiny model never writes valid JSON: every reply is re-asked once, then recorded as missing.
    assert server.stats["requests"] == 3 * 3 * 2
    for name in ("faithfulness", "answer_correctness", "answer_relevance"):
        assert summary["metrics"][name]["missing"] == 3 and summary["metrics"][name]["n"] == 0
    scores = [json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert all(s["faithfulness"] is None for s in scores)
    # A rerun is answered from the cache: no new request reaches the server.
    (tmp_path / "scores.jsonl").unlink()
    judge = make_client(cfg.judge)
    evaluate_predictions(tmp_path, cfg, judge=judge)
    assert server.stats["requests"] == 18 and judge.requests == 0 and judge.cache.hits == 18
    # The API key is sent, never written.
    for f in tmp_path.iterdir():
        assert b"sk-secret-value-123" not in f.read_bytes()


def test_server_speaks_the_openai_wire_format(server):
    import urllib.request

    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    models = json.loads(urllib.request.urlopen(base + "/models").read())
    assert models["data"][0]["object"] == "model"
    body = json.dumps({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}).encode()
    reply = json.loads(urllib.request.urlopen(urllib.request.Request(base + "/chat/completions", data=body)).read())
    assert reply["object"] == "chat.completion" and isinstance(reply["choices"][0]["message"]["content"], str)
    assert reply["usage"]["completion_tokens"] <= 3
    bad = urllib.request.Request(base + "/chat/completions", data=b'{"messages": 5}')
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad)
    assert err.value.code == 400


def test_unreachable_endpoint_fails_clearly(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    judge = EndpointClient(f"http://127.0.0.1:{port}/v1", "m", retries=1, timeout=2, cache=ReplyCache(tmp_path / "c.sqlite"))
    with pytest.raises(EndpointError, match=r"failed after 2 tries"):
        judge.complete_many(["hello"])


def test_judge_config_is_validated():
    with pytest.raises(ValueError, match="needs judge.model"):
        JudgeConfig(url="http://x/v1")
    with pytest.raises(ConfigError, match="NOPE_KEY is not set"):
        EndpointClient("http://127.0.0.1:9/v1", "m", api_key_env="NOPE_KEY", cache=None)
