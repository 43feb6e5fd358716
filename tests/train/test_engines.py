"""Sharding engines through the accelerate configs of configs/accelerate/: 2 processes over gloo on
this CPU, started as those configs are meant to be used, `accelerate launch --config_file
configs/accelerate/X.yaml --num_processes 2` (with `--mixed_precision no`: no bf16 on a CPU). After 2
steps of SFT, vanilla KD and DSKD under FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, both processes hold the
same whole trainable tensors, equal to one process's with grad_accum 2 (the same global batch), and
the checkpoint is the engine's; a 2-process FSDP2 run killed with SIGKILL after a checkpoint resumes
to completion. The commands are the README's (section "Several GPUs or processes")."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from test_multiprocess import HERE, env, in_one_process, killed_and_resumed, log_losses, rationale_rows, runs, same_as_one_process

CONFIGS = HERE.parents[1] / "configs" / "accelerate"
OBJECTIVES = ("sft", "vanilla", "dskd")
ENGINES = ("fsdp2", "deepspeed-zero2", "deepspeed-zero3")
KEEP = "train.keep_checkpoints_when_finished=true"  # to look at the engine's checkpoint afterwards


def launch(engine: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{engine}.yaml"),
            "--num_processes", "2", "--mixed_precision", "no"]


def engine_runs(tiny, other, chat, tmp_path: Path, out: Path) -> dict[str, list[str]]:
    every = runs(tiny, other, chat, rationale_rows(tmp_path / "rationales.jsonl"), out)
    return {name: [*every[name], "--set", KEEP] for name in OBJECTIVES}


@pytest.fixture(scope="module")
def one_process(tiny_model, tiny_other_vocab_model, tiny_chat_model, tmp_path_factory) -> Path:
    """The dumps of the objectives' runs in one process with grad_accum 2, which every engine must match."""
    tmp = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as monkeypatch:
        lines = engine_runs(tiny_model, tiny_other_vocab_model, tiny_chat_model, tmp, tmp / "runs")
        in_one_process(list(lines.values()), tmp / "dump", tmp / "cache", monkeypatch)
    return tmp


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_under_an_engine_train_as_one_process(engine, one_process, tiny_model, tiny_other_vocab_model,
                                                            tiny_chat_model, tmp_path):
    out = tmp_path / "runs"
    lines = engine_runs(tiny_model, tiny_other_vocab_model, tiny_chat_model, tmp_path, out)
    command = [*launch(engine), str(HERE / "torchrun_cli.py"), str(tmp_path / "dump"), "0"]
    for name in OBJECTIVES:
        command += ["--", *lines[name]]
    done = subprocess.run(command, env=env(tmp_path / "cache"), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-6000:]

    same_as_one_process(tmp_path / "dump", one_process / "dump", list(OBJECTIVES), engine)
    for name in OBJECTIVES:
        checkpoint = out / name / "checkpoints" / "step-00000002"
        assert json.loads((checkpoint / "state.json").read_text())["engine"] == engine.split("-")[0]
        assert (checkpoint / "optimizer").is_dir()  # each process's shard of the optimizer state
        final = load_file(str(out / name / "final" / ("model/model.safetensors" if name == "vanilla" else "adapter/adapter_model.safetensors")))
        assert final and all(t.numel() for t in final.values())  # the whole weights, not a process's empty shards
        assert log_losses(out / name) == pytest.approx(log_losses(one_process / "runs" / name), rel=1e-5)


def test_fsdp2_run_killed_with_sigkill_resumes_to_completion(tiny_model, tmp_path, monkeypatch):
    killed_and_resumed(launch("fsdp2"), tiny_model, tmp_path, monkeypatch, "fsdp2")


@pytest.mark.parametrize("engine, setting, message", [
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "kd.lmbda=0.5", "on-policy KD cannot train under deepspeed-zero3"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "kd.lmbda=0.5", "on-policy KD cannot train under fsdp2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "kd.lmbda=0", "FSDP version 1 is not supported"),
])
def test_sharding_engines_refuse_what_they_cannot_train(engine, setting, message, tiny_model, tmp_path, monkeypatch):
    """What an engine's processes would wait on each other for forever is refused in one line, before anything is written."""
    from distillqa.config import DistillConfig, load_config
    from distillqa.errors import DistillQAError
    from distillqa.train.distill import run_distill

    for name, value in engine.items():  # as `accelerate launch --config_file` passes its config
        monkeypatch.setenv(name, value)
    cfg = load_config(DistillConfig, None, [f"teacher.name={tiny_model}", f"student.name={tiny_model}", setting,
                                            f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(DistillQAError, match=message):
        run_distill(cfg)
    assert not (tmp_path / "run").exists()
