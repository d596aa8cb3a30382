"""The one distributed layer: init, rank, world size and collectives that are no-ops at world size 1.

Launch with torchrun; without it everything runs in one process. NCCL on GPU, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def init() -> None:
    """Initialise the process group when launched by torchrun (WORLD_SIZE set); idempotent."""
    if torch_dist.is_available() and not torch_dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend)


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (rank order); identity at world size 1."""
    if not is_distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch_dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return t
    t = t.clone()
    torch_dist.all_reduce(t)
    return t / world_size()


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def shutdown() -> None:
    if is_distributed():
        torch_dist.destroy_process_group()
