"""`distillqa judge-calibrate` against a fake OpenAI-compatible judge served in-process, whose
behaviour is planted: it judges correctness by comparing answer and reference (so it agrees with
token F1), changes its mind on the answers marked 'flaky' when asked again, and never writes JSON
for faithfulness of the answers marked 'garbled'."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from distillqa.cli import app

from conftest import write_jsonl

runner = CliRunner()


def section(prompt: str, name: str) -> str:
    return re.search(rf"{name}: (.*?)(?:\n\n|$)", prompt, re.S).group(1).strip()


def planted_reply(prompt: str, seed: int) -> str:
    answer = section(prompt, "Answer")
    if "TP: statements" in prompt:  # answer_correctness
        right = answer == section(prompt, "Reference")
        tp = 2 if right else 0
        if "flaky" in answer and seed >= 100:  # a later repeat judges it differently
            tp += 1
        return json.dumps({"TP": tp, "FP": 0 if right else 2, "FN": 0 if right else 2})
    if "faithful" in prompt:
        return "I think it is fine." if "garbled" in answer else json.dumps({"claims": 2, "supported": 1})
    return json.dumps({"question": "Which function terminates NAS?", "noncommittal": 0})


class FakeJudge(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        reply = planted_reply(body["messages"][0]["content"], body.get("seed", 0))
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_calibration_finds_the_planted_behaviour(judge_url, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLQA_CACHE", str(tmp_path / "cache"))
    refs = [f"The AMF terminates NAS signalling in case {i}" for i in range(12)]
    preds = [refs[0], refs[1], refs[2], refs[3], refs[4] + " flaky", refs[5] + " flaky",
             "garbled words", "garbled text here", "the UPF forwards packets", "the SMF manages sessions", "no idea", "maybe the PCF"]
    rows = [{"id": f"q{i}", "question": "Which function terminates NAS?", "context": "The AMF terminates NAS signalling.",
             "prediction": p, "references": [r]} for i, (p, r) in enumerate(zip(preds, refs))]
    write_jsonl(tmp_path / "predictions.jsonl", rows)
    result = runner.invoke(app, ["judge-calibrate", str(tmp_path), "--out", str(tmp_path / "cal"), "--judge-url", judge_url,
                                 "--judge-model", "fake", "--against", "rouge_l,token_f1", "--set", "judge.parse_retries=1"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    correctness, faithfulness = report["metrics"]["answer_correctness"], report["metrics"]["faithfulness"]
    assert correctness["missing"] == 0 and correctness["first_reply_unparsed"] == 0
    assert correctness["self"][0]["repeat_rate"] == pytest.approx(10 / 12)  # the two flaky answers change
    assert correctness["against"]["token_f1"]["rho"] > 0.7 and correctness["against"]["token_f1"]["n"] == 12
    assert faithfulness["missing"] == pytest.approx(2 / 12) and faithfulness["first_reply_unparsed"] == pytest.approx(2 / 12)
    assert faithfulness["self"][0]["repeat_rate"] == 1.0 and faithfulness["self"][0]["n"] == 10
    assert faithfulness["against"]["rouge_l"]["rho"] is None  # a constant judge score has no rank correlation
    scores = [json.loads(line) for line in (tmp_path / "cal" / "scores.jsonl").read_text().splitlines()]
    assert scores[6]["faithfulness@0"] is None and scores[4]["answer_correctness@0"] != scores[4]["answer_correctness@1"]
    assert "same score when asked again 0.833" in result.output
