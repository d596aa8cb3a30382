"""What stops a run, and how: errors, the guards that raise them, signals, the time limit, the model clock.

Every stop is agreed by all ranks (`any_rank`), so they all leave the loop at the same iteration. A guard stops
the run before anything non-finite is logged or saved; a signal or the time limit stops it after a checkpoint,
resumable with --resume. docs/reliability.md describes each case.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import torch

from mixgrpo import dist
from mixgrpo.errors import UserError
from mixgrpo.rundir import read_metrics


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (too many failed rewards, non-finite loss, ...); the message says why."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT stopped the run after a checkpoint; `--resume` continues it. The CLI exits 128 + signum
    (143 for SIGTERM, 130 for SIGINT), so a job scheduler sees an unfinished run, not a success."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (so that all ranks stop at the same point)."""
    return dist.all_reduce_mean(torch.tensor([float(flag)], device=dist.device())).item() > 0


# --------------------------------------------------------------------------------------------------
# signals and the time limit


class StopRequest:
    """Turns SIGTERM/SIGINT into a flag: the loop finishes the iteration, checkpoints and exits. A second signal
    stops at once, unless it comes within `echo_s` seconds of the first: that is the same stop delivered twice
    (Ctrl-C reaches a torchrun worker from the terminal and again forwarded by the launcher)."""

    def __init__(self, echo_s: float = 2.0):
        self.signal: int | None = None
        self.echo_s, self._at = echo_s, 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            if time.monotonic() - self._at < self.echo_s:
                return
            raise KeyboardInterrupt  # second signal: stop now
        self.signal, self._at = signum, time.monotonic()
        dist.print0(f"\nreceived {signal.Signals(signum).name}: stopping at the next safe point (after the rollout, "
                    f"the rewards, the update or within the evaluation), then checkpointing")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stopped(self, message: str, saved: bool = True) -> TrainingStopped:
        """The exception that ends a signalled run, after its checkpoint (`saved`; else nothing needed one)."""
        signum = self.signal or signal.SIGTERM
        return TrainingStopped(f"{signal.Signals(signum).name}: {'checkpoint saved, ' * saved}{message}", signum)


def stop_signalled(stop: StopRequest | None) -> bool:
    """Whether any rank got SIGTERM/SIGINT (a collective: every rank calls it at the same point); False without
    a StopRequest."""
    return stop is not None and any_rank(stop.signal is not None)


class TimeLimit:
    """The run's wall clock since the first iteration of this launch; `minutes` = 0 is no limit."""

    def __init__(self, minutes: float):
        self.minutes, self.start = minutes, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def reached(self) -> bool:
        return self.minutes > 0 and self.elapsed() >= 60 * self.minutes

    def eta(self, done: int, left: int) -> float:
        """Seconds until the end: `left` iterations at the mean pace of the `done` ones, capped by the limit."""
        eta = self.elapsed() / done * left
        return max(0.0, min(eta, 60 * self.minutes - self.elapsed())) if self.minutes > 0 else eta


def agreed_stops(stop: StopRequest, limit: TimeLimit) -> tuple[bool, bool]:
    """(signalled, out of time) as every rank sees it: true when any rank got the signal or ran out of time."""
    flags = dist.all_reduce_mean(torch.tensor([float(stop.signal is not None), float(limit.reached())],
                                              device=dist.device()))
    return flags[0].item() > 0, flags[1].item() > 0


# --------------------------------------------------------------------------------------------------
# the model clock


class Stopwatch:
    """Wall-clock seconds of the phases of one iteration, from its creation: lap(name) ends phase `name`."""

    def __init__(self):
        self.start = self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase], self._last = now - self._last, now

    def metrics(self) -> dict[str, float]:
        """time/PHASE for every phase, then time/iteration (from the start to the last lap)."""
        return {**{f"time/{p}": s for p, s in self.laps.items()}, "time/iteration": self._last - self.start}


class ModelClock:
    """Counts model calls and the seconds spent inside them (forward via hooks; the trainer adds backward), per
    phase of an iteration: reset() starts counting, lap(name) ends phase `name`.

    On CUDA each call is synchronised so that the time is the kernel time: enabled by `run.profile: true` only.
    """

    def __init__(self, model: torch.nn.Module, sync: bool):
        self.calls, self.seconds, self._start, self.sync = 0, 0.0, 0.0, sync
        self.laps: dict[str, tuple[int, float]] = {}
        model.register_forward_pre_hook(lambda *a: self._begin())
        model.register_forward_hook(lambda *a: self._end(count=True))

    def _begin(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _end(self, count: bool) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start
        self.calls += int(count)

    @contextlib.contextmanager
    def measure(self):
        """Time a block (the backward pass) as model time without counting a call."""
        self._begin()
        yield
        self._end(count=False)

    def reset(self) -> None:
        self.calls, self.seconds = 0, 0.0

    def lap(self, phase: str) -> None:
        self.laps[phase] = (self.calls, self.seconds)
        self.reset()

    def metrics(self) -> dict[str, float]:
        """model_calls/PHASE and time/model_PHASE of every phase."""
        return {**{f"model_calls/{p}": c for p, (c, _) in self.laps.items()},
                **{f"time/model_{p}": s for p, (_, s) in self.laps.items()}}


# --------------------------------------------------------------------------------------------------
# guards: nothing non-finite is saved, and a run without learning signal says so


def _count_non_finite(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(NaN or inf elements, elements) over this rank's part of `tensors` (FSDP: its shards), in one sync."""
    local = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in tensors]
    if not local:
        return 0, 0
    bad = torch.stack([(~torch.isfinite(t)).sum() for t in local]).sum()
    return int(bad), sum(t.numel() for t in local)


def require_finite_weights(tensors: list[torch.Tensor], iteration: int) -> None:
    """Stop after an update that made a weight (or a copy saved with it: EMA, sampling copy) NaN or inf, before
    the iteration is logged or checkpointed: a finite loss and gradient norm do not rule it out (lr = 1e10: the
    step itself overflows)."""
    bad, total = _count_non_finite(tensors)
    if any_rank(bad > 0):
        where = f"{bad:,} of {total:,}" if dist.world_size() == 1 else f"{bad:,} of {total:,} on rank {dist.rank()}"
        raise TrainingError(f"the update of iteration {iteration + 1} made {where} trainable weights NaN or inf; "
                            f"they were not logged or saved (the last checkpoint holds finite weights): lower "
                            f"optim.lr or loss.clip_range, or check the rewards for extreme values")


def require_agreeing_replicas(groups: dict[str, list[torch.Tensor]], iteration: int) -> dict[str, float]:
    """Stop when the data-parallel replicas of the weights have drifted apart, before the iteration is logged or
    checkpointed; returns its metrics (`replicas/spread`, exactly 0 in a run that goes on, and
    `replicas/checksum_GROUP`, the full weights' sum).

    groups: {"weights": the trainable weights, "ema": ..., "sampler": ...}, each rank's tensors (FSDP: shards).
    Every rank must hold the same replicated weights after an update; ranks that do not (a rank that skipped the
    gradient all-reduce, a model left unwrapped on one rank, a rank-dependent random draw in the update) each
    train their own model and the saved one is rank 0's alone. `dist.replica_checksums` compares them in one
    all-gather; the error names the ranks by the checksum they hold. No-op at world size 1 (one replica).
    """
    if dist.world_size() == 1:
        return {}
    full, replicas = dist.replica_checksums(groups)
    spread = max(max(r[k] for r in rows) - min(r[k] for r in rows) for rows in replicas.values() for k in range(2))
    disagree = []
    for group, rows in replicas.items():
        holders: dict[tuple[float, ...], list[int]] = {}
        for rank, sums in enumerate(rows):
            holders.setdefault(tuple(sums), []).append(rank)
        if len(holders) > 1:
            ranked = sorted(holders.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))  # the most common first
            disagree.append(f"{REPLICA_NAMES.get(group, group)}: " + ", ".join(
                f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} ({sums[0]:.17g}, {sums[1]:.17g})"
                for sums, ranks in ranked))
    if disagree:
        raise TrainingError(f"the replicas disagree after the update of iteration {iteration + 1} (sum, sum of "
                            f"squares of each rank's copy: "
                            + "; ".join(disagree) + "): each rank trains its own model; nothing of this iteration "
                            "was logged or saved. Check that every rank wraps the model and averages its gradients "
                            "(docs/distributed.md)")
    return {"replicas/spread": spread, **{f"replicas/checksum_{g}": v for g, v in full.items()}}


REPLICA_NAMES = {"weights": "trainable weights", "ema": "EMA weights", "sampler": "sampling copy"}


def require_finite_images(images: torch.Tensor, iteration: int) -> None:
    """Stop when a rollout gives NaN or inf pixels (images [B, 3, H, W]): no reward can score them, and
    scoring them as failures would hide a model that has diverged."""
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if any_rank(bad > 0):
        raise TrainingError(f"the rollout of iteration {iteration + 1} gave {bad} of {images.shape[0]} images with "
                            f"NaN or inf pixels{'' if dist.world_size() == 1 else f' on rank {dist.rank()}'}: the "
                            f"model's outputs overflowed (weights grown by a too high lr, or bf16 range); nothing of "
                            f"this iteration was saved: lower optim.lr or loss.clip_range, or use run.precision: fp32")


def warn_without_signal(record: dict[str, Any]) -> None:
    """One warning line for an iteration in which every group's advantages are zero (record: its metrics)."""
    if record["zero_advantage_groups"] == 1.0:
        dist.print0(f"warning: iteration {record['iteration']}: no learning signal: within every group the images "
                    f"got equal rewards (or failed), so every advantage is 0 and the update changes nothing")


def no_signal_message(metrics: list[dict[str, Any]], groups: int | None = None) -> str | None:
    """Why a whole run learned nothing, when no iteration of it had learning signal; else None. The reason is read
    from the records: groups that failed to get rewards (`failed_groups`, of `groups` per iteration when known)
    or groups whose images got equal rewards."""
    if not metrics or any(m.get("zero_advantage_groups", 0.0) < 1.0 for m in metrics):
        return None
    failed = sum(m.get("failed_groups", 0) for m in metrics)
    if groups is not None and failed == groups * len(metrics):
        why = ("every group of every iteration failed to get rewards (scoring.max_failed_groups let the run go "
               "on), so the policy gradient was always 0")
        fix = "fix the reward: the warnings of the run name its errors"
    else:
        some = f"{failed} groups failed to get rewards and " if failed else ""
        why = (f"{some}within every {'other ' * bool(failed)}group the images got equal rewards (a constant or "
               f"saturated reward?), so the policy gradient was always 0")
        fix = "check the reward on the base model's images (mixgrpo eval) and its args"
    return (f"no learning signal in any of the {len(metrics)} iterations: {why}, and final/ is the base model (up to "
            f"weight decay); {fix}")


def require_learning_signal(run_dir: Path, groups: int) -> None:
    """The end-of-run policy (docs/reliability.md): a run in which no iteration had learning signal ends with
    TrainingError (exit 2) after everything is written, so that neither a person nor a job scheduler takes it
    for a success. Every rank calls it; rank 0 reads metrics.jsonl (the whole run, resumed parts included).
    groups: the groups of an iteration, over all ranks."""
    message = no_signal_message(read_metrics(run_dir), groups) if dist.is_main() else None
    if any_rank(message is not None):
        raise TrainingError(message or "no learning signal in any iteration (rank 0 says more)")
