"""What a checkpoint holds, and what a resume checks: the one place for the state that survives a restart.

A checkpoint holds the live weights and the optimizer and scheduler state, the weight copies (EMA, the sampling
copy of the forward-process objectives), the iteration and the config fingerprint. Everything else of a run is
a pure function of (config, iteration, seed) (`mixgrpo.seeding`, `mixgrpo.plan`), so it needs no state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mixgrpo import dist
from mixgrpo.checkpoint import (CheckpointError, is_sharded_checkpoint, load_checkpoint, load_sharded_checkpoint,
                                save_checkpoint, save_sharded_checkpoint)
from mixgrpo.config import TrainConfig, to_dict
from mixgrpo.rundir import CONFIG
from mixgrpo.train.weights import EMA

# the config fields a resume may change: the run's length and where and how it logs, not what it computes; and
# the precision: `auto` resolves by the machine, so a run may continue on one without bf16 matrix units
RESUMABLE_CHANGES = ("iterations", "time_limit_minutes", "out_dir", "checkpoint_every", "keep_checkpoints",
                     "reward_policy", "parallel", "tensorboard", "wandb_project", "precision")


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the original (not its length or logging)."""
    d = to_dict(cfg)
    for key in RESUMABLE_CHANGES:
        d.pop(key, None)
    d["prompts_per_iteration"] *= dist.world_size()  # the global batch: a run may resume on another world size
    return json.loads(json.dumps(d))


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every leaf that differs between two config fingerprints. A key the old one
    lacks is a field added by a newer mixgrpo (its default keeps the old behaviour), a key the new one lacks a
    field it removed (it did nothing): neither is a difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) if k in old and k in new
                for d in config_diff(old[k], new[k], f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def check_resumable(checkpoint: Path, old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume from a checkpoint of another configuration, naming the differences and the fix. A
    different global batch alone (another world size) gets the prompts_per_iteration that restores it."""
    changed = config_diff(old, new)
    if not changed:
        return
    world, before, now = dist.world_size(), old.get("prompts_per_iteration"), new.get("prompts_per_iteration")
    if all(c.startswith("prompts_per_iteration:") for c in changed) and isinstance(before, int):
        fix = (f"resume with prompts_per_iteration={before // world}" if before % world == 0 else
               f"resume on a number of processes that divides {before}")
        raise CheckpointError(f"checkpoint {checkpoint} was trained with {before} prompts per iteration in all "
                              f"(prompts_per_iteration x processes), this launch has {now} "
                              f"({now // world} x {world} process{'es' if world > 1 else ''}): {fix}")
    raise CheckpointError(f"checkpoint {checkpoint} was written with a different configuration "
                          f"({', '.join(changed[:4])}): resume with the run's own config "
                          f"({run_dir / CONFIG}) or start a new out_dir")


class TrainState:
    """The live training state: model, optimizer, scheduler and the weight copies ({"ema": EMA, "sampler":
    EMA}, the ones a run has), saved to and restored from a checkpoint of either format."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, copies: dict[str, EMA]):
        self.model, self.optimizer, self.scheduler, self.copies = model, optimizer, scheduler, copies

    def save(self, run_dir: Path, iteration: int, config: dict[str, Any], sharded: bool, keep: int) -> None:
        """Checkpoint (every rank calls it). Full: weights and optimizer state gathered to rank 0, which writes
        them; sharded: every rank writes its shards with torch.distributed.checkpoint."""
        state = {"config": config}
        if sharded:
            save_sharded_checkpoint(run_dir, iteration, self._sharded(), state, keep=keep)
            return
        weights, optimizer_state = dist.full_state(self.model, self.optimizer)
        if not dist.is_main():
            return
        save_checkpoint(run_dir, iteration, weights, {"optimizer": optimizer_state,
                                                      "scheduler": self.scheduler.state_dict()},
                        state, copies={name: copy.shadow for name, copy in self.copies.items()}, keep=keep)

    def _sharded(self) -> dict[str, Any]:
        """What a sharded checkpoint holds: this rank's shards of weights and optimizer state, scheduler, copies."""
        app = {**dist.sharded_state(self.model, self.optimizer), "scheduler": self.scheduler.state_dict()}
        app.update({name: copy.shadow for name, copy in self.copies.items()})
        return app

    def restore(self, path: Path, params: dict[str, torch.nn.Parameter]) -> dict[str, Any]:
        """Load checkpoint `path` (either format, written under any world size) in place; returns its state
        (iteration, config fingerprint)."""
        if is_sharded_checkpoint(path):
            app = self._sharded()
            state = load_sharded_checkpoint(path, app)  # in place; DCP reshards to this world size
            dist.load_state(self.model, self.optimizer, app["model"], app["optimizer"], full=False)
            self.scheduler.load_state_dict(app["scheduler"])
            return state
        ckpt = load_checkpoint(path)
        missing = set(params) - set(ckpt["model"])
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks weights {sorted(missing)[:3]}...: it is from "
                                  f"another model configuration")
        dist.load_state(self.model, self.optimizer, ckpt["model"], ckpt["optimizer"]["optimizer"], full=True)
        self.scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
        for name, copy in self.copies.items():
            if ckpt[name] is not None:
                copy.shadow = {n: t.float() for n, t in ckpt[name].items()}
        return ckpt["state"]
