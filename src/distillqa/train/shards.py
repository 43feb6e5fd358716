"""Whole tensors from sharded training: under FSDP2 (a DTensor per parameter) and DeepSpeed ZeRO-3
(parameters partitioned, each process holding a slice) no process holds a trained weight whole, so
what is saved (checkpoints, `final/`) is gathered first."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.distributed.tensor import DTensor


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors` whole. A collective: every process calls it, with the same names."""
    with zero_gathered(list(tensors.values())):
        return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone() for name, t in tensors.items()}


def zero_gathered(params: list[torch.Tensor]):
    """DeepSpeed's context that gathers the ZeRO-3 parameters (`ds_id` marks them) that are partitioned now; those
    already whole (small ones DeepSpeed keeps whole, or gathered by a module in use) are left to DeepSpeed, which
    refuses to partition a parameter a module still uses. DeepSpeed is imported only when there is one to gather."""
    params = [p for p in params if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"]
    if not params:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
