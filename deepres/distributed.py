"""Data-parallel training over processes, switched on by the environment torchrun sets.

`torchrun --nproc_per_node N -m deepres.cli train ...` starts N copies of one run. Each takes
its share of every global batch, DDP averages the gradients, and rank 0 alone writes the run
directory. Outside torchrun every function here is a no-op for a single process.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# How long a rank waits in a collective for the others. Rank 0 alone decodes the held-out
# photos at the start (50,000 for ImageNet, on every resume), evaluates and writes checkpoints
# while the others wait: NCCL's default of 10 minutes would end such a run.
TIMEOUT = timedelta(hours=1)


def _environ(name: str, default: str | None = None) -> int:
    """An integer torchrun sets, or a one-line error saying what is wrong with it."""
    value = os.environ.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name}={value!r} in the environment: several processes are launched by torchrun,"
            " which sets RANK, LOCAL_RANK and WORLD_SIZE as numbers"
        ) from None


def world() -> tuple[int, int]:
    """This process's rank and the number of processes; (0, 1) outside torchrun."""
    world_size = _environ("WORLD_SIZE", "1")
    if world_size < 2:
        return 0, 1
    rank = _environ("RANK")
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} in the environment: not one of WORLD_SIZE={world_size}'s")
    return rank, world_size


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group when launched by it; the device this process trains on."""
    if world()[1] == 1:
        if device.type == "cuda" and device.index is not None:
            # CUDA graphs capture on the current device's streams: cuda:1 must be current, or
            # the capture records nothing and every replay trains nothing.
            torch.cuda.set_device(device)
        return device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE is set, but this PyTorch build has no torch.distributed")
    if device.type == "cuda":
        # One GPU per process, the one torchrun numbered for this node.
        local_rank = _environ("LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"torchrun: process {local_rank} of this node has no GPU of its own (the node "
                f"has {torch.cuda.device_count()}); --nproc_per_node at most that"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return device


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether flag is set on any rank; every rank calls this at the same step."""
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return bool(value.item())


def teardown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process gets here, so that what rank 0 wrote before is there to read."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DistributedDataParallel inside a process group, else the model itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def sum_over_ranks(values: list[float | torch.Tensor], device: torch.device) -> list[float]:
    """Each value summed over all processes (a single process's own values outside torchrun)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    # float64, so that image counts and error counts stay exact; on the training device,
    # because NCCL reduces only GPU tensors.
    sums = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(sums)
    return sums.tolist()
