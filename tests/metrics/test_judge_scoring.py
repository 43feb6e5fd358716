"""Judge metrics after a successful parse: the formulas that turn parsed replies into scores.

The judge is a scripted `ChatClient` (its replies are written here, keyed on what the prompt asks);
everything else is real: the prompts, the parse-retry loop, the parsers and the bundled
sentence encoder. Expected values are computed here from the formulas in the README with the
encoder called directly (sentence-transformers), not through distillqa's embedding helpers.
"""

from __future__ import annotations

import pytest

from distillqa.clients import ChatClient
from distillqa.metrics.judge import (answer_correctness, answer_relevance, faithfulness, parse_correctness_f1,
                                     parse_faithfulness, parse_relevance)
from distillqa.metrics.settings import EvalSettings, bundled_embedding_model


class ScriptedJudge(ChatClient):
    """Replies chosen by `script(prompt, attempt)`; counts the requests it receives."""

    def __init__(self, script, parse_retries: int = 2):
        super().__init__("scripted", cache=None, parse_retries=parse_retries)
        self.script, self.seen = script, []

    def _complete(self, prompts, attempt):
        self.seen += [(p, attempt) for p in prompts]
        return [self.script(p, attempt) for p in prompts]


@pytest.fixture(scope="module")
def encoder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(bundled_embedding_model(), device="cpu")


def cos(encoder, a: str, b: str) -> float:
    va, vb = encoder.encode([a, b], normalize_embeddings=True, convert_to_tensor=True)
    return float(va @ vb)


def section(prompt: str, name: str) -> str:
    """The text of one `Name: ...` section of a judge prompt."""
    return prompt.split(f"\n\n{name}: ", 1)[1].split("\n\n", 1)[0]


def test_answer_correctness_is_three_quarters_f1_plus_a_quarter_cosine_against_the_closest_reference(encoder):
    pred = "The AMF handles registration and mobility."
    refs = ["Bananas are yellow fruit.", "The access and mobility function (AMF) handles registration.", "It is blue."]
    # The judge classifies statements differently for each reference, so using the wrong one shows.
    counts = {refs[0]: (0, 2, 1), refs[1]: (2, 1, 1), refs[2]: (0, 2, 3)}

    def script(prompt, attempt):
        tp, fp, fn = counts[section(prompt, "Reference")]
        return f'Here you go: {{"TP": {tp}, "FP": {fp}, "FN": {fn}}}'

    judge = ScriptedJudge(script)
    rows = [{"id": "a", "question": "Which function handles registration?", "prediction": pred, "references": refs},
            {"id": "b", "question": "Which colour?", "prediction": "It is blue.", "references": ["It is blue."]}]
    got = answer_correctness(rows, EvalSettings(judge=judge))
    sims = [cos(encoder, pred, r) for r in refs]
    best = max(range(3), key=sims.__getitem__)
    assert best == 1  # the AMF reference is the one closest in meaning
    f1 = 2 / (2 + 0.5 * (1 + 1))  # TP / (TP + (FP + FN) / 2)
    assert got[0] == pytest.approx(0.75 * f1 + 0.25 * sims[1], abs=1e-5)
    f1_b = 0 / (0 + 0.5 * (2 + 3))
    assert got[1] == pytest.approx(0.75 * f1_b + 0.25 * 1.0, abs=1e-5)
    assert len(judge.seen) == 2  # one judged reference per answer: the closest one


def test_answer_relevance_is_the_cosine_of_the_inferred_question_and_zero_when_noncommittal(encoder):
    rows = [{"id": "a", "question": "Which function handles registration?", "context": "The AMF handles registration.",
             "prediction": "The AMF handles it.", "references": ["AMF"]},
            {"id": "b", "question": "What does the UPF forward?", "context": "The UPF forwards packets.",
             "prediction": "I am not sure, it depends.", "references": ["packets"]}]
    inferred = {"The AMF handles it.": ("What network function takes care of registration?", 0),
                "I am not sure, it depends.": ("What does the UPF forward?", 1)}

    def script(prompt, attempt):
        q, flag = inferred[section(prompt, "Answer")]
        return f'{{"question": "{q}", "noncommittal": {flag}}}'

    got = answer_relevance(rows, EvalSettings(judge=ScriptedJudge(script)))
    want = cos(encoder, rows[0]["question"], inferred[rows[0]["prediction"]][0])
    assert 0.3 < want < 0.99 and got[0] == pytest.approx(want, abs=1e-5)
    # The inferred question equals the real one (cosine 1), but the answer is noncommittal: 0.
    assert got[1] == 0.0


def test_a_retry_that_succeeds_is_scored_and_a_reply_never_parsed_is_missing(encoder):
    # Question 0: garbage first, valid JSON on the sampled retry. Question 1: never valid.
    def script(prompt, attempt):
        if "case 0" in prompt and attempt == 1:
            return '{"claims": 4, "supported": 3}'
        return "I think the answer is faithful."

    judge = ScriptedJudge(script, parse_retries=2)
    rows = [{"id": str(i), "question": f"Question about case {i}?", "context": "ctx", "prediction": "p", "references": ["r"]}
            for i in range(2)]
    got = faithfulness(rows, EvalSettings(judge=judge))
    assert got == [0.75, None]
    attempts = sorted((("case 0" in p), a) for p, a in judge.seen)
    # question 0 asked at attempts 0 and 1 only; question 1 at 0, 1, 2, then given up
    assert attempts == [(False, 0), (False, 1), (False, 2), (True, 0), (True, 1)]


def test_replies_with_braces_inside_strings_and_nested_objects_parse():
    assert parse_relevance('Sure: {"question": "What does {AMF} stand for?", "noncommittal": 0}') == (
        "What does {AMF} stand for?", 0)
    assert parse_faithfulness('{"claims": 3, "supported": 2, "notes": {"claim 1": "ok"}} trailing') == pytest.approx(2 / 3)
    assert parse_correctness_f1('Reasoning: "}" is not JSON. {"TP": 1, "FP": 0, "FN": 1, "why": "a {b} c"}') == pytest.approx(
        1 / 1.5)
