"""The processes of one training launch (`torchrun --nproc_per_node N`, `accelerate launch`) and the
engine that trains them.

accelerate sets up a process group on CPUs only when told to use them: untold, on a machine
without a GPU it sees N unrelated processes, and each would train alone on its slice of the data.
`processes()` tells it, and the loop checks that the group it got is the one that was launched.

The engine is the launch's, not the run config's: `accelerate launch --config_file
configs/accelerate/X.yaml` passes its config to every process in environment variables, which
`Accelerator()` reads (ACCELERATE_USE_FSDP with FSDP_VERSION for FSDP, ACCELERATE_USE_DEEPSPEED with
ACCELERATE_DEEPSPEED_ZERO_STAGE for DeepSpeed); without them the processes train DDP. accelerate
turns these variables into an engine only on accelerators; on CPUs (gloo) `accelerator()` sets the
same engine up itself, since torch's `fully_shard` and DeepSpeed's CPU accelerator both run there.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

from distillqa.errors import DistillQAError

DISTRIBUTED_TYPES = {"ddp": None, "fsdp2": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_launch() -> bool:
    """Several processes on a machine without CUDA: they train over gloo on CPUs."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def engine() -> str:
    """The engine the launch asked for: `ddp`, `fsdp2` or `deepspeed` (see the module's docstring)."""
    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise DistillQAError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                                 "(configs/accelerate/fsdp2.yaml)")
        return "fsdp2"
    return "ddp"


def sharded_engine() -> str | None:
    """`fsdp2` or `deepspeed-zero3`: an engine under which each process holds only a shard of the weights, so that
    every forward gathers them from all processes and each process must run the same modules; None otherwise."""
    if engine() == "fsdp2":
        return "fsdp2"
    if engine() == "deepspeed" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "deepspeed-zero3"
    return None


def processes() -> PartialState:
    """This launch's processes (rank, main process, barriers); the state `Accelerator` uses too."""
    if cpu_launch() and engine() == "deepspeed":
        # accelerate starts DeepSpeed only outside its CPU mode; given gloo, DeepSpeed's CPU accelerator joins the group.
        return PartialState(backend="gloo")
    return PartialState(cpu=cpu_launch())


def accelerator(**kwargs) -> Accelerator:
    """accelerate's `Accelerator` (`kwargs` its own) on this launch's processes, with the launch's engine."""
    processes()  # first: the process group as above, which the Accelerator then joins
    acc = Accelerator(cpu=cpu_launch() and engine() != "deepspeed", **kwargs)
    if acc.num_processes != launched_processes():
        raise DistillQAError(f"{launched_processes()} processes were launched, but accelerate joined {acc.num_processes} "
                             "into one training run; each would train alone (is the device type supported?)")
    if cpu_launch() and engine() == "fsdp2":
        # accelerate shards only on accelerators (on CPUs it would silently train DDP); its FSDP2 path
        # itself, `fully_shard` over the gloo group, runs on CPUs as well.
        plugin = FullyShardedDataParallelPlugin()
        if acc.mixed_precision != "no":
            plugin.set_mixed_precision(acc.mixed_precision)
        acc.state.fsdp_plugin = plugin
        # Both states, as accelerate does on GPUs: every new AcceleratorState() copies PartialState's.
        acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    if engine() == "deepspeed":
        # accelerate registers its DeepSpeed config with transformers, which then loads every later model of
        # the process partitioned (zero.Init: a collective), the next command's of a launch too. distillqa loads
        # the models whole before training (zero3_init_flag: false) and DeepSpeed partitions them in prepare().
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    wanted = DISTRIBUTED_TYPES[engine()]
    if acc.num_processes > 1 and wanted and acc.distributed_type != wanted:
        raise DistillQAError(f"the launch asked for {engine()}, but accelerate set up {acc.distributed_type.value}")
    return acc
