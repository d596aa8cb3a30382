"""The update loop shared by every objective: optimizer steps over shares of the iteration's samples.

An objective supplies `loss_of(u, mb, k, stats)`: the mean loss over the micro-batch `mb` (sample indices) at
term k (a trained step, or a training sigma) for optimizer step u. Within a step the loss is the mean over its
samples and terms, whatever the micro-batch size, so `update.micro_batch_size` changes memory only; gradients are
averaged over ranks before clipping.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from mixgrpo import dist
from mixgrpo.objectives import micro_batches
from mixgrpo.train.control import ModelClock, TrainingError
from mixgrpo.train.weights import EMA

LossOf = Callable[[int, torch.Tensor, int, "UpdateStats"], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class UpdateStats:
    """Sample-weighted sums of the loss statistics of one iteration's update, and what is logged besides."""

    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    onpolicy_ratio_error: float = 0.0
    model_calls: int = 0
    replicas: dict[str, float] = field(default_factory=dict)  # the replica-agreement metrics (world size > 1)

    def add(self, stats: dict[str, torch.Tensor], w: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * w
        self.weight += w

    def note_ratio(self, logp: torch.Tensor, logp_old: torch.Tensor) -> None:
        """On the first optimizer step the weights are the rollout's: record how far exp(logp - logp_old) is
        from 1 (float error only, for a correct re-scoring)."""
        self.onpolicy_ratio_error = max(self.onpolicy_ratio_error,
                                        (logp.detach() - logp_old).abs().max().exp().item() - 1)

    def means(self) -> dict[str, float]:
        out = {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}
        out["grad_norm"] = sum(self.grad_norms) / max(len(self.grad_norms), 1)
        out["onpolicy_ratio_error"] = self.onpolicy_ratio_error
        return out


class UpdateLoop:
    """One optimizer step per share of the trainable `params`, with gradient clipping (grad_clip 0 = none) and
    the EMA after every step; `clock` (run.profile: true) times the backward passes."""

    def __init__(self, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 micro_batch_size: int, grad_clip: float, ema: EMA | None, clock: ModelClock | None):
        self.params, self.optimizer, self.micro_batch_size = params, optimizer, micro_batch_size
        self.grad_clip, self.ema, self.clock = grad_clip, ema, clock

    def run(self, shares: list[torch.Tensor], num_terms: int, loss_of: LossOf, device: torch.device) -> UpdateStats:
        """shares: one index tensor per optimizer step (the samples it sees); num_terms: K loss terms per sample."""
        stats = UpdateStats()
        for u, share in enumerate(shares):
            self.optimizer.zero_grad(set_to_none=True)
            n_share = dist.all_reduce_mean(torch.tensor(float(len(share)))).item() * dist.world_size()
            for mb in micro_batches(share, self.micro_batch_size):
                mb = mb.to(device)
                for k in range(num_terms):
                    loss, step_stats = loss_of(u, mb, k, stats)
                    stats.model_calls += 1
                    if not torch.isfinite(loss):
                        raise TrainingError(f"the loss became {loss.item()} at optimizer step {u}, term {k}: lower "
                                            f"optim.lr or loss.clip_range, or check the rewards for extreme values")
                    weight = len(mb) / (n_share * num_terms)
                    with self.clock.measure() if self.clock is not None else contextlib.nullcontext():
                        (loss * weight * dist.world_size()).backward()
                    stats.add({"loss": loss.detach(), **step_stats}, weight)
            grads = [p for p in self.params.values() if p.grad is not None]
            dist.average_gradients([p.grad for p in grads])
            norm = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip if self.grad_clip > 0 else float("inf"))
            if not torch.isfinite(norm):  # stepping would write NaN into the weights (and the next checkpoint)
                raise TrainingError(f"the gradient norm became {float(norm)} at optimizer step {u}; the weights were "
                                    f"not updated: lower optim.lr or loss.clip_range, or check the rewards for extreme values")
            stats.grad_norms.append(float(norm))
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.params)
        return stats
