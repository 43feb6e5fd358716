"""Extra held-out test sets of an experiment (issue 15): every row answers each set, each set gets
its own rows and hypothesis tables, sets can be added to an experiment that has run without
touching its results, and a set's definition cannot change under its name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from distillqa.config import load_config
from distillqa.errors import RunDirError
from distillqa.experiment.config import ExperimentConfig
from distillqa.experiment.runner import run_experiment

from conftest import write_jsonl
from test_mcq import MCQ


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLQA_CACHE", str(tmp_path / "cache"))


def small_grid(model: str, out: Path, held_out: list | None = None) -> ExperimentConfig:
    """Four rows: the teacher and the student (both base), the SFT-only baseline and one vanilla KD cell."""
    fast = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "lr": 0.01}
    raw = {"preset": "none", "grid": {"student": model, "teachers": [{"name": model, "algorithms": ["vanilla"]}],
                                      "teacher_states": ["base"], "student_states": ["base"]},
           "data": {"max_train_examples": 8, "max_eval_examples": 6}, "prompt": {"max_length": 128},
           "sft": {"train": fast}, "distill": {"train": fast}, "generation": {"max_new_tokens": 4, "batch_size": 4},
           "evaluate": {"metrics": "rouge_l,token_f1"}, "output_dir": str(out)}
    if held_out is not None:
        raw["held_out"] = held_out
    return load_config(ExperimentConfig, None, [f"{k}={json.dumps(v)}" for k, v in raw.items()])


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_held_out_sets_are_answered_by_every_row_with_their_own_tables(tiny_model, tmp_path):
    mcq = str(write_jsonl(tmp_path / "mcq.jsonl", MCQ))
    exp = run_experiment(small_grid(tiny_model, tmp_path / "exp"), echo=lambda msg: None)
    assert not (exp / "held_out").exists() and "Held-out" not in (exp / "report.md").read_text()
    main_rows = digests(exp / "rows")

    sets = [{"name": "mcq-ll", "data": {"source": mcq}, "mcq": {"method": "loglikelihood"}, "metrics": "acc,acc_norm"},
            {"name": "mcq-gen", "data": {"source": mcq}, "mcq": {"options": "lettered"}, "metrics": "choice_accuracy,unmapped_choice"}]
    run_experiment(small_grid(tiny_model, exp, sets), echo=lambda msg: None)  # added to the finished experiment
    assert digests(exp / "rows") == main_rows  # the main test split's answers and scores are untouched
    plan = json.loads((exp / "plan.json").read_text())
    for test_set, metrics in (("mcq-ll", {"acc", "acc_norm"}), ("mcq-gen", {"choice_accuracy", "unmapped_choice"})):
        for row in plan["rows"]:
            scores = [json.loads(line) for line in (exp / "held_out" / test_set / row["name"] / "scores.jsonl").read_text().splitlines()]
            assert [s["id"] for s in scores] == [q["id"] for q in MCQ]  # split all: every question
            assert metrics <= set(scores[0])
        hyps = json.loads((exp / "results" / "held_out" / test_set / "hypotheses.json").read_text())
        assert [h["name"] for h in hyps] == [h["name"] for h in plan["hypotheses"]]
        assert {r["metric"] for r in hyps[0]["results"]} == metrics
    report = (exp / "report.md").read_text()
    assert "## Held-out test set mcq-ll" in report and "## Held-out test set mcq-gen" in report

    changed = [{**sets[0], "metrics": "acc"}]
    with pytest.raises(RunDirError, match="held_out"):
        run_experiment(small_grid(tiny_model, exp, changed), echo=lambda msg: None)


def test_an_experiment_written_before_held_out_sets_existed_is_resumed(tiny_model, tmp_path):
    from distillqa.exp_dir import check_config
    from distillqa.experiment.runner import MAY_GROW

    cfg = small_grid(tiny_model, tmp_path / "exp")
    old = cfg.model_dump(mode="json")
    del old["held_out"]
    del old["evaluate"]["judge"]["cache"]  # any option added since: it takes its default
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "experiment.yaml").write_text(yaml.safe_dump(old))
    check_config(tmp_path / "exp", cfg, may_grow=MAY_GROW)  # not refused
