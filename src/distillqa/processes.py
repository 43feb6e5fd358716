"""The processes of one training launch (`torchrun --nproc_per_node N`, `accelerate launch`).

accelerate sets up a process group on CPUs only when told to use them: untold, on a machine
without a GPU it sees N unrelated processes, and each would train alone on its slice of the data.
`processes()` tells it, and the loop checks that the group it got is the one that was launched.
"""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_launch() -> bool:
    """Several processes on a machine without CUDA: they train over gloo on CPUs."""
    return launched_processes() > 1 and not torch.cuda.is_available()


def processes() -> PartialState:
    """This launch's processes (rank, main process, barriers); the state `Accelerator` uses too."""
    return PartialState(cpu=cpu_launch())
