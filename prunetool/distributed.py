"""Running under ``torchrun``: calibration and test samples are sharded across processes and every sum
(unit means, score sums, least-squares normal equations, accuracy counts) is all-reduced, so each process
ends with the numbers a single process would compute; fine-tuning uses DistributedDataParallel. Only the
first process writes files and prints. Without ``torchrun`` everything here is a no-op."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init(device: str = "cpu") -> None:
    """Join the process group ``torchrun`` describes (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(t: torch.Tensor) -> torch.Tensor:
    """This process's share of samples: every ``world``-th one, starting at its rank."""
    return t[rank()::world()] if active() else t


def reduce_sum(value):
    """The sum of ``value`` (a tensor or a number) over all processes."""
    if not active():
        return value
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        dist.all_reduce(out)
        return out
    out = torch.tensor(float(value), dtype=torch.float64)
    dist.all_reduce(out)
    return out.item()
