"""A run's rewards: building the set (labels, weights), scoring groups under the failure policy, advantages.

A reward is scored in-process, or by a reward server (`server:` in its config; `mixgrpo.rewards.remote`), which
scores all the rewards of the run it hosts in one request per batch.

The failure policy (docs/reliability.md): a call that raises a transient error is retried with backoff, then its
images get NaN; a group with any non-finite score gets zero advantages and counts as failed; more than
`scoring.max_failed_groups` of an iteration's groups failing stops the run. A failure is never scored 0.

Used by the trainer, by `mixgrpo eval` and by the benchmarks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from mixgrpo import dist
from mixgrpo.config import ConfigError, RewardConfig, ScoringConfig
from mixgrpo.grpo import combine_rewards
from mixgrpo.rewards.base import RewardError, build_reward, call_reward

if TYPE_CHECKING:
    from mixgrpo.rewards.remote import ServerScorer

TRANSIENT_ERRORS = (RewardError, TimeoutError, ConnectionError)
"""Reward failures worth retrying. Anything else (a TypeError, a prompt the reward cannot parse) is a bug or
bad input that a retry cannot fix: it propagates at once."""


class Reward(NamedTuple):
    label: str  # unique within a run: "verifier", "verifier_strict", "verifier_2", ...
    weight: float  # 0 = logged only
    fn: Callable | None  # None on ranks that score nothing (parallel.rewards_on: rank0)


def reward_labels(specs: list[RewardConfig]) -> list[str]:
    """The unique labels of `specs`: the name (after a user reward's ':'), then _SCORE for a non-dense score, then
    _2, _3 for repeats. A reward server labels what it hosts the same way."""
    out, seen = [], {}
    for spec in specs:
        base = spec.name.split(":")[-1]
        if spec.args.get("score") and spec.args["score"] != "dense":
            base = f"{base}_{spec.args['score']}"
        seen[base] = seen.get(base, 0) + 1
        out.append(base if seen[base] == 1 else f"{base}_{seen[base]}")
    return out


def server_scorers(specs: list[RewardConfig], labels: list[str],
                   servers: ScoringConfig) -> list[ServerScorer]:
    """One scorer per server (a URL or a list of replicas) for the rewards of `specs` that name one."""
    from mixgrpo.rewards.remote import ServerScorer, token_from

    grouped: dict[tuple[str, ...], dict] = {}
    for spec, label in zip(specs, labels):
        if spec.servers:
            grouped.setdefault(tuple(spec.servers), {})[label] = (spec.name, spec.args, spec.frames)
    token = token_from(servers.server_token_env) if grouped else None
    return [ServerScorer(urls, group, servers.server_timeout, token, servers.server_images)
            for urls, group in grouped.items()]


def build_rewards(specs: list[RewardConfig], build: bool = True,
                  servers: ScoringConfig | None = None) -> list[Reward]:
    """The rewards of `specs`, labelled by `reward_labels`; a reward with `server:` scores through that server
    (`servers` sets how). build=False gives the labels and weights with fn None (ranks that score nothing)."""
    labels = reward_labels(specs)
    remote = {}
    if build:
        for scorer in server_scorers(specs, labels, servers or ScoringConfig()):
            remote.update({label: _one_label(scorer, label) for label in scorer.labels})
    out = [Reward(label, spec.weight, (remote.get(label) or build_reward(spec.name, spec.args, spec.frames))
                  if build else None) for spec, label in zip(specs, labels)]
    if all(r.weight == 0 for r in out):
        raise ConfigError("every reward has weight 0: give at least one reward a non-zero weight")
    return out


def _one_label(scorer: ServerScorer, label: str) -> Callable:
    """reward(images, prompts[, seeds]) -> [B]: the scores of `label` alone from `scorer`; NaN where unscored."""

    def reward(images: torch.Tensor, prompts: list[str], seeds: list[int] | None = None,
               inputs: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if inputs is None else {"inputs": inputs}
        return scorer(images, prompts, seeds, only=[label], **extra)[0][label]

    reward.takes_seeds = True
    reward.takes_inputs = bool(getattr(scorer, "takes_inputs", False))
    return reward


class LocalScorer:
    """An in-process reward as a scorer: __call__(images, prompts, seeds, inputs) -> ({label: [B]}, {label: None})."""

    def __init__(self, label: str, fn: Callable):
        self.labels, self.fn, self.where = [label], fn, "in-process"

    def __call__(self, images: torch.Tensor, prompts: list[str], seeds: list[int] | None = None,
                 inputs: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
        return {self.labels[0]: call_reward(self.fn, images, prompts, seeds, inputs)}, {self.labels[0]: None}


class Retrying:
    """A scorer (`LocalScorer`, `mixgrpo.rewards.remote.ServerScorer`) under the failure policy. A call that raises
    one of TRANSIENT_ERRORS (a reward's own timeout included) or returns another number of scores than images is
    retried `retries` times with backoff; if it still fails, a warning naming the scorer is printed and every image
    gets NaN for each of its rewards, which the caller counts as failed groups. NaN/inf scores are not retried (the
    reward's verdict on those images).

    __call__(images, prompts, seeds, inputs) -> ({label: [B] float32 on the CPU}, {label: why some are NaN, or None});
    inputs (the examples' input images, [B, 3, H, W]) go to the scorer only when given."""

    def __init__(self, scorer: Callable, retries: int):
        self.scorer, self.retries = scorer, retries
        self.labels, self.where = scorer.labels, scorer.where

    def __call__(self, images: torch.Tensor, prompts: list[str], seeds: list[int] | None = None,
                 inputs: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
        error = ""
        extra = {} if inputs is None else {"inputs": inputs}
        for attempt in range(self.retries + 1):
            try:
                scores, notes = self.scorer(images, prompts, seeds, **extra)
                scores = {label: torch.as_tensor(scores[label], dtype=torch.float32).flatten().cpu()
                          for label in self.labels}
                for label, s in scores.items():
                    if s.numel() != len(prompts):
                        raise RewardError(f"{label} returned {s.numel()} scores for {len(prompts)} images")
            except TRANSIENT_ERRORS as e:
                error = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(min(0.1 * 2.0**attempt, 2.0))
                continue
            errors = {}
            for label, s in scores.items():
                bad = int((~torch.isfinite(s)).sum())
                errors[label] = notes.get(label) or (f"{bad} of {s.numel()} scores were NaN or inf" if bad else None)
            return scores, errors
        where = "" if self.where == "in-process" else f" at {self.where}"
        dist.print0(f"warning: reward {', '.join(map(repr, self.labels))}{where} failed after {self.retries + 1} "
                    f"attempts ({error}); its images are scored NaN and their groups skipped")
        return ({label: torch.full((len(prompts),), float("nan")) for label in self.labels},
                {label: error if self.where in error else f"{error}{where}" for label in self.labels})


class RetryingReward:
    """One reward under the failure policy (`Retrying`), as reward(images, prompts[, inputs=]) -> [B]; `last_error`
    keeps the reason of the latest call's failure or non-finite scores (None when clean)."""

    def __init__(self, label: str, fn: Callable, retries: int):
        self.label, self.retrying = label, Retrying(LocalScorer(label, fn), retries)
        self.last_error: str | None = None
        self.takes_inputs = bool(getattr(fn, "takes_inputs", False))

    def __call__(self, images: torch.Tensor, prompts: list[str], inputs: torch.Tensor | None = None) -> torch.Tensor:
        scores, errors = self.retrying(images, prompts, inputs=inputs)
        self.last_error = errors[self.label]
        return scores[self.label]


def score_groups(rewards: list[Reward], images: torch.Tensor, prompts: list[str],
                 group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Score B images with every reward -> ({label: [P, G]}, failed [P] bool): a group fails when any of
    its images got a NaN or infinite score from any reward."""
    num_prompts = len(prompts) // group_size
    return failed_groups({r.label: r.fn(images, prompts).view(num_prompts, group_size) for r in rewards})


def failed_groups(scores: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({label: [P, G]}, failed [P]): a group fails when any of its images has a NaN or infinite score."""
    failed = torch.zeros(next(iter(scores.values())).shape[0], dtype=torch.bool)
    for s in scores.values():
        failed |= ~torch.isfinite(s).all(1)
    return scores, failed


class RewardSet:
    """The rewards of a training run under the failure policy.

    rewards: every reward (label, weight, reward(images, prompts) -> [B]), for the held-out evaluation on rank 0;
    weights: {label: weight} of the trained ones (weight != 0), in config order;
    scorers: what scores a training batch: one `Retrying` per in-process reward, and one per reward server for
    every reward it hosts (one request per server and batch).
    rank0_only (parallel.rewards_on: rank0): only rank 0 builds the in-process reward models, and `score` gathers
    the training images of every rank there (`dist.on_rank0`); a reward server is asked by every rank.
    """

    def __init__(self, specs: list[RewardConfig], retries: int, rank0_only: bool,
                 servers: ScoringConfig | None = None):
        labels = reward_labels(specs)
        servers = servers or ScoringConfig()
        self.scorers = [Retrying(s, retries) for s in server_scorers(specs, labels, servers)]
        # the evaluation's own clients: what they score is not the training's (`served`)
        remote = {label: s for s in server_scorers(specs, labels, servers) for label in s.labels}
        self.rewards = []
        build = not rank0_only or dist.is_main()
        for spec, label in zip(specs, labels):
            if label in remote:
                fn = _one_label(remote[label], label)
            else:
                fn = build_reward(spec.name, spec.args, spec.frames) if build else None
                self.scorers.append(Retrying(LocalScorer(label, _on_rank0(fn) if rank0_only else fn), retries))
            self.rewards.append(Reward(label, spec.weight, RetryingReward(label, fn, retries)))
        if all(r.weight == 0 for r in self.rewards):
            raise ConfigError("every reward has weight 0: give at least one reward a non-zero weight")
        self.weights = {r.label: r.weight for r in self.rewards if r.weight != 0}
        self.remote = {label: s.where for s in self.scorers if s.where != "in-process" for label in s.labels}

    def functions(self) -> list[tuple[str, Callable]]:
        """[(label, fn)] of every reward, weight 0 included (what `mixgrpo.evaluate` takes)."""
        return [(r.label, r.fn) for r in self.rewards]

    def score(self, images: torch.Tensor, prompts: list[str], group_size: int, seeds: list[int] | None = None,
              inputs: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, str]]:
        """This rank's images [B, 3, H, W] (seeds: one per image, for rewards that draw; inputs [B, 3, H, W]: each
        sample's input image, for rewards that take them) -> ({label: [P, G]}, failed [P], {label: why some of its
        scores are NaN}) (`failed_groups`)."""
        num_prompts = len(prompts) // group_size
        scores, errors = {}, {}
        for scorer in self.scorers:
            got, notes = scorer(images, prompts, seeds, inputs)
            scores.update({label: s.view(num_prompts, group_size) for label, s in got.items()})
            errors.update({label: e for label, e in notes.items() if e})
        scores = {r.label: scores[r.label] for r in self.rewards}  # config order
        return (*failed_groups(scores), errors)

    def served(self) -> dict[str, int]:
        """{URL: images} scored by each reward server since the last call."""
        out: dict[str, int] = {}
        for scorer in self.scorers:
            counts = getattr(scorer.scorer, "served", None)
            if counts:
                for url, n in counts.items():
                    out[url] = out.get(url, 0) + n
                counts.clear()
        return out

    def failure(self, failed_all: torch.Tensor, max_failed: float, iteration: int,
                errors: dict[str, str]) -> str | None:
        """Why the run must stop when more than `max_failed` of the iteration's groups (failed_all: [P x ranks]
        bool) failed to get rewards, naming each reward's error (`errors`, from `score`); None otherwise."""
        if failed_all.float().mean().item() <= max_failed:
            return None
        reasons = "; ".join(f"{label}: {e}" for label, e in errors.items())
        return (f"{int(failed_all.sum())} of {failed_all.numel()} groups failed to get rewards at iteration "
                f"{iteration + 1} (limit: scoring.max_failed_groups = {max_failed}); "
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


def _on_rank0(fn: Callable | None) -> Callable:
    """fn(images, prompts, seeds, inputs) gathered to rank 0 (`dist.on_rank0`): each image's prompt, seed and input
    image (None when there are none) travel beside it."""

    def score(x: torch.Tensor, items: list) -> torch.Tensor:
        prompts, seeds, inputs = zip(*items)
        return call_reward(fn, x, list(prompts), None if seeds[0] is None else list(seeds),
                           None if inputs[0] is None else torch.stack(inputs).to(x.device))

    gathered = dist.on_rank0(None if fn is None else score)

    def reward(images: torch.Tensor, prompts: list[str], seeds: list[int] | None = None,
               inputs: torch.Tensor | None = None) -> torch.Tensor:
        n = len(prompts)
        return gathered(images, list(zip(prompts, seeds if seeds is not None else [None] * n,
                                         inputs.cpu() if inputs is not None else [None] * n)))

    reward.takes_seeds = True
    reward.takes_inputs = True  # passes them on when given; the wrapped reward takes them or not (`call_reward`)
    return reward


def score_metrics(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """reward/LABEL (mean) and reward/LABEL_std over the finite scores of every rank's images."""
    out = {}
    for label, s in scores.items():
        s_all = dist.all_gather_cat(s)
        out[f"reward/{label}"] = float(torch.nanmean(s_all))
        out[f"reward/{label}_std"] = float(s_all[torch.isfinite(s_all)].std()) if s_all.numel() > 1 else 0.0
    return out
