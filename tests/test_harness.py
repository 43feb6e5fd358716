"""lm-evaluation-harness (issue 15): a distillqa MCQ file exported as an lm-eval task and run
offline through `distillqa harness run` on a tiny local model gives, question by question, the
log-likelihoods and accuracy distillqa's own scoring gives (same plain prompt, same choices)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distillqa.cli import app
from distillqa.config import EvaluateConfig, GenerateConfig, load_config
from distillqa.generate import run_generate
from distillqa.metrics.evaluate import evaluate_predictions

from conftest import write_jsonl
from test_mcq import MCQ

pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[harness]')")
runner = CliRunner()


@pytest.mark.parametrize("options", ["hidden", "lettered"])
def test_exported_task_in_lm_eval_matches_distillqa_loglikelihood(tiny_model, tmp_path, monkeypatch, options):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    data = str(write_jsonl(tmp_path / "mcq.jsonl", MCQ))
    exported = runner.invoke(app, ["harness", "export", data, str(tmp_path / "task"), "--name", "tiny_mcq", "--options", options])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "task" / "tiny_mcq.yaml").is_file() and "8 questions" in exported.output

    ran = runner.invoke(app, ["harness", "run", tiny_model, "--tasks", "tiny_mcq", "--include-path", str(tmp_path / "task"),
                              "--out", str(tmp_path / "lm-eval"), "--batch-size", "4"])
    assert ran.exit_code == 0, ran.output + repr(ran.exception)
    results = json.loads((tmp_path / "lm-eval" / "results.json").read_text())["results"]["tiny_mcq"]
    samples = {s["doc"]["id"]: s for s in map(json.loads, (tmp_path / "lm-eval" / "samples_tiny_mcq.jsonl").read_text().splitlines())}

    ours = run_generate(load_config(GenerateConfig, None, [
        f"model.name={tiny_model}", f"data.source={data}", "split=all", f"output_dir={tmp_path}/ours", "prompt.template=plain",
        "prompt.instruction=", "mcq.method=loglikelihood", f"mcq.options={options}"]))
    summary = evaluate_predictions(ours, EvaluateConfig(metrics="acc,acc_norm"))
    for row in map(json.loads, ours.read_text().splitlines()):
        theirs = [float(r[0][0]) for r in samples[row["id"]]["resps"]]  # (log-likelihood, is greedy) per choice
        assert row["choice_logprobs"] == pytest.approx(theirs, abs=1e-3)
    assert results["acc,none"] == pytest.approx(summary["metrics"]["acc"]["mean"])
    assert results["acc_norm,none"] == pytest.approx(summary["metrics"]["acc_norm"]["mean"])


def test_harness_run_without_the_task_is_one_line_error(tiny_model, tmp_path):
    result = runner.invoke(app, ["harness", "run", tiny_model, "--tasks", "no_such_task_15", "--include-path", str(tmp_path),
                                 "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no_such_task_15" in result.stderr and not (tmp_path / "o").exists()
