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
The launch's engine (`processes.engine`: DDP, or FSDP2 / DeepSpeed ZeRO from an accelerate config)
wraps the same `TrainingLoss`; under FSDP2 and ZeRO-3 weights are sharded, so checkpoints and
`final/` gather them whole (`shards.full_tensors`) and the optimizer state is saved per process.

Every `train.eval_every` steps and after the last, the objective's loss on the validation examples a
command passes (the first `train.eval_examples` of the split) is logged as `val_loss`, in the same row
as the training loss; the model is in eval mode and nothing random is drawn, so training is unchanged.
Logged rows also go to the trackers of `train.report_to` (accelerate's `log_with`), from the main process.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor
from tqdm.auto import tqdm

from distillqa import processes
from distillqa.config import TrainConfig
from distillqa.errors import DistillQAError
from distillqa.io import atomic_path, write_json
from distillqa.train.run_dir import RunDir
from distillqa.train.shards import full_tensors

SHARDS_TAG = "deepspeed"  # the folder DeepSpeed's engine writes its checkpoint into


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
    inside too: DDP broadcasts its weights once at the start and gives it no gradients to average;
    FSDP2 and ZeRO-3 shard it with the student, ZeRO-2 keeps it whole in every process.
    """

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.objective(self.model, batch)

    @property
    def _no_split_modules(self) -> list[str]:
        """The layer classes FSDP makes units of (accelerate's TRANSFORMER_BASED_WRAP reads this): the
        student's and the teacher's (inside the objective), so that both are sharded layer by layer."""
        return sorted({cls for part in (self.model, self.objective) for m in part.modules()
                       for cls in getattr(m, "_no_split_modules", None) or []})


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
    accelerator = processes.accelerator(gradient_accumulation_steps=cfg.grad_accum, log_with=cfg.report_to or None,
                                        project_dir=run.path / "trackers")
    # Each process draws its own dropout masks; process 0 draws those of a single-process run.
    torch.manual_seed(cfg.seed + accelerator.process_index)
    steps = total_steps(len(data), cfg, accelerator.num_processes)
    loss_module = TrainingLoss(model, objective)  # prepare() places it: whole (DDP) or each process its shard
    groups = param_groups or [{"params": list(trainable_state(loss_module).values())}]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed steps, accumulates and clips itself, as distillqa's config says (and again for the next
        # run of the process: accelerate's plugin keeps the values it filled in for the last one).
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
            train_batch_size=cfg.batch_size * cfg.grad_accum * accelerator.num_processes, gradient_clipping=cfg.max_grad_norm)
    wrapped, optimizer = accelerator.prepare(loss_module, optimizer)
    params = trainable_state(loss_module)  # after prepare(): FSDP2 replaces the parameters with sharded ones
    accelerator.init_trackers(run.path.name)

    start = 0
    if (ckpt := run.latest_checkpoint()) is not None:
        start = load_checkpoint(ckpt, params, wrapped, optimizer, scheduler, accelerator)
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
            # Gradients are averaged across processes once per step, in the last micro-batch's backward
            # (which is also where DeepSpeed takes its optimizer step); backward() divides by grad_accum.
            with accelerator.accumulate(wrapped):
                loss, logs = wrapped(batch)
                accelerator.backward(loss)
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
            save_checkpoint(run.checkpoint_path(done), done, params, wrapped, optimizer, scheduler, accelerator)
            if accelerator.is_main_process:
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
    # As many batches in every process: under FSDP2 and ZeRO-3 each forward gathers weights from all of
    # them, so a process out of items runs one more batch anyway, counted with weight 0.
    batches = math.ceil(math.ceil(len(items) / accelerator.num_processes) / batch_size)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # loss sum, examples
    loss_module.eval()
    with torch.no_grad():
        for start in range(0, batches * batch_size, batch_size):
            chunk = mine[start : start + batch_size]
            batch = {key: v.to(accelerator.device) for key, v in collate(chunk or items[:batch_size]).items()}
            total += torch.tensor([loss_module(batch)[0].item() * len(chunk), len(chunk)], dtype=torch.float64,
                                  device=accelerator.device)
    if isinstance(loss_module, FSDPModule):  # FSDP2 keeps the root's weights gathered after a forward without backward
        loss_module.reshard()
    loss_module.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def rng_state() -> dict:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def sharded_optimizer(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(path: Path, step: int, params: dict, wrapped: nn.Module, optimizer, scheduler,
                    accelerator: Accelerator) -> None:
    """Trainable tensors (whole), optimizer, scheduler (the same in every process) and each process's RNG state.

    Every process calls this. The optimizer state is one file where every process holds the same
    (DDP), else each process's shard: FSDP2's as a torch distributed checkpoint, DeepSpeed's as its
    engine's checkpoint (frozen weights left out). Shards are written next to the checkpoint, then
    the main process moves them into it and renames it into place.
    """
    trainable = full_tensors(params)
    rng = gather_object([rng_state()])  # every process's, so that each resumes its own dropout masks
    shards = path.parent / f".{path.name}.shards"
    if sharded_optimizer(accelerator):
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            wrapped.save_checkpoint(shards, tag=SHARDS_TAG, save_latest=False, exclude_frozen_parameters=True)
        else:
            dcp.save(get_optimizer_state_dict(wrapped, optimizer.optimizer), checkpoint_id=shards)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with atomic_path(path, replace_dir=True) as tmp:  # our own checkpoint, if a kill left it
            tmp.mkdir()
            save_file(trainable, str(tmp / "trainable.safetensors"))
            if sharded_optimizer(accelerator):
                os.replace(shards, tmp / "optimizer")
            else:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            write_json(tmp / "state.json", {"step": step, "processes": len(rng), "engine": processes.engine()})


def load_checkpoint(path: Path, params: dict, wrapped: nn.Module, optimizer, scheduler, accelerator: Accelerator) -> int:
    state = json.loads((path / "state.json").read_text())
    if state.get("processes", 1) != accelerator.num_processes:  # another split of every batch: not the run that was started
        raise DistillQAError(f"checkpoint {path} was written by a run of {state.get('processes', 1)} processes; "
                             f"resume it with that many, not {accelerator.num_processes}")
    if state.get("engine", "ddp") != processes.engine():  # its optimizer state is in that engine's form
        raise DistillQAError(f"checkpoint {path} was written under {state.get('engine', 'ddp')}; resume it under that "
                             f"engine (accelerate config), not {processes.engine()}")
    saved = load_file(str(path / "trainable.safetensors"))
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise DistillQAError(f"checkpoint {path} does not match the model being trained (missing {missing}, unexpected {extra})")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # weights and optimizer (its fp32 master weights too)
        wrapped.load_checkpoint(path / "optimizer", tag=SHARDS_TAG, load_module_strict=False, load_lr_scheduler_states=False)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(distribute_tensor(saved[name], p.device_mesh, p.placements) if isinstance(p, DTensor) else saved[name])
        if sharded_optimizer(accelerator):
            sharded = get_optimizer_state_dict(wrapped, optimizer.optimizer)  # the shapes to read the shards into
            dcp.load(sharded, checkpoint_id=path / "optimizer")
            set_optimizer_state_dict(wrapped, optimizer.optimizer, sharded)
        else:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    rng = rng[accelerator.process_index] if isinstance(rng, list) else rng  # one dict in checkpoints of single-process versions
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]
