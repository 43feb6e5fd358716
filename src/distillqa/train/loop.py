"""The one training loop. Every method (SFT now; KD, DSKD and rationale losses later) is an
objective plugged in here, never a copy of this loop.

Data order is a pure function of (seed, step): optimizer step s uses micro-batches
s*grad_accum .. (s+1)*grad_accum-1 of a stream of seeded per-epoch permutations. A resumed run
therefore sees exactly the batches an uninterrupted run would, and restoring the optimizer,
scheduler and RNG state from the checkpoint makes it continue identically.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from distillqa.config import TrainConfig
from distillqa.errors import DistillQAError
from distillqa.io import atomic_path, write_json
from distillqa.train.run_dir import RunDir


def total_steps(num_examples: int, cfg: TrainConfig, num_processes: int = 1) -> int:
    if cfg.max_steps:
        return cfg.max_steps
    per_step = cfg.batch_size * cfg.grad_accum * num_processes
    return max(1, math.ceil(num_examples / per_step) * cfg.epochs)


def micro_batch_indices(num_examples: int, cfg: TrainConfig, steps: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Example indices of every micro-batch this process trains on, in order."""
    global_bs = cfg.batch_size * world
    needed = steps * cfg.grad_accum
    out: list[list[int]] = []
    epoch = 0
    while len(out) < needed:
        perm = torch.randperm(num_examples, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        for start in range(0, num_examples, global_bs):
            chunk = perm[start : start + global_bs]
            # A rank left without examples in the epoch's last, short batch reuses its first ones,
            # so that every process takes the same number of steps.
            out.append(chunk[rank * cfg.batch_size : (rank + 1) * cfg.batch_size] or chunk[: cfg.batch_size])
        epoch += 1
    return out[:needed]


def lr_lambda(cfg: TrainConfig, steps: int):
    warmup = int(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else max(0.0, 1 - progress)

    return factor


def trainable_state(model: nn.Module, objective: nn.Module) -> dict[str, nn.Parameter]:
    state = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"objective.{n}": p for n, p in objective.named_parameters() if p.requires_grad})
    return state


def train(
    model: nn.Module,
    objective: nn.Module,
    data: list,
    cfg: TrainConfig,
    run: RunDir,
    collate: Callable[[list], dict[str, torch.Tensor]],
    param_groups: list[dict] | None = None,
) -> dict:
    """Train `model` with `objective` on `data`, checkpointing into `run`; resumes if `run` has a checkpoint.

    `collate` turns a list of data items into a batch of tensors. `param_groups` lets an
    objective give its own modules their own learning rate; by default every trainable
    parameter of the model and the objective gets `cfg.lr`.
    """
    if not data:
        raise DistillQAError("no training examples left after encoding (all too long for prompt.max_length?)")
    accelerator = Accelerator()
    torch.manual_seed(cfg.seed)
    steps = total_steps(len(data), cfg, accelerator.num_processes)
    model.to(accelerator.device)
    objective.to(accelerator.device)
    params = trainable_state(model, objective)
    groups = param_groups or [{"params": list(params.values())}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    model, optimizer = accelerator.prepare(model, optimizer)

    start = 0
    if (ckpt := run.latest_checkpoint()) is not None:
        start = load_checkpoint(ckpt, params, optimizer, scheduler)
        if accelerator.is_main_process:
            run.truncate_log(start)  # steps after the checkpoint are trained, and logged, again
    schedule = micro_batch_indices(len(data), cfg, steps, accelerator.process_index, accelerator.num_processes)

    model.train()
    window, t0, tokens = [], time.time(), 0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {run.path.name}", disable=not accelerator.is_main_process)
    for step in bar:
        step_loss, logs = 0.0, {}
        for k in range(cfg.grad_accum):
            batch = collate([data[i] for i in schedule[step * cfg.grad_accum + k]])
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            loss, logs = objective(model, batch)
            accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.item() / cfg.grad_accum
        if not math.isfinite(step_loss):
            raise DistillQAError(f"training loss became {step_loss} at step {step + 1}; lower train.lr or check the data")
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        done = step + 1
        if accelerator.is_main_process and (done % cfg.log_every == 0 or done == steps):
            elapsed = time.time() - t0
            run.log({"step": done, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                     "tokens_per_s": tokens / elapsed, **logs})
            window, t0, tokens = [], time.time(), 0
        if done % cfg.checkpoint_every == 0 or done == steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(run.checkpoint_path(done), done, params, optimizer, scheduler)
                run.prune_checkpoints(cfg.keep_checkpoints)
    bar.close()
    return {"steps": steps}


def save_checkpoint(path: Path, step: int, params: dict, optimizer, scheduler) -> None:
    with atomic_path(path, replace_dir=True) as tmp:  # our own checkpoint, if a kill left it
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step})


def load_checkpoint(path: Path, params: dict, optimizer, scheduler) -> int:
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise DistillQAError(f"checkpoint {path} does not match the model being trained (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "state.json").read_text())["step"]
