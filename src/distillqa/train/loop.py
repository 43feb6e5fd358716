"""The one training loop. Every method (SFT, KD, DSKD, healing, rationale losses) is an
objective plugged in here, never a copy of this loop.

Data order is a pure function of (seed, step): optimizer step s uses micro-batches
s*grad_accum .. (s+1)*grad_accum-1 of a stream of seeded per-epoch permutations. A resumed run
therefore sees exactly the batches an uninterrupted run would, and restoring the optimizer,
scheduler and RNG state from the checkpoint makes it continue identically. Each batch also carries
`seed`, a pure function of (seed, step, micro-batch, process), for whatever an objective draws on it
(on-policy answers): a resumed run draws the same.

Several processes (`torchrun --nproc_per_node N -m distillqa.cli ...`, or `accelerate launch`) train
data-parallel: each takes its slice of every global batch (N x batch_size examples), the loss runs
inside the DDP wrapper's forward (`TrainingLoss`), so gradients are averaged across processes once
per optimizer step, and the main process logs and checkpoints. With dropout off, N processes give
the weights of one process with grad_accum multiplied by N: both average the same N micro-batch means.

Every `train.eval_every` steps and after the last, the objective's loss on the validation examples a
command passes (the first `train.eval_examples` of the split) is logged as `val_loss`, in the same row
as the training loss; the model is in eval mode and nothing random is drawn, so training is unchanged.
Logged rows also go to the trackers of `train.report_to` (accelerate's `log_with`), from the main process.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from distillqa.config import TrainConfig
from distillqa.errors import DistillQAError
from distillqa.io import atomic_path, write_json
from distillqa.processes import cpu_launch, launched_processes
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


def examples_trained_on(num_examples: int, cfg: TrainConfig, world: int = 1) -> list[int]:
    """Indices of the examples a run of `cfg` reaches: all of them once its steps cover an epoch,
    else the first ones of the seeded order (what sequence-level KD needs teacher answers for)."""
    steps = total_steps(num_examples, cfg, world)
    return sorted({i for rank in range(world) for batch in micro_batch_indices(num_examples, cfg, steps, rank, world)
                   for i in batch})


def validation_examples(splits: dict[str, list], cfg: TrainConfig) -> list:
    """The validation examples a run measures its loss on (none when `eval_every` is 0)."""
    return splits["validation"][: cfg.eval_examples] if cfg.eval_every else []


def batch_seed(seed: int, micro_batch: int, process_index: int) -> int:
    """The seed of what an objective draws on micro-batch `micro_batch` (its index in the schedule) of one process."""
    return int(np.random.SeedSequence([seed % 2**32, micro_batch, process_index]).generate_state(1)[0])


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


class TrainingLoss(nn.Module):
    """The model and its objective as one module whose forward is the training loss.

    DDP averages gradients across processes only for a loss computed inside its wrapper's forward,
    and objectives call the model's backbone and head directly, not its forward. So the wrapper goes
    around this module: the whole loss runs in its forward (TRL's and Lightning's "forward
    redirection" reroute a call through the wrapper's forward for the same reason), and the
    objective's own modules (DSKD projectors) are synchronised with the model. The frozen teacher is
    inside too: DDP broadcasts its weights once at the start and gives it no gradients to average.
    """

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, batch)


def trainable_state(module: TrainingLoss) -> dict[str, nn.Parameter]:
    """Trainable tensors by name (`model.*`, `objective.*`): what a checkpoint holds."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def train(
    model: nn.Module,
    objective: nn.Module,
    data: list,
    cfg: TrainConfig,
    run: RunDir,
    collate: Callable[[list], dict[str, torch.Tensor]],
    param_groups: list[dict] | None = None,
    validation: list | None = None,
) -> dict:
    """Train `model` with `objective` on `data`, checkpointing into `run`; resumes if `run` has a checkpoint.

    `collate` turns a list of data items into a batch of tensors. `param_groups` lets an
    objective give its own modules their own learning rate; by default every trainable
    parameter of the model and the objective gets `cfg.lr`. `validation`: items like `data`
    whose mean loss is logged every `cfg.eval_every` steps (none: no validation loss).
    """
    if not data:
        raise DistillQAError("no training examples left after encoding (all too long for prompt.max_length?)")
    accelerator = Accelerator(cpu=cpu_launch(), log_with=cfg.report_to or None, project_dir=run.path / "trackers")
    if accelerator.num_processes != launched_processes():
        raise DistillQAError(f"{launched_processes()} processes were launched, but accelerate joined {accelerator.num_processes} "
                             "into one training run; each would train alone (is the device type supported?)")
    # Each process draws its own dropout masks; process 0 draws those of a single-process run.
    torch.manual_seed(cfg.seed + accelerator.process_index)
    steps = total_steps(len(data), cfg, accelerator.num_processes)
    loss_module = TrainingLoss(model, objective).to(accelerator.device)
    params = trainable_state(loss_module)
    groups = param_groups or [{"params": list(params.values())}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    accelerator.init_trackers(run.path.name)

    start = 0
    if (ckpt := run.latest_checkpoint()) is not None:
        start = load_checkpoint(ckpt, params, optimizer, scheduler, accelerator.process_index, accelerator.num_processes)
        if accelerator.is_main_process:
            run.truncate_log(start)  # steps after the checkpoint are trained, and logged, again
    schedule = micro_batch_indices(len(data), cfg, steps, accelerator.process_index, accelerator.num_processes)

    wrapped.train()
    window, t0, tokens, val_loss = [], time.time(), 0, None
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train {run.path.name}", disable=not accelerator.is_main_process)
    for step in bar:
        step_loss, logs = 0.0, {}
        for k in range(cfg.grad_accum):
            micro_batch = step * cfg.grad_accum + k
            batch = collate([data[i] for i in schedule[micro_batch]])
            batch["seed"] = torch.tensor(batch_seed(cfg.seed, micro_batch, accelerator.process_index))
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            tokens += int(batch["attention_mask"].sum())
            # Gradients are averaged across processes once per step, in the last micro-batch's backward.
            with nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(wrapped):
                loss, logs = wrapped(batch)
                accelerator.backward(loss / cfg.grad_accum)
            step_loss += loss.item() / cfg.grad_accum
        # The mean over processes: every process logs, and stops on a bad loss, alike.
        step_loss = accelerator.reduce(torch.tensor(step_loss, dtype=torch.float64, device=accelerator.device), "mean").item()
        if not math.isfinite(step_loss):
            raise DistillQAError(f"training loss became {step_loss} at step {step + 1}; lower train.lr or check the data")
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(step_loss)
        done = step + 1
        validate = bool(validation) and cfg.eval_every > 0 and (done % cfg.eval_every == 0 or done == steps)
        if validate:
            val_loss = validation_loss(loss_module, validation, collate, cfg.batch_size, accelerator)
        bar.set_postfix(loss=f"{step_loss:.4f}", **({"val_loss": f"{val_loss:.4f}"} if val_loss is not None else {}))
        if done % cfg.log_every == 0 or done == steps or validate:
            tokens = int(accelerator.reduce(torch.tensor(tokens, device=accelerator.device), "sum"))  # of all processes
            row = {"loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tokens / (time.time() - t0), **logs, **({"val_loss": val_loss} if validate else {})}
            if accelerator.is_main_process:
                run.log({"step": done, **row})
            accelerator.log(row, step=done)
            window, t0, tokens = [], time.time(), 0
        if done % cfg.checkpoint_every == 0 or done == steps:
            rng = gather_object([rng_state()])  # every process's, so that each resumes its own dropout masks
            if accelerator.is_main_process:
                save_checkpoint(run.checkpoint_path(done), done, params, optimizer, scheduler, rng)
                run.prune_checkpoints(cfg.keep_checkpoints)
    bar.close()
    for tracker in accelerator.trackers:  # not end_training(): it ends the process group the run still uses
        tracker.finish()
    return {"steps": steps}


def validation_loss(loss_module: TrainingLoss, items: list, collate: Callable[[list], dict[str, torch.Tensor]],
                    batch_size: int, accelerator: Accelerator) -> float:
    """The mean loss over `items` (batch losses weighted by their examples), each process taking every
    N-th item; on the module itself, not its DDP wrapper, as no gradient is averaged."""
    mine = items[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, examples
    loss_module.eval()
    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = {key: v.to(accelerator.device) for key, v in collate(chunk).items()}
            total += torch.tensor([loss_module(batch)[0].item() * len(chunk), len(chunk)], dtype=torch.float64,
                                  device=accelerator.device)
    loss_module.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def save_checkpoint(path: Path, step: int, params: dict, optimizer, scheduler, rng: list[dict]) -> None:
    """Trainable tensors, optimizer and scheduler (the same in every process), and each process's RNG state."""
    with atomic_path(path, replace_dir=True) as tmp:  # our own checkpoint, if a kill left it
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        write_json(tmp / "state.json", {"step": step, "processes": len(rng)})


def load_checkpoint(path: Path, params: dict, optimizer, scheduler, process_index: int = 0, num_processes: int = 1) -> int:
    state = json.loads((path / "state.json").read_text())
    if state.get("processes", 1) != num_processes:  # another split of every batch: not the run that was started
        raise DistillQAError(f"checkpoint {path} was written by a run of {state.get('processes', 1)} processes; "
                             f"resume it with that many, not {num_processes}")
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
    rng = rng[process_index] if isinstance(rng, list) else rng  # one dict in checkpoints of single-process versions
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]
