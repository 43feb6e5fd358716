import json

import pytest

from distillqa.config import EvaluateConfig
from distillqa.errors import ConfigError, DataError
from distillqa.metrics import METRICS, resolve_metrics
from distillqa.metrics.evaluate import evaluate_predictions
from distillqa.metrics.registry import DEFAULT_METRICS, OFFLINE_METRICS
from distillqa.metrics.settings import EvalSettings
from distillqa.metrics.summary import bootstrap_ci

SETTINGS = EvalSettings()
NGRAM = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_1", "rouge_2", "rouge_l"]
EMBEDDING = ["cosine", "bertscore_p", "bertscore_r", "bertscore_f1"]


def score(name, pred, refs):
    return METRICS[name].score([{"prediction": pred, "references": refs}], SETTINGS)[0]


def test_registry_declares_the_14_defaults_in_three_families():
    assert len(DEFAULT_METRICS) == 14 and len(OFFLINE_METRICS) == 11
    families = {m: METRICS[m].family for m in DEFAULT_METRICS}
    assert sorted(families.values()).count("ngram") == 7 and list(families.values()).count("embedding") == 4
    assert list(families.values()).count("judge") == 3
    assert [m.name for m in resolve_metrics("offline")] == OFFLINE_METRICS


def test_squad_normalisation_and_best_reference():
    assert score("exact_match", "The  AMF.", ["amf"]) == 1.0
    assert score("exact_match", "SMF", ["AMF", "smf"]) == 1.0
    assert score("token_f1", "the access and mobility function", ["access mobility function"]) == pytest.approx(2 * 0.75 / 1.75)
    assert score("token_f1", "UPF", ["AMF"]) == 0.0


def test_hand_worked_rouge():
    # target: the quick brown fox jumps over the lazy dog (9 tokens); prediction: 8 tokens.
    pred, ref = "The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog"
    p, r = 6 / 8, 6 / 9  # the x2, quick, brown, dog, jump(s)
    assert score("rouge_1", pred, [ref]) == pytest.approx(2 * p * r / (p + r))
    p, r = 5 / 8, 5 / 9  # LCS: the quick brown jumps the
    assert score("rouge_l", pred, [ref]) == pytest.approx(2 * p * r / (p + r))
    p, r = 3 / 7, 3 / 8  # bigrams: the quick, quick brown, + none ... "the quick", "quick brown", "jump the"? no: see below
    assert score("rouge_2", pred, [ref]) == pytest.approx(2 * (2 / 7) * (2 / 8) / (2 / 7 + 2 / 8))


def test_hand_worked_bleu():
    pred, ref = "the cat sat on the mat", "the cat is on the mat"
    assert score("bleu_1", pred, [ref]) == pytest.approx(5 / 6)  # 5 of 6 unigrams match, equal lengths
    assert score("bleu_2", pred, [ref]) == pytest.approx((5 / 6 * 3 / 5) ** 0.5)  # 3 of 5 bigrams


@pytest.mark.parametrize("name", NGRAM + EMBEDDING)
def test_identical_strings_score_the_maximum(name):
    assert score(name, "The AMF terminates NAS signalling.", ["The AMF terminates NAS signalling."]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", NGRAM)
def test_disjoint_strings_score_the_minimum(name):
    assert score(name, "alpha beta gamma", ["delta epsilon zeta"]) == 0.0


def test_embedding_metrics_rank_related_above_unrelated():
    ref = ["The user plane function forwards packets."]
    for name in EMBEDDING:
        related = score(name, "The UPF forwards user packets.", ref)
        unrelated = score(name, "Bananas are rich in potassium.", ref)
        assert related > unrelated + 0.05, name


def test_bad_rows_get_defined_scores_for_all_offline_metrics(tmp_path):
    rows = [
        {"id": "empty", "prediction": "  ", "references": ["AMF"]},
        {"id": "long", "prediction": "word " * 10_000, "references": ["a word"]},
        {"id": "cjk", "prediction": "用户面功能转发数据包", "references": ["用户面功能转发数据包"]},
        {"id": "cyrillic", "prediction": "сеть доступа", "references": ["сеть доступа"]},
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    summary = evaluate_predictions(path, EvaluateConfig(metrics="offline"))
    assert summary["empty_predictions"] == 1 and set(summary["metrics"]) == set(OFFLINE_METRICS)
    table = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()}
    for name in OFFLINE_METRICS:
        m = METRICS[name]
        assert table["empty"][name] == m.low
        assert all(m.low - 1e-6 <= table[i][name] <= m.high + 1e-6 for i in table), name
    for name in ("rouge_l", "rouge_1", "bleu_1", "cosine"):  # other scripts are scored, not dropped
        assert table["cyrillic"][name] == pytest.approx(1.0, abs=1e-4), name
    assert table["cjk"]["cosine"] == pytest.approx(1.0, abs=1e-4)


def test_unknown_metric_is_named():
    with pytest.raises(ConfigError, match="unknown metric 'rouge_z'"):
        resolve_metrics("rouge_l,rouge_z")


def test_judge_metrics_without_a_judge_say_how_to_configure_one(tmp_path):
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"id": "a", "prediction": "x", "references": ["y"]}) + "\n")
    with pytest.raises(ConfigError, match="--judge-url"):
        evaluate_predictions(tmp_path, EvaluateConfig(metrics="faithfulness"))


def test_bootstrap_ci_brackets_the_mean():
    lo, hi = bootstrap_ci([0.0, 1.0] * 50)
    assert lo < 0.5 < hi and hi - lo < 0.25


def write_preds(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_writes_per_example_scores_and_adds_metrics_later(tmp_path):
    rows = [{"id": "a", "prediction": "the AMF", "references": ["AMF"]}, {"id": "b", "prediction": "", "references": ["SMF"]}]
    path = write_preds(tmp_path / "predictions.jsonl", rows)
    summary = evaluate_predictions(path, EvaluateConfig(metrics="exact_match"))
    assert summary["metrics"]["exact_match"]["mean"] == 0.5 and summary["empty_predictions"] == 1
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert scores == [{"id": "a", "exact_match": 1.0}, {"id": "b", "exact_match": 0.0}]
    # Adding a metric keeps the existing column untouched (it is not recomputed).
    (tmp_path / "scores.jsonl").write_text('{"id": "a", "exact_match": 0.25}\n{"id": "b", "exact_match": 0.0}\n')
    summary = evaluate_predictions(tmp_path, EvaluateConfig(metrics="exact_match,token_f1"))
    assert summary["metrics"]["exact_match"]["mean"] == 0.125 and "token_f1" in summary["metrics"]


@pytest.mark.parametrize("rows, match", [
    ([{"id": "a", "prediction": "x"}], r"line 1 \(id 'a'\): field 'references'"),
    ([{"id": "a", "prediction": "x", "references": [""]}], r"field 'references'"),
    ([{"id": "a", "prediction": "x", "references": ["y"]}] * 2, r"line 2 \(id 'a'\): field 'id': duplicate"),
    ([{"id": "a", "prediction": None, "references": ["y"]}], r"field 'prediction'"),
])
def test_malformed_predictions_name_the_line(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        evaluate_predictions(write_preds(tmp_path / "predictions.jsonl", rows))


def test_meteor_when_wordnet_is_installed():
    from pathlib import Path

    if not Path("/usr/share/wordnet/data.noun").is_file():
        with pytest.raises(ConfigError, match="wordnet-base"):
            score("meteor", "the cat sat", ["the cat sat"])
        return
    assert score("meteor", "the cat sat on the mat", ["the cat sat on the mat"]) > 0.99
    assert score("meteor", "the cat sat on the mat", ["a feline rested on the rug"]) < 0.6


def test_scores_are_reused_only_when_scored_the_same_way(tmp_path):
    """A metric scored with other code or settings (its key in summary.json differs) is scored again;
    the others are reused; an embedding model change reaches only the embedding metrics' keys."""
    from distillqa.metrics.evaluate import is_scored, scoring_key

    rows = [{"id": "a", "prediction": "the AMF", "references": ["the AMF"]},
            {"id": "b", "prediction": "the SMF", "references": ["the UPF"]}]
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvaluateConfig(metrics="rouge_l,exact_match")
    truth = evaluate_predictions(tmp_path, cfg)["metrics"]
    scores, summary = tmp_path / "scores.jsonl", tmp_path / "summary.json"
    scores.write_text("".join(json.dumps({"id": r["id"], "rouge_l": 0.25, "exact_match": 0.25}) + "\n" for r in rows))
    stale = json.loads(summary.read_text())
    stale["scored_with"]["rouge_l"] = "an older rule"
    summary.write_text(json.dumps(stale))
    metrics = resolve_metrics(cfg.metrics)
    assert not is_scored(tmp_path, metrics, cfg)
    again = evaluate_predictions(tmp_path, cfg)["metrics"]
    assert again["rouge_l"]["mean"] == truth["rouge_l"]["mean"] == pytest.approx(0.75)  # scored again
    assert again["exact_match"]["mean"] == 0.25 and truth["exact_match"]["mean"] == 0.5  # the planted scores, reused
    assert is_scored(tmp_path, metrics, cfg)
    other = EvaluateConfig(metrics="rouge_l,cosine", embedding_model="/elsewhere")
    assert scoring_key(METRICS["rouge_l"], other) == scoring_key(METRICS["rouge_l"], cfg)
    assert scoring_key(METRICS["cosine"], other) != scoring_key(METRICS["cosine"], EvaluateConfig())
