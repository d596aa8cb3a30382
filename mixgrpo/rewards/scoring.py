"""A run's rewards: building the set (labels, weights), scoring groups under the failure policy, advantages.

The failure policy (docs/reliability.md): a call that raises a transient error is retried with backoff, then its
images get NaN; a group with any non-finite score gets zero advantages and counts as failed; more than
`reward_policy.max_failed_groups` of an iteration's groups failing stops the run. A failure is never scored 0.

Used by the trainer, by `mixgrpo eval` and by the benchmarks.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import torch

from mixgrpo import dist
from mixgrpo.config import ConfigError, RewardConfig
from mixgrpo.grpo import combine_rewards
from mixgrpo.rewards.base import RewardError, build_reward

TRANSIENT_ERRORS = (RewardError, TimeoutError, ConnectionError)
"""Reward failures worth retrying. Anything else (a TypeError, a prompt the reward cannot parse) is a bug or
bad input that a retry cannot fix: it propagates at once."""


class Reward(NamedTuple):
    label: str  # unique within a run: "verifier", "verifier_strict", "verifier_2", ...
    weight: float  # 0 = logged only
    fn: Callable | None  # None on ranks that score nothing (parallel.rewards_on: rank0)


def build_rewards(specs: list[RewardConfig], build: bool = True) -> list[Reward]:
    """The rewards of `specs`, labelled uniquely (name, then _SCORE for a non-dense score, then _2, _3 for
    repeats). build=False gives the labels and weights with fn None (ranks that score nothing)."""
    out, seen = [], {}
    for spec in specs:
        fn = build_reward(spec.name, spec.args, spec.frames) if build else None
        base = spec.name.split(":")[-1]
        if spec.args.get("score") and spec.args["score"] != "dense":
            base = f"{base}_{spec.args['score']}"
        seen[base] = seen.get(base, 0) + 1
        out.append(Reward(base if seen[base] == 1 else f"{base}_{seen[base]}", spec.weight, fn))
    if all(r.weight == 0 for r in out):
        raise ConfigError("every reward has weight 0: give at least one reward a non-zero weight")
    return out


class RetryingReward:
    """A reward under the failure policy. A call that raises one of TRANSIENT_ERRORS (a reward's own timeout
    included) or returns the wrong number of scores is retried `retries` times with backoff; if it still fails,
    a warning is printed and every image gets NaN, which the caller counts as failed groups. NaN/inf scores
    are not retried (the reward's verdict on those images). `last_error` keeps the reason of the latest
    call's failure or non-finite scores (None when clean), for the abort message."""

    def __init__(self, label: str, fn: Callable, retries: int):
        self.label, self.fn, self.retries = label, fn, retries
        self.last_error: str | None = None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.last_error = None
        for attempt in range(self.retries + 1):
            try:
                result = torch.as_tensor(self.fn(images, prompts), dtype=torch.float32).flatten().cpu()
                if result.numel() != len(prompts):
                    raise RewardError(f"returned {result.numel()} scores for {len(prompts)} images")
            except TRANSIENT_ERRORS as e:
                self.last_error = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(min(0.1 * 2.0**attempt, 2.0))
                continue
            bad = int((~torch.isfinite(result)).sum())
            self.last_error = f"{bad} of {result.numel()} scores were NaN or inf" if bad else None
            return result
        dist.print0(f"warning: reward {self.label!r} failed after {self.retries + 1} attempts ({self.last_error}); "
                    f"its images are scored NaN and their groups skipped")
        return torch.full((len(prompts),), float("nan"))


def score_groups(rewards: list[Reward], images: torch.Tensor, prompts: list[str],
                 group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Score B images with every reward -> ({label: [P, G]}, failed [P] bool): a group fails when any of
    its images got a NaN or infinite score from any reward."""
    num_prompts = len(prompts) // group_size
    scores = {r.label: r.fn(images, prompts).view(num_prompts, group_size) for r in rewards}
    failed = torch.zeros(num_prompts, dtype=torch.bool)
    for s in scores.values():
        failed |= ~torch.isfinite(s).all(1)
    return scores, failed


class RewardSet:
    """The rewards of a training run under the failure policy.

    rewards: every reward (label, weight, RetryingReward), for the held-out evaluation on rank 0;
    weights: {label: weight} of the trained ones (weight != 0), in config order.
    rank0_only (parallel.rewards_on: rank0): only rank 0 builds the reward models, and `score` gathers the
    training images of every rank there (`dist.on_rank0`).
    """

    def __init__(self, specs: list[RewardConfig], retries: int, rank0_only: bool):
        built = build_rewards(specs, build=not rank0_only or dist.is_main())
        self.rewards = [Reward(r.label, r.weight, RetryingReward(r.label, r.fn, retries)) for r in built]
        self._scored = self.rewards if not rank0_only else [r._replace(fn=dist.on_rank0(r.fn)) for r in self.rewards]
        self.weights = {r.label: r.weight for r in self.rewards if r.weight != 0}

    def functions(self) -> list[tuple[str, Callable]]:
        """[(label, fn)] of every reward, weight 0 included (what `mixgrpo.evaluate` takes)."""
        return [(r.label, r.fn) for r in self.rewards]

    def score(self, images: torch.Tensor, prompts: list[str],
              group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """This rank's images [B, 3, H, W] -> ({label: [P, G]}, failed [P]) (`score_groups`)."""
        return score_groups(self._scored, images, prompts, group_size)

    def failure(self, failed_all: torch.Tensor, max_failed: float, iteration: int) -> str | None:
        """Why the run must stop when more than `max_failed` of the iteration's groups (failed_all: [P x ranks]
        bool) failed to get rewards, naming each reward's last error; None otherwise."""
        if failed_all.float().mean().item() <= max_failed:
            return None
        reasons = "; ".join(f"{r.label}: {r.fn.last_error}" for r in self.rewards if r.fn.last_error)
        return (f"{int(failed_all.sum())} of {failed_all.numel()} groups failed to get rewards at iteration "
                f"{iteration + 1} (limit: reward_policy.max_failed_groups = {max_failed}); "
                f"{reasons or 'NaN or inf scores'}. Fix the reward (model path, endpoint, binary), then resume")

    def advantages(self, scores: dict[str, torch.Tensor], failed: torch.Tensor, mode: str, std: str,
                   clip: float) -> torch.Tensor:
        """Advantages [P, G] of this rank's groups from their scores ({label: [P, G]}), fused over the trained
        rewards (`mixgrpo.grpo.combine_rewards`). A non-finite score counts 0 in the fusion and its group
        (failed [P]) gets zero advantages. std "global" normalises over the groups of every rank."""
        finite = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in scores.items()
                  if k in self.weights}
        if std == "global":
            everyone = {k: dist.all_gather_cat(v) for k, v in finite.items()}
            P = failed.shape[0]
            advantages = combine_rewards(everyone, self.weights, mode, std="global", clip=clip)
            advantages = advantages[dist.rank() * P:(dist.rank() + 1) * P]
        else:
            advantages = combine_rewards(finite, self.weights, mode, clip=clip)
        return advantages.masked_fill(failed[:, None], 0.0)


def score_metrics(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """reward/LABEL (mean) and reward/LABEL_std over the finite scores of every rank's images."""
    out = {}
    for label, s in scores.items():
        s_all = dist.all_gather_cat(s)
        out[f"reward/{label}"] = float(torch.nanmean(s_all))
        out[f"reward/{label}_std"] = float(s_all[torch.isfinite(s_all)].std()) if s_all.numel() > 1 else 0.0
    return out
