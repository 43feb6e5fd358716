"""`distillqa` as torchrun (or accelerate launch) starts it in the multi-process tests: the CLI, unchanged, with two test hooks.

    torchrun --nproc_per_node 2 tests/train/torchrun_cli.py DUMP_DIR PAUSE_AFTER_STEP -- sft --set ... -- distill --set ...

runs `distillqa sft --set ...`, then `distillqa distill --set ...` (one launch, so the processes
start once) in every process, and
- after each training run, writes each process's trainable tensors (model and objective; whole, when
  the engine shards them) to
  DUMP_DIR/RUN_NAME/rank-R.safetensors, so a test can see that the processes ended alike;
- with PAUSE_AFTER_STEP > 0, stops the main process for good right after it saved that step's
  checkpoint (the others wait in the next step's gradient exchange), so that a test can kill the
  whole launch with SIGKILL at a known point.
"""

import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from distillqa.train import distill, loop, sft
from distillqa.processes import processes
from distillqa.train.shards import full_tensors


def dumping(train, dump_dir: Path):
    def train_and_dump(model, objective, data, cfg, run, *args, **kwargs):
        result = train(model, objective, data, cfg, run, *args, **kwargs)
        state = full_tensors(loop.trainable_state(loop.TrainingLoss(model, objective)))  # whole, if sharded
        out = dump_dir / run.path.name / f"rank-{processes().process_index}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file({n: t.float() for n, t in state.items()}, str(out))
        return result

    return train_and_dump


def pausing(save_checkpoint, step_to_pause: int):
    def save_then_pause(path, step, *args):
        save_checkpoint(path, step, *args)
        if step == step_to_pause:
            time.sleep(3600)

    return save_then_pause


def commands(args: list[str]) -> list[list[str]]:
    out: list[list[str]] = []
    for arg in args:
        if arg == "--":
            out.append([])
        else:
            out[-1].append(arg)
    return out


if __name__ == "__main__":
    dump_dir, pause_after, *rest = sys.argv[1:]
    train_and_dump = dumping(loop.train, Path(dump_dir))
    for module in (loop, sft, distill):  # the rationale experiment imports loop.train when it trains
        module.train = train_and_dump
    if int(pause_after):
        loop.save_checkpoint = pausing(loop.save_checkpoint, int(pause_after))
    from distillqa.cli import app

    for command in commands(rest):
        if code := app(command, standalone_mode=False):  # a user error (exit 2) ends the launch, as it would alone
            sys.exit(code)
