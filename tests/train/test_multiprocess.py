"""Data-parallel training: 2 processes over gloo on this CPU (torchrun; `accelerate launch --cpu`
starts one). After 2 steps of SFT, vanilla KD, DSKD, DSKD-CMA, ULD and a rationale cell, both
processes hold the same trainable tensors, equal to one process's with grad_accum 2 (the same
global batch, averaged the same way); a 2-process run killed with SIGKILL resumes to completion.
The commands are the README's (section "Several GPUs or processes")."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl

HERE = Path(__file__).parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
COMMON = ["data.max_train_examples=8", "train.batch_size=2", "train.max_steps=2", "train.log_every=1", "train.lr=1e-3",
          "prompt.max_length=160", "lora.dropout=0"]


def as_cli(command: list[str], settings: list[str]) -> list[str]:
    return [*command, *(arg for s in settings for arg in ("--set", s))]


def runs(tiny, other, chat, rationales, out: Path) -> dict[str, list[str]]:
    """Run name -> its distillqa command line, one per objective."""
    rationale_settings = [f"student.name={chat}", f"train_file={rationales}", f"eval_file={rationales}", "preset=none",
                          "methods=[mt]", "rationale_types=[unrevised]", "seeds=[0]", "max_eval_examples=2",
                          "explain_examples=1", "generation.max_new_tokens=4", f"output_dir={out}/rationales",
                          *(s.replace("data.max_train_examples", "max_train_examples") for s in COMMON)]
    return {
        "sft": as_cli(["sft"], [f"model.name={tiny}@layers=0-1", f"output_dir={out}/sft", *COMMON]),
        "vanilla": as_cli(["distill"], [f"teacher.name={tiny}", f"student.name={tiny}@layers=every-other", "kd.algorithm=vanilla",
                                        "lora.enabled=false", f"output_dir={out}/vanilla", *COMMON]),
        "dskd": as_cli(["distill"], [f"teacher.name={tiny}", f"student.name={tiny}@layers=every-other", "kd.algorithm=dskd",
                                     "kd.chunk_size=7", f"output_dir={out}/dskd", *COMMON]),
        "dskd-cma": as_cli(["distill"], [f"teacher.name={other}", f"student.name={tiny}", "kd.algorithm=dskd-cma",
                                         "lora.enabled=false", f"output_dir={out}/dskd-cma", *COMMON]),
        "uld": as_cli(["distill"], [f"teacher.name={other}", f"student.name={tiny}", "kd.algorithm=uld", f"output_dir={out}/uld", *COMMON]),
        "mt_unrevised_seed0": as_cli(["rationales", "experiment"], rationale_settings),
    }


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLQA_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "_TYPER_STANDARD_TRACEBACK": "1"}


def in_one_process(command_lines: list[list[str]], dump: Path, cache: Path, monkeypatch) -> None:
    """The same commands in this process, each training run with grad_accum 2: one process, the same global batch."""
    from torchrun_cli import dumping

    from distillqa.cli import app
    from distillqa.train import distill, loop, sft

    monkeypatch.setenv("DISTILLQA_CACHE", str(cache))
    train_and_dump = dumping(loop.train, dump)
    for module in (loop, sft, distill):
        monkeypatch.setattr(module, "train", train_and_dump)
    # One thread, as in the torchrun processes (env()): the thread count changes the order of float
    # sums inside matmuls, and Adam turns such 1e-9 gradient differences into 1e-5 weight differences.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line in command_lines:
            assert app([*line, "--set", "train.grad_accum=2"], standalone_mode=False) is None
    finally:
        torch.set_num_threads(threads)


def rationale_rows(path: Path) -> Path:
    return write_jsonl(path, [{"id": f"q{i}", "question": f"Where does thing {i} live?", "choices": ["river", "cave"],
                               "answer": "river", "rationale": f"Thing {i} swims."} for i in range(8)])


def log_losses(path: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (path / "log.jsonl").read_text().splitlines()]


def test_two_processes_train_every_objective_as_one_process(tiny_model, tiny_other_vocab_model, tiny_chat_model, tmp_path,
                                                            monkeypatch):
    rationales = rationale_rows(tmp_path / "rationales.jsonl")
    two, one = tmp_path / "two", tmp_path / "one"
    lines = runs(tiny_model, tiny_other_vocab_model, tiny_chat_model, rationales, two)
    command = [*TORCHRUN, str(HERE / "torchrun_cli.py"), str(two / "dump"), "0"]
    for line in lines.values():
        command += ["--", *line]
    # A cold model cache: both processes need the pruned students at once, and one builds each.
    done = subprocess.run(command, env=env(two / "cache"), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-6000:]
    in_one_process(list(runs(tiny_model, tiny_other_vocab_model, tiny_chat_model, rationales, one).values()),
                   one / "dump", one / "cache", monkeypatch)

    same_as_one_process(two / "dump", one / "dump", list(lines), "2 processes")
    for name in ("sft", "vanilla", "dskd", "dskd-cma", "uld"):  # the logged loss is the mean over both processes
        assert log_losses(two / name) == pytest.approx(log_losses(one / name), rel=1e-5)
    assert json.loads((two / "rationales" / "results" / "runs.json").read_text())[0]["n"] == 2


def same_as_one_process(dump: Path, one_dump: Path, names: list[str], label: str) -> None:
    """Each run's trainable tensors in `dump`: the same in both processes, and as one process's in `one_dump`."""
    for name in names:
        rank0, rank1 = (load_file(str(dump / name / f"rank-{r}.safetensors")) for r in (0, 1))
        single = load_file(str(one_dump / name / "rank-0.safetensors"))
        assert rank0.keys() == rank1.keys() == single.keys() and rank0
        if name.startswith("dskd"):
            assert any(k.startswith("objective.") for k in rank0)  # the projectors are trained and compared too
        across_ranks = max((rank0[k] - rank1[k]).abs().max().item() for k in rank0)
        vs_single = max((rank0[k] - single[k]).abs().max().item() for k in rank0)
        print(f"{label}, {name}: max |rank 0 - rank 1| = {across_ranks:.1e}, max |2 processes - 1 process| = {vs_single:.1e}")
        assert across_ranks == 0, name
        assert vs_single < 1e-5, name


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (torchrun starts each worker in a session of its own)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def test_two_process_run_killed_with_sigkill_resumes_to_completion(tiny_model, tmp_path, monkeypatch):
    killed_and_resumed(TORCHRUN, tiny_model, tmp_path, monkeypatch, "2 processes")


def killed_and_resumed(launcher: list[str], tiny_model, tmp_path: Path, monkeypatch, label: str) -> None:
    """A 4-step sft run of 2 processes started with `launcher`, killed with SIGKILL right after its step-2
    checkpoint and resumed, ends as one process's uninterrupted run."""
    out, cache = tmp_path / "killed", tmp_path / "cache"
    line = as_cli(["sft"], [f"model.name={tiny_model}", f"output_dir={out}", *COMMON, "train.max_steps=4", "train.checkpoint_every=2"])
    launch = subprocess.Popen([*launcher, str(HERE / "torchrun_cli.py"), str(tmp_path / "dump"), "2", "--", *line],
                              env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000002").is_dir():  # the main process pauses right after writing it
        assert launch.poll() is None and time.time() < deadline, "the launch ended before its step-2 checkpoint"
        time.sleep(0.2)
    for pid in [launch.pid, *children(launch.pid)]:  # kill -9: the launcher and both processes at once
        os.kill(pid, signal.SIGKILL)
    launch.wait()
    assert json.loads((out / "run.json").read_text())["status"] == "running" and not (out / "final").exists()

    resumed = subprocess.run([*launcher, "-m", "distillqa.cli", *line, "--resume"], env=env(cache), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    one = tmp_path / "one"
    in_one_process([[*as_cli(["sft"], [f"model.name={tiny_model}", f"output_dir={one}", *COMMON, "train.max_steps=4",
                                        "train.checkpoint_every=2"])]], tmp_path / "dump-one", cache, monkeypatch)
    a = load_file(str(out / "final" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "final" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{label}, killed and resumed, vs 1 process: max |difference| = {diff:.1e}")
    assert diff < 1e-5
    assert log_losses(out) == pytest.approx(log_losses(one), rel=1e-5)
