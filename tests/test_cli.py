"""The CLI reports user errors as one line (exit code 2), never a traceback."""

import json
import re

from typer.testing import CliRunner

from distillqa.cli import app

runner = CliRunner()


def test_bad_config_key_is_named():
    result = runner.invoke(app, ["sft", "--set", "train.lrate=1"])
    assert result.exit_code == 2 and "train.lrate: unknown key" in result.output and "Traceback" not in result.output


def test_evaluate_and_listings(tmp_path):
    (tmp_path / "predictions.jsonl").write_text(json.dumps({"id": "a", "prediction": "AMF", "references": ["AMF"]}) + "\n")
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--metrics", "exact_match,rouge_l"])
    assert result.exit_code == 0 and re.search(r"exact_match +1.0000 .* missing=0", result.output)
    assert (tmp_path / "summary.json").is_file()
    bad = runner.invoke(app, ["evaluate", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code == 2 and "no such predictions file" in bad.output
    assert "gemma3-270m" in runner.invoke(app, ["models"]).output
    assert "token_f1" in runner.invoke(app, ["metrics"]).output


def test_unknown_model_is_reported_cleanly(tmp_path):
    result = runner.invoke(app, ["generate", "--set", f"model.name={tmp_path}/none", "--set", f"output_dir={tmp_path}/g"])
    assert result.exit_code == 2 and "no such model directory" in result.output
