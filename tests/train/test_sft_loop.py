"""The training loop on a tiny random model: learning, checkpoints, exact resume, run-dir safety."""

import pytest
import torch
from safetensors.torch import load_file

from distillqa.config import SFTConfig, load_config
from distillqa.errors import RunDirError
from distillqa.train import loop
from distillqa.train.sft import run_sft


def cfg_for(model, out, *extra):
    return load_config(SFTConfig, None, [f"model.name={model}", f"output_dir={out}", "data.max_train_examples=24",
                                         "train.batch_size=4", "train.lr=3e-3", "train.log_every=1",
                                         "train.checkpoint_every=2", "prompt.max_length=192", *extra])


def logged_losses(run):
    import json

    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def test_lora_sft_lowers_the_training_loss(tiny_model, tmp_path):
    run = run_sft(cfg_for(tiny_model, tmp_path / "run", "train.max_steps=30", "lora.r=8",
                          "train.keep_checkpoints_when_finished=true"))
    losses = logged_losses(run)
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert (run / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list((run / "checkpoints").iterdir())) == 2  # keep_checkpoints


def test_finished_run_removes_its_checkpoints_by_default(tiny_model, tmp_path, monkeypatch):
    from distillqa.train.run_dir import RunDir

    seen = []  # checkpoints present while the run trained
    real = RunDir.write_final
    monkeypatch.setattr(RunDir, "write_final", lambda self, *a: seen.append(len(self.checkpoints())) or real(self, *a))
    run = run_sft(cfg_for(tiny_model, tmp_path / "run", "train.max_steps=4"))
    assert seen == [2] and RunDir(run).finished
    assert not (run / "checkpoints").exists() and (run / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_full_finetuning_saves_a_standalone_model(tiny_model, tmp_path):
    from distillqa.models.registry import load_model

    run = run_sft(cfg_for(tiny_model, tmp_path / "run", "train.max_steps=4", "lora.enabled=false"))
    assert (run / "final" / "model" / "model.safetensors").is_file()
    tuned, base = load_model(str(run)), load_model(tiny_model)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


class Interrupt(Exception):
    pass


def test_killed_run_resumes_to_the_same_weights(tiny_model, tmp_path, monkeypatch):
    steps = ["train.max_steps=7", "lora.dropout=0.1"]
    whole = run_sft(cfg_for(tiny_model, tmp_path / "whole", *steps))

    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def save_then_die(path, step, *args):
        real_save(path, step, *args)
        calls["n"] += 1
        if step == 4:
            raise Interrupt  # killed right after the step-4 checkpoint, mid-run

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupt):
        run_sft(cfg_for(tiny_model, tmp_path / "killed", *steps))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    with pytest.raises(RunDirError, match="pass --resume"):
        run_sft(cfg_for(tiny_model, tmp_path / "killed", *steps))
    resumed = run_sft(cfg_for(tiny_model, tmp_path / "killed", *steps), resume=True)

    a = load_file(str(whole / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert logged_losses(whole)[4:] == pytest.approx(logged_losses(resumed)[4:], abs=1e-6)


def test_finished_run_is_never_overwritten(tiny_model, tmp_path):
    run = run_sft(cfg_for(tiny_model, tmp_path / "run", "train.max_steps=2"))
    before = (run / "final" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(RunDirError, match="already holds a finished sft run"):
        run_sft(cfg_for(tiny_model, tmp_path / "run", "train.max_steps=2"))
    with pytest.raises(RunDirError, match=r"config differs in train\.lr"):
        run_sft(cfg_for(tiny_model, tmp_path / "run", "train.max_steps=2", "train.lr=1e-2"), resume=True)
    assert (run / "final" / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_data_order_depends_only_on_seed_and_step():
    from distillqa.config import TrainConfig

    cfg = TrainConfig(batch_size=3, grad_accum=2, seed=1)
    order = loop.micro_batch_indices(10, cfg, steps=5)
    assert len(order) == 10 and order == loop.micro_batch_indices(10, cfg, steps=5)
    first_epoch = sorted(i for batch in order[:4] for i in batch)
    assert first_epoch == list(range(10))
