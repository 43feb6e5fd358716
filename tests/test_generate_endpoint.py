"""`generate` through an OpenAI-compatible completions endpoint (issue 14 part 4): `distillqa serve`
on loopback, in this process, answering exactly as in-process generation does; a killed run
resumes asking only what it lacks; an unreachable endpoint or a model it does not serve is one
clear error line, before anything is written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from distillqa.cli import app
from distillqa.clients import CompletionsClient
from distillqa.config import GenerateConfig, load_config
from distillqa.generate import run_generate

from conftest import serving


@pytest.fixture(scope="module", params=["chat", "plain"])
def served(request, tiny_chat_model, tiny_model):
    """(model name, base URL): a chat-template model and a plain one, each served."""
    name = tiny_chat_model if request.param == "chat" else tiny_model
    with serving(name) as url:
        yield name, url


def generate_cfg(model: str, out, *extra: str) -> GenerateConfig:
    return load_config(GenerateConfig, None, [f"model.name={model}", f"output_dir={out}", "data.source=bundled:telecom-sample",
                                              "split=all", "data.max_eval_examples=10", "generation.max_new_tokens=6",
                                              "generation.batch_size=4", "prompt.max_length=160", *extra])


def rows(predictions) -> list[dict]:
    return [json.loads(x) for x in predictions.read_text().splitlines()]


def test_endpoint_answers_equal_in_process_answers(served, tmp_path):
    model, url = served
    here = rows(run_generate(generate_cfg(model, tmp_path / "here")))
    there = rows(run_generate(generate_cfg(model, tmp_path / "there", f"generation.endpoint.url={url}",
                                           "generation.endpoint.concurrency=3")))
    assert there == here  # ids, prompts as the model saw them, answers, references: the same file
    assert any(r["prediction"] for r in here)


def test_a_killed_endpoint_run_resumes_asking_only_the_rest(served, tmp_path, monkeypatch):
    model, url = served
    real = CompletionsClient.complete_many
    asked = []

    def die_in_second_batch(self, prompts, attempt=0):
        asked.append(len(prompts))
        if len(asked) == 2:
            raise KeyboardInterrupt
        return real(self, prompts, attempt)

    cfg = generate_cfg(model, tmp_path / "out", f"generation.endpoint.url={url}")
    monkeypatch.setattr(CompletionsClient, "complete_many", die_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_generate(cfg)
    asked.clear()
    monkeypatch.setattr(CompletionsClient, "complete_many", lambda self, prompts, attempt=0: asked.append(len(prompts))
                        or real(self, prompts, attempt))
    resumed = rows(run_generate(cfg))
    assert asked == [4, 2]  # batches 2 and 3 of 4 + 4 + 2 questions
    assert resumed == rows(run_generate(generate_cfg(model, tmp_path / "whole", f"generation.endpoint.url={url}")))


@pytest.mark.parametrize("endpoint, expect", [
    (lambda url: ["generation.endpoint.url=http://127.0.0.1:9/v1"], ["generation.endpoint", "cannot be reached"]),
    (lambda url: [f"generation.endpoint.url={url}", "generation.endpoint.model=gpt-nope"],
     ["serves [", "not 'gpt-nope'", "generation.endpoint.model"]),
    (lambda url: [f"generation.endpoint.url={url.replace('/v1', '/v2')}"], ["generation.endpoint", "HTTP 404"]),
    (lambda url: ["generation.endpoint.url=localhost:8000"], ["generation.endpoint.url", "not an http(s) URL"]),
    (lambda url: [f"generation.endpoint.url={url}", "mcq.method=loglikelihood"], ["mcq.method=loglikelihood", "in-process"]),
], ids=["unreachable", "wrong-model", "not-an-api", "bad-url", "loglikelihood"])
def test_bad_endpoint_is_one_error_line_and_writes_nothing(tiny_chat_model, tmp_path, endpoint, expect):
    args = ["generate", "--set", f"model.name={tiny_chat_model}", "--set", "data.source=bundled:telecom-sample",
            "--set", f"output_dir={tmp_path / 'out'}"]
    with serving(tiny_chat_model) as url:
        for item in endpoint(url):
            args += ["--set", item]
        result = CliRunner().invoke(app, args)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert all(part in errors[0] for part in expect), errors[0]
    assert not (tmp_path / "out").exists()
