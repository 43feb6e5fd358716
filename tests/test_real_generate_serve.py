"""`generate` through `distillqa serve` (the CLI, a separate process) on loopback with the real
smollm2-135m: the greedy answers, and the whole predictions file, equal in-process generation's."""

from __future__ import annotations

import json

import pytest

from distillqa.config import GenerateConfig, load_config
from distillqa.generate import run_generate

pytestmark = pytest.mark.real_models


def test_greedy_answers_through_distillqa_serve_equal_in_process_ones(served_smollm2, tmp_path):
    def answers(out, *extra):
        cfg = load_config(GenerateConfig, None, ["model.name=smollm2-135m", f"output_dir={out}", "split=all",
                                                 "data.max_eval_examples=4", "generation.max_new_tokens=10",
                                                 "generation.batch_size=2", *extra])
        return [json.loads(x) for x in run_generate(cfg).read_text().splitlines()]

    here = answers(tmp_path / "here")
    there = answers(tmp_path / "there", f"generation.endpoint.url={served_smollm2}", "generation.endpoint.model=smollm2-135m",
                    "generation.endpoint.timeout=600")  # serve answers one request at a time; a busy CPU is slow
    assert there == here
    assert sum(bool(r["prediction"]) for r in here) >= 3
