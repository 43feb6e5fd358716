"""Resume between checkpoints: a run killed after a step that is not a checkpoint continues from
the newest checkpoint, logs every step once, and ends with an uninterrupted run's weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from distillqa.config import SFTConfig, load_config
from distillqa.errors import RunDirError
from distillqa.train.run_dir import RunDir
from distillqa.train.sft import run_sft


class Killed(Exception):
    pass


def cfg_for(model, out, grad_accum):
    return load_config(SFTConfig, None, [
        f"model.name={model}", f"output_dir={out}", "data.max_train_examples=16", "train.batch_size=2",
        f"train.grad_accum={grad_accum}", "train.lr=5e-3", "train.log_every=1", "train.checkpoint_every=2",
        "train.keep_checkpoints=1", "train.max_steps=5", "lora.r=4", "lora.dropout=0.1", "prompt.max_length=160"])


def log_rows(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_kill_between_checkpoints_resumes_from_the_last_one(tiny_model, tmp_path, monkeypatch, grad_accum):
    whole = run_sft(cfg_for(tiny_model, tmp_path / "whole", grad_accum))

    real_log = RunDir.log

    def log_then_die(self, row):
        real_log(self, row)
        if row["step"] == 3:  # step 3 is trained and logged; the newest checkpoint is step 2
            raise Killed

    monkeypatch.setattr(RunDir, "log", log_then_die)
    with pytest.raises(Killed):
        run_sft(cfg_for(tiny_model, tmp_path / "killed", grad_accum))
    monkeypatch.setattr(RunDir, "log", real_log)
    killed = tmp_path / "killed"
    assert [p.name for p in RunDir(killed).checkpoints()] == ["step-00000002"]
    assert [r["step"] for r in log_rows(killed)] == [1, 2, 3]
    with pytest.raises(RunDirError, match="pass --resume"):
        run_sft(cfg_for(tiny_model, killed, grad_accum))

    resumed = run_sft(cfg_for(tiny_model, killed, grad_accum), resume=True)
    rows, ref = log_rows(resumed), log_rows(whole)
    assert [r["step"] for r in rows] == list(range(1, 6))  # each step once: step 3 is not logged twice
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], abs=1e-6)  # step 3 retrained alike
    a = load_file(str(whole / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
