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
from mixgrpo.config import MOVED_KEYS, RESUMABLE_CHANGES, TrainConfig, config_diff, migrate, to_dict, without_keys
from mixgrpo.rundir import CONFIG
from mixgrpo.runfiles import PROMPT_FIELDS, identities, mismatches, without_paths
from mixgrpo.train.weights import EMA


def fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What a resumed run must share with the original, as a checkpoint's state.json records it: "config", the
    config without the settings a resume may change (`RESUMABLE_CHANGES`: its length, logging, paths, precision),
    "files", the identity of every file it reads (`mixgrpo.runfiles`): a run that moved resumes once told where its
    files are, a run pointed at other files does not."""
    files = identities(to_dict(cfg))
    d = without_keys(to_dict(cfg), RESUMABLE_CHANGES)
    d["rollout"]["prompts_per_iteration"] *= dist.world_size()  # the global batch: a resume may change the world size
    return {"config": without_paths(json.loads(json.dumps(d))), "files": files}


def recorded_fingerprint(recorded: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's fingerprint in today's config layout: one written before the config had sections records flat
    keys (`mixgrpo.config.migrate`) and its prompt files under their old names."""
    out = {**recorded, "config": migrate(recorded.get("config") or {})}
    if "files" in recorded:
        moved = {old: new for old, new in MOVED_KEYS.items() if new in PROMPT_FIELDS}
        out["files"] = {moved.get(field, field): value for field, value in recorded["files"].items()}
    return out


def check_resumable(checkpoint: Path, recorded: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume from a checkpoint of another configuration or other files (`fingerprint`s: the recorded
    one of `checkpoint`'s state.json and this launch's), naming the differences and the fix. A different global
    batch alone (another world size) gets the rollout.prompts_per_iteration that restores it. A checkpoint written before
    files were identified (it records their paths as config values) is compared without its paths."""
    recorded = recorded_fingerprint(recorded)
    old, new = without_paths(recorded["config"]), current["config"]
    changed = config_diff(old, new)
    world = dist.world_size()
    before, now = old.get("rollout", {}).get("prompts_per_iteration"), new["rollout"]["prompts_per_iteration"]
    if changed and all(c.startswith("rollout.prompts_per_iteration:") for c in changed) and isinstance(before, int):
        fix = (f"resume with rollout.prompts_per_iteration={before // world}" if before % world == 0 else
               f"resume on a number of processes that divides {before}")
        raise CheckpointError(f"checkpoint {checkpoint} was trained with {before} prompts per iteration in all "
                              f"(rollout.prompts_per_iteration x processes), this launch has {now} "
                              f"({now // world} x {world} process{'es' if world > 1 else ''}): {fix}")
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint} was written with a different configuration "
                              f"({', '.join(changed[:4])}): resume with the run's own config (`mixgrpo train --out "
                              f"{run_dir} --resume` reads {run_dir / CONFIG}) or start a new out_dir")
    if "files" not in recorded:
        dist.print0(f"note: {checkpoint} predates file identities: the model, cache, prompt and reward files of this "
                    f"launch are not compared with the ones it was trained with")
        return
    differ = mismatches(recorded["files"], current["files"])
    if differ:
        fields = sorted({d.split(":", 1)[0] for d in differ})
        raise CheckpointError(f"checkpoint {checkpoint} was trained with other files ({'; '.join(differ)}): point "
                              f"{' and '.join(fields)} at a copy of the files it was trained with (e.g. `mixgrpo "
                              f"train --out {run_dir} --resume {fields[0]}=PATH`), or start a new out_dir")


class TrainState:
    """The live training state: model, optimizer, scheduler and the weight copies ({"ema": EMA, "sampler":
    EMA}, the ones a run has), saved to and restored from a checkpoint of either format."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, copies: dict[str, EMA]):
        self.model, self.optimizer, self.scheduler, self.copies = model, optimizer, scheduler, copies

    def save(self, run_dir: Path, iteration: int, identity: dict[str, Any], sharded: bool, keep: int) -> None:
        """Checkpoint (every rank calls it), recording the run's `fingerprint` (`identity`). Full: weights and
        optimizer state gathered to rank 0, which writes them; sharded: every rank writes its shards with
        torch.distributed.checkpoint."""
        state = dict(identity)
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
        (iteration, the run's fingerprint)."""
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
