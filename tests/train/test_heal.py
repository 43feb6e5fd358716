"""Healing a pruned student on tiny models: it moves the student toward its parent, records the
layers it kept, resumes after kill -9 to the same weights, and reads text corpora."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from distillqa.config import DeriveConfig, load_config
from distillqa.data.prompts import collate_right
from distillqa.errors import DataError
from distillqa.models.derive import prune_layers
from distillqa.models.registry import load_model, load_tokenizer
from distillqa.train.kd import VanillaKD
from distillqa.train.losses import ForwardKL, LossTerms
from distillqa.train.heal import healing_corpus, run_heal


def heal_config(parent: str, out: Path, **heal) -> DeriveConfig:
    overrides = {"parent": parent, "layers": "every-other", "output_dir": str(out), "data.max_train_examples": 24,
                 "heal.steps": 6, "heal.batch_size": 4, "heal.lr": 0.01, "heal.max_length": 96,
                 "heal.checkpoint_every": 2, "heal.eval_examples": 2, **{f"heal.{k}": v for k, v in heal.items()}}
    return load_config(DeriveConfig, None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def healed(tiny_model, tmp_path_factory) -> Path:
    return run_heal(heal_config(tiny_model, tmp_path_factory.mktemp("heal") / "run"))


def test_healing_moves_the_student_toward_its_parent(healed):
    info = json.loads((healed / "run.json").read_text())
    assert info["status"] == "finished" and info["layers"] == [0, 2] and info["layer_choice"]["method"] == "explicit"
    assert info["zero_shot"]["questions"] == 2 and 0 <= info["zero_shot"]["rouge_l"] <= 1
    curve = [json.loads(line) for line in (healed / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in curve] == [5, 6]
    # The KL to the parent after healing is below the KL of the freshly pruned student.
    cfg = DeriveConfig.model_validate(yaml.safe_load((healed / "config.yaml").read_text()))
    tok = load_tokenizer(cfg.parent.name)
    batch = collate_right(healing_corpus(cfg.heal, cfg.data, cfg.prompt, tok)[:8], tok.pad_token_id)
    parent = load_model(cfg.parent.name, "fp32")
    kd = VanillaKD(parent, LossTerms(0.0, [(1.0, ForwardKL())]), chunk=None)
    with torch.no_grad():
        pruned = kd(prune_layers(load_model(cfg.parent.name, "fp32"), [0, 2]), batch)[1]["kd"]
        after = kd(load_model(str(healed), "fp32"), batch)[1]["kd"]
    assert after < 0.8 * pruned, (pruned, after)


def test_killed_healing_resumes_to_the_same_weights(healed, tiny_model, tmp_path):
    out = tmp_path / "killed"
    cfg = heal_config(tiny_model, out)
    script = ("import sys, yaml; from distillqa.config import DeriveConfig; from distillqa.train.heal import run_heal; "
              "cfg = DeriveConfig.model_validate(yaml.safe_load(open(sys.argv[1]))); "
              "run_heal(cfg, resume=(__import__('pathlib').Path(cfg.output_dir) / 'run.json').is_file())")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    cmd = [sys.executable, "-c", script, str(tmp_path / "cfg.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-00000002").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "healing finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    expected, got = final_weights(healed), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 6


def test_text_corpora_are_cut_into_pieces_and_bad_lines_named(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    text = tmp_path / "notes.txt"
    text.write_text("The gNB hosts RRC and PDCP. " * 40)
    cfg = heal_config(tiny_model, tmp_path / "run", corpus=str(text), max_length=32)
    pieces = healing_corpus(cfg.heal, cfg.data, cfg.prompt, tok)
    assert len(pieces) > 1 and all(len(p.input_ids) <= 32 and p.labels == p.input_ids for p in pieces)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    cfg = heal_config(tiny_model, tmp_path / "run", corpus=str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: field 'text': missing"):
        healing_corpus(cfg.heal, cfg.data, cfg.prompt, tok)


def test_parent_answers_corpus_heals_on_the_parents_own_answers(tiny_model, tmp_path):
    from distillqa.data import load_splits
    from distillqa.data.prompts import PromptBuilder
    from distillqa.generate import generate_batch
    from distillqa.config import GenerationConfig
    from distillqa.train.heal import corpus_hash

    cfg = heal_config(tiny_model, tmp_path / "run", corpus="parent-answers", answer_tokens=6, steps=2, eval_examples=0)
    run = run_heal(cfg)
    rows = [json.loads(line) for line in (run / "parent_answers.jsonl").read_text().splitlines()]
    examples = load_splits(cfg.data)[0]["train"]
    assert [r["id"] for r in rows] == [ex.id for ex in examples]
    # The answers are the parent's greedy continuations of the training prompts.
    tok, parent = load_tokenizer(tiny_model), load_model(tiny_model, "fp32")
    builder = PromptBuilder(tok, cfg.prompt.template, cfg.prompt.instruction, cfg.heal.max_length)
    first = builder.encode_prompt(examples[0], 6)
    assert generate_batch(parent, tok, [first], GenerationConfig(max_new_tokens=6))[0] == rows[0]["prediction"]
    # and the student healed on prompt + that answer, not on the reference answers.
    own = [builder.encode_train(ex, r["prediction"]) for ex, r in zip(examples, rows) if r["prediction"]]
    own = [type(e)(e.id, e.input_ids, e.input_ids) for e in own if e]
    info = json.loads((run / "run.json").read_text())
    assert info["corpus_sha256"] == corpus_hash(own) != corpus_hash(healing_corpus(cfg.heal, cfg.data, cfg.prompt, tok))
    assert info["status"] == "finished"
