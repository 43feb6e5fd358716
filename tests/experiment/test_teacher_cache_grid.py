"""grid.teacher_cache on tiny in-process models: each teacher state cached once, read by its vanilla cells."""

from __future__ import annotations

import json

import pytest
import yaml

from distillqa.config import load_config
from distillqa.errors import ConfigError
from distillqa.experiment.config import ExperimentConfig
from distillqa.experiment.runner import run_experiment


def grid(tiny_model, out, *extra):
    fast = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "lr": 0.01}
    raw = {"preset": "quick", "grid": {"student": f"{tiny_model}@layers=every-other", "heal": {"steps": 0}, "teacher_cache": True,
                                       "teachers": [{"name": tiny_model, "algorithms": ["vanilla"]}],
                                       "student_states": ["base", "sft"]},
           "data": {"max_train_examples": 8, "max_eval_examples": 3}, "sft": {"train": fast}, "distill": {"train": fast},
           "generation": {"max_new_tokens": 4, "batch_size": 4}, "evaluate": {"metrics": "rouge_l"}, "output_dir": str(out)}
    return load_config(ExperimentConfig, None, [f"{k}={json.dumps(v)}" for k, v in raw.items()] + list(extra))


def test_each_teacher_state_is_cached_once_and_read_by_its_cells(tiny_model, tmp_path, monkeypatch):
    import distillqa.train.teacher_cache as tc

    built = []
    real = tc.run_teacher_cache
    monkeypatch.setattr(tc, "run_teacher_cache", lambda cfg: built.append(cfg.teacher.name) or real(cfg))
    exp = run_experiment(grid(tiny_model, tmp_path / "exp"), echo=lambda msg: None)
    assert built == [tiny_model, str(exp / "sft" / "teacher-plain")]  # base, then the SFT'd teacher: once each
    for state in ("base", "sft"):
        cache = exp / "teacher_cache" / f"teacher-plain-{state}"
        assert (cache / "manifest.json").is_file()
        for student_state in ("base", "sft"):
            cell = exp / "cells" / f"kd-vanilla_teacher-plain-{state}_student-{student_state}"
            assert yaml.safe_load((cell / "config.yaml").read_text())["kd"]["teacher_cache"] == str(cache)
            assert json.loads((cell / "run.json").read_text())["teacher_cache"]["method"] == "topk"
    built.clear()
    run_experiment(grid(tiny_model, tmp_path / "exp"), echo=lambda msg: None)  # a rerun finds everything done
    assert built == []
    settings = grid(tiny_model, tmp_path / "exp").distill.cache
    assert tc.cache_finished(cache, settings)
    for other in ({"k": 4}, {"tail_samples": 0}, {"seed": 1}, {"dtype": "float32"}):  # not this grid's cache: built again
        assert not tc.cache_finished(cache, settings.model_copy(update=other)), other


def test_grid_cache_refuses_a_temperature_or_divergence_it_cannot_serve(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="distill.kd.temperature=1"):
        grid(tiny_model, tmp_path / "exp", "distill.kd.temperature=2")
    with pytest.raises(ConfigError, match="forward KL only"):
        grid(tiny_model, tmp_path / "exp", "distill.cache.method=sampling", "distill.kd.divergence=tvd")
