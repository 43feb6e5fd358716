"""The judge metrics through `distillqa serve` (the CLI, a separate process) on loopback with the
real smollm2-135m, scoring a hand-written set of answers: every reply the judge got is re-read
from the reply cache and the score is recomputed from it by the README's formulas."""

from __future__ import annotations

import json

import pytest

from distillqa.clients import EndpointClient, make_client
from distillqa.config import EvaluateConfig, JudgeConfig
from distillqa.metrics.evaluate import evaluate_predictions
from distillqa.metrics.judge import parse_correctness_f1, parse_faithfulness, parse_relevance

pytestmark = pytest.mark.real_models

ROWS = [
    {"id": "amf", "question": "Which function terminates NAS signalling?", "context": "The AMF terminates NAS signalling.",
     "prediction": "The AMF terminates NAS signalling.", "references": ["The AMF.", "The access and mobility management function."]},
    {"id": "upf", "question": "What does the UPF forward?", "context": "The UPF forwards user-plane packets.",
     "prediction": "It forwards user-plane packets.", "references": ["User-plane packets."]},
    {"id": "vague", "question": "What schedules uplink grants?", "context": "The gNB schedules uplink grants.",
     "prediction": "I am not sure.", "references": ["The gNB."]},
]


class RecordingJudge(EndpointClient):
    """The endpoint judge, recording each prompt's parsed result (None: every attempt unparseable)."""

    def ask(self, prompts, parse):
        results = super().ask(prompts, parse)
        self.record.setdefault(parse.__name__, []).extend(results)
        return results


def test_judge_metrics_score_hand_written_answers_through_distillqa_serve(served_smollm2, tmp_path):
    from sentence_transformers import SentenceTransformer

    from distillqa.metrics.settings import bundled_embedding_model

    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    jc = JudgeConfig(url=served_smollm2, model="smollm2-135m", parse_retries=1, max_tokens=48, cache=str(tmp_path / "c.sqlite"))
    base = make_client(jc)
    judge = RecordingJudge(jc.url, jc.model, cache=base.cache, parse_retries=1, max_tokens=48)
    judge.record = {}
    summary = evaluate_predictions(tmp_path, EvaluateConfig(metrics="judge", judge=jc), judge=judge)
    scores = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "scores.jsonl").read_text().splitlines()}
    rec = judge.record
    # one judged prompt per answer and metric; an unparseable reply is asked again once, then recorded missing
    assert [len(rec[p.__name__]) for p in (parse_faithfulness, parse_correctness_f1, parse_relevance)] == [3, 3, 3]
    unparsed = sum(v is None for vs in rec.values() for v in vs)
    # 9 first requests, then one retry per first reply that did not parse (at least those never parsed)
    assert 9 + unparsed <= judge.requests <= 18
    encoder = SentenceTransformer(bundled_embedding_model(), device="cpu")

    def cos(a, b):
        va, vb = encoder.encode([a, b], normalize_embeddings=True, convert_to_tensor=True)
        return float(va @ vb)

    for i, row in enumerate(ROWS):
        s = scores[row["id"]]
        f = rec["parse_faithfulness"][i]
        assert s["faithfulness"] == (None if f is None else pytest.approx(f))
        f1 = rec["parse_correctness_f1"][i]
        best = max(cos(row["prediction"], r) for r in row["references"])
        assert s["answer_correctness"] == (None if f1 is None else pytest.approx(0.75 * f1 + 0.25 * best, abs=1e-4))
        rel = rec["parse_relevance"][i]
        want = None if rel is None else (0.0 if rel[1] else cos(row["question"], rel[0]))
        assert s["answer_relevance"] == (None if want is None else pytest.approx(want, abs=1e-4))
    for name in ("faithfulness", "answer_correctness", "answer_relevance"):
        missing = sum(scores[r["id"]][name] is None for r in ROWS)
        assert summary["metrics"][name]["missing"] == missing and summary["metrics"][name]["n"] == 3 - missing
