import json

import pytest

from distillqa.errors import ConfigError, DataError
from distillqa.metrics import METRICS, resolve_metrics
from distillqa.metrics.evaluate import evaluate_predictions
from distillqa.metrics.summary import bootstrap_ci


def score(name, pred, refs):
    return METRICS[name].score([pred], [refs])[0]


def test_squad_normalisation_and_best_reference():
    assert score("exact_match", "The  AMF.", ["amf"]) == 1.0
    assert score("exact_match", "SMF", ["AMF", "smf"]) == 1.0
    assert score("token_f1", "the access and mobility function", ["access mobility function"]) == pytest.approx(2 * 0.75 / 1.75)
    assert score("token_f1", "UPF", ["AMF"]) == 0.0


def test_ngram_metrics_match_their_libraries():
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU

    pred, ref = "the user plane function routes packets", "user plane functions route the packets"
    expected = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert score("rouge_l", pred, [ref]) == pytest.approx(expected)
    assert score("rouge_l", pred, [pred]) == 1.0
    assert score("bleu", pred, [ref]) == pytest.approx(BLEU(effective_order=True).sentence_score(pred, [ref]).score / 100)
    assert score("bleu", pred, [pred]) == pytest.approx(1.0)


@pytest.mark.parametrize("name", list(METRICS))
def test_empty_prediction_scores_a_defined_zero(name):
    assert METRICS[name].score(["", "   ", "AMF"], [["AMF"], ["AMF"], ["AMF"]])[:2] == [0.0, 0.0]


def test_unknown_metric_is_named():
    with pytest.raises(ConfigError, match="unknown metric 'rouge_z'"):
        resolve_metrics("rouge_l,rouge_z")


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25


def write_preds(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_writes_per_example_scores_and_adds_metrics_later(tmp_path):
    rows = [{"id": "a", "prediction": "the AMF", "references": ["AMF"]}, {"id": "b", "prediction": "", "references": ["SMF"]}]
    path = write_preds(tmp_path / "predictions.jsonl", rows)
    summary = evaluate_predictions(path, "exact_match")
    assert summary["metrics"]["exact_match"]["mean"] == 0.5 and summary["empty_predictions"] == 1
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert scores == [{"id": "a", "exact_match": 1.0}, {"id": "b", "exact_match": 0.0}]
    # Adding a metric keeps the existing column untouched (it is not recomputed).
    (tmp_path / "scores.jsonl").write_text('{"id": "a", "exact_match": 0.25}\n{"id": "b", "exact_match": 0.0}\n')
    summary = evaluate_predictions(tmp_path, "exact_match,token_f1")
    assert summary["metrics"]["exact_match"]["mean"] == 0.125 and "token_f1" in summary["metrics"]


@pytest.mark.parametrize("rows, match", [
    ([{"id": "a", "prediction": "x"}], r"line 1 \(id 'a'\): field 'references'"),
    ([{"id": "a", "prediction": "x", "references": ["y"]}] * 2, r"line 2 \(id 'a'\): field 'id': duplicate"),
    ([{"id": "a", "prediction": None, "references": ["y"]}], r"field 'prediction'"),
])
def test_malformed_predictions_name_the_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        evaluate_predictions(write_preds(tmp_path / "predictions.jsonl", rows))
