"""The one distributed layer: init, rank, world size and collectives that are no-ops at world size 1.

Launch with torchrun; without it everything runs in one process. NCCL on GPU, gloo on CPU. Beyond the
collectives this module holds what the trainer needs to scale out (docs/distributed.md):

- `wrap_model`: FSDP2 (`fully_shard` per block, then the denoiser) or plain replication ("ddp", where the
  trainer averages gradients with `average_gradients`);
- `unsharded`: gather the sharded weights once for a whole no-grad rollout or evaluation;
- `on_rank0`: run a function (the reward models) on rank 0 only, over every rank's images;
- `full_state` / `sharded_state` / `load_state`: trainable weights and optimizer state keyed by parameter
  name, so a checkpoint loads under another world size or strategy.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
import torch.distributed as torch_dist
from torch import nn

from mixgrpo.dtypes import parse_dtype

if TYPE_CHECKING:
    from mixgrpo.config import ParallelConfig


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


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average rank-local scalar metrics over ranks in one all-reduce (float64); identity at world size 1."""
    if not is_distributed() or not values:
        return dict(values)
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device())
    torch_dist.all_reduce(t)
    return dict(zip(values, (t / world_size()).tolist()))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable value) on every rank; identity at world size 1."""
    if not is_distributed():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        torch_dist.barrier()


def shutdown() -> None:
    """Leave the process group. The barrier first: a rank that tears gloo down while another is still in a
    collective can abort the process at exit ("terminate called without an active exception")."""
    if is_distributed():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# model placement



def shard_units(module: nn.Module) -> list[nn.Module]:
    """The blocks FSDP shards one by one: the elements of every outermost `nn.ModuleList` of `module`
    (FLUX: `transformer_blocks` and `single_transformer_blocks`; SD3: `transformer_blocks`). Lists nested in
    a block (e.g. an attention's `to_out`) stay inside their block's unit."""
    units: list[nn.Module] = []
    outer: list[str] = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and not any(name.startswith(o + ".") for o in outer):
            outer.append(name)
            units.extend(child)
    return units


def wrap_model(model: nn.Module, cfg: "ParallelConfig") -> nn.Module:
    """Place the model for data-parallel training; call after the trainable parameters are set (LoRA added,
    requires_grad set) and before the optimizer is built, since sharding replaces the parameters.

    strategy "fsdp": FSDP2 `fully_shard` on each block of `model.denoiser`, then on the denoiser itself (the
    root), with a MixedPrecisionPolicy(param_dtype, reduce_dtype). Text encoders and VAEs stay replicated:
    they are frozen and called outside the denoiser's forward. Gradients are reduce-scattered in backward.
    strategy "ddp": weights stay replicated; `average_gradients` all-reduces the gradients before each
    optimizer step. Both are no-ops at world size 1.
    """
    if cfg.strategy != "fsdp" or not is_distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # FSDP2 warns once per block class that the FLUX / SD3 blocks return views (the split of a joint sequence) and
    # that an in-place op on them would skip a gradient all-gather. Nothing writes into a block's output in place
    # (diffusers' blocks and our adapters build new tensors), and tests/test_distributed.py checks FSDP runs of the
    # FLUX transformer against one process; the four warnings would only say a reader should worry.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = MixedPrecisionPolicy(param_dtype=parse_dtype(cfg.param_dtype), reduce_dtype=parse_dtype(cfg.reduce_dtype))
    denoiser = model.denoiser
    for block in shard_units(denoiser):
        fully_shard(block, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    fully_shard(denoiser, reshard_after_forward=cfg.reshard_after_forward, mp_policy=policy)
    return model


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: nn.Module, cfg: "ParallelConfig") -> Iterator[None]:
    """Hold the full (gathered) weights during a stretch of no-grad forwards: a rollout or an evaluation.

    Under FSDP every forward of a sharded block all-gathers its weights and frees them afterwards, so a
    T-step rollout would gather the model T times (x2 with CFG). Inside this context the weights are
    gathered once, in param_dtype (bf16 halves the traffic), kept for every forward, and freed on exit.
    Memory: the whole denoiser in param_dtype on every rank for the duration. Every rank must enter; inside,
    forwards issue no collectives, so rank 0 may evaluate alone. No-op for unsharded models.
    """
    units = _fsdp_units(model) if is_distributed() else []
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for i, unit in enumerate(units):  # units[0] is the root, which FSDP never reshards after forward
            unit.reshard()
            unit.set_reshard_after_forward(cfg.reshard_after_forward and i > 0, recurse=False)


def average_gradients(grads: list[torch.Tensor]) -> None:
    """Average replicated gradients over ranks in place (one flat all-reduce). Sharded (FSDP) gradients are
    DTensors that FSDP already reduce-scattered in backward: they are left alone. No-op at world size 1."""
    from torch.distributed.tensor import DTensor

    plain = [g for g in grads if not isinstance(g, DTensor)]
    if not is_distributed() or not plain:
        return
    flat = torch.cat([g.flatten() for g in plain])
    torch_dist.all_reduce(flat)
    flat /= world_size()
    for g, part in zip(plain, flat.split([g.numel() for g in plain])):
        g.copy_(part.view_as(g))


# --------------------------------------------------------------------------------------------------
# replica agreement


def replica_checksums(groups: dict[str, list[torch.Tensor]]) -> tuple[dict[str, float], dict[str, list[list[float]]]]:
    """Checksums of named groups of weights (the trainable weights, the EMA, the sampling copy) on every rank, in
    one all-gather.

    Each tensor contributes (sum, sum of squares) in float64. A tensor held whole on every rank (DDP, or a plain
    tensor under FSDP) is a replica: its sums must be equal bit for bit on every rank. A sharded tensor (an FSDP
    DTensor with a Shard placement) contributes this rank's shard, and its full checksum is the sum over ranks.
    Returns ({group: full checksum (the sum)}, {group: per-rank [sum, sum of squares] of the replicas}); at world
    size 1 the second is one row per group. Collective: every rank calls it with the same groups and tensors.
    """
    from torch.distributed.tensor import DTensor, Shard

    rows = []
    for tensors in groups.values():
        replicated, sharded = [], []
        for t in tensors:
            t = t.detach()
            is_shard = isinstance(t, DTensor) and any(isinstance(p, Shard) for p in t.placements)
            local = t.to_local() if isinstance(t, DTensor) else t
            (sharded if is_shard else replicated).append(local)
        rows.append(torch.stack([_sums(replicated), _sums(sharded)]))  # [2 (replicated, sharded), 2 (sums)]
    local = torch.stack(rows) if rows else torch.zeros(0, 2, 2, dtype=torch.float64)  # [groups, 2, 2]
    per_rank = all_gather_cat(local.to(device()).unsqueeze(0)).cpu()  # [world, groups, 2, 2]
    full = {g: float(per_rank[0, i, 0, 0] + per_rank[:, i, 1, 0].sum()) for i, g in enumerate(groups)}
    replicas = {g: per_rank[:, i, 0].tolist() for i, g in enumerate(groups)}
    return full, replicas


def _sums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[sum, sum of squares] of all elements of `tensors`, float64, on the CPU (one sync)."""
    if not tensors:
        return torch.zeros(2, dtype=torch.float64)
    parts = torch.stack([torch.stack([torch.sum(t, dtype=torch.float64),
                                      torch.linalg.vector_norm(t, dtype=torch.float64).square()]) for t in tensors])
    return parts.sum(0).cpu()


# --------------------------------------------------------------------------------------------------
# serving a function from rank 0


def on_rank0(fn: Callable[[torch.Tensor, list], torch.Tensor] | None) -> Callable[[torch.Tensor, list], torch.Tensor]:
    """A collective version of fn(x [N, ...], items: N objects) -> scores [N] float32.

    Every rank calls the result with the same N; the x and items of every rank are gathered to rank 0, fn
    runs there once on all world * N rows (rank order), and each rank gets its own N scores back (on the
    CPU). `fn` is only called on rank 0, so other ranks may pass None and never build the reward models.
    At world size 1 it is fn itself.
    """

    def call(x: torch.Tensor, items: list) -> torch.Tensor:
        if not is_distributed():
            return fn(x, items)
        n, world, main = x.shape[0], world_size(), is_main()
        comm = device()  # NCCL needs tensors on the GPU, gloo on the CPU
        xs = [torch.empty_like(x, device=comm) for _ in range(world)] if main else None
        torch_dist.gather(x.to(comm).contiguous(), xs, dst=0)
        all_items = [None] * world if main else None
        torch_dist.gather_object(list(items), all_items, dst=0)
        parts = None
        if main:
            scores = torch.as_tensor(fn(torch.cat(xs), [i for part in all_items for i in part]),
                                     dtype=torch.float32).flatten()
            if scores.numel() != world * n:
                raise ValueError(f"on_rank0: fn returned {scores.numel()} values for {world * n} inputs")
            parts = list(scores.to(comm).split(n))
        out = torch.empty(n, dtype=torch.float32, device=comm)
        torch_dist.scatter(out, parts, src=0)
        return out.cpu()

    return call


# --------------------------------------------------------------------------------------------------
# training state for checkpoints


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights, optimizer state), gathered to full CPU tensors; rank 0 gets them, other ranks get
    empty dicts when distributed. Keys are parameter names (frozen weights left out), so the state loads
    under any world size and strategy. Collective under FSDP: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return full_weights(model, trainable_only=True), get_optimizer_state_dict(model, optimizer, options=options)


def full_weights(module: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """The weights of `module` as full CPU tensors, keyed like `module.state_dict()`: on rank 0 (other ranks get
    an empty dict when distributed). trainable_only: the parameters that require grad (a LoRA, not its frozen
    base); else every parameter and persistent buffer (a whole transformer). Collective under FSDP: every rank
    must call it, outside `unsharded` (whose gathered weights are not what FSDP's state dict reads)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(module, options=options)
    return _trainable(module, state) if trainable_only else state


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model", "optimizer"}: this rank's shards (DTensors under FSDP, the full tensors otherwise), keyed by
    parameter name, for torch.distributed.checkpoint (which saves replicated tensors once and reshards on
    load)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    return {"model": _trainable(model, get_model_state_dict(model, options=options)),
            "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any], full: bool) -> None:
    """Load trainable weights and optimizer state from `full_state` (full=True: full tensors, given on every
    rank) or from `sharded_state` after a DCP load (full=False); frozen weights are left as they are."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=full, strict=False)
    if hasattr(model, "reshard"):  # FSDP2 leaves the root's parameters unsharded after a forward; loaded so, a full
        model.reshard()            # state meets plain tensors where it expects DTensors and fails (2 ranks, resume)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def _trainable(model: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """Keep the trainable parameters of a model state dict (drop buffers)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}
