"""The reward interface and registry.

A reward is a callable `reward(images, prompts) -> scores`:
    images: [B, 3, H, W] float in [0, 1] (on any device; the reward moves them where it runs)
    prompts: list of B strings
    scores: [B] float32 tensor on the CPU, higher is better.

A reward that cannot score raises `RewardError` (never returns 0 for a failure); NaN in the scores marks a
single image it could not score. The trainer applies the failure policy (retry, skip the group, abort).

Factories are registered by name in `REWARDS`; configs name them, with keyword arguments. A user reward is
named "package.module:function": that function is the reward itself, called as
`function(images, prompts, **args)`. `build_reward` resolves both kinds.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence

import torch

from mixgrpo.registry import Registry


class RewardError(RuntimeError):
    """A reward could not score a batch (model failure, unreachable endpoint, ...)."""


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


REWARDS: Registry[RewardFn] = Registry("reward")


def build_reward(name: str, args: dict[str, Any] | None = None) -> RewardFn:
    """A ready reward from a registered factory name or a user "package.module:function" reward."""
    args = dict(args or {})
    target = REWARDS.get(name)
    if ":" in name and name not in REWARDS.names():
        return functools.partial(target, **args)
    try:
        return target(**args)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: arguments {args} do not fit its factory: {e}") from None
