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

import inspect
import reprlib
from typing import Any, Callable, Protocol, Sequence

import torch

from mixgrpo.registry import Registry


class RewardError(RuntimeError):
    """A reward could not score a batch (model failure, unreachable endpoint, ...)."""


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


REWARDS: Registry[RewardFn] = Registry("reward")


class UserReward:
    """A user reward `function(images, prompts, **args)`, checked when it is built (a function that accepts
    these arguments) and at every call (one number per image), so that a mistake in it is named as such."""

    def __init__(self, name: str, fn: Callable, args: dict[str, Any]):
        if not callable(fn):
            raise ValueError(f"reward {name!r} is {type(fn).__name__} {repr(fn)[:40]}, not a function: name a function "
                             f"f(images, prompts, **args) that returns one score per image")
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have none: nothing to check
            signature = None
        if signature is not None:
            try:
                signature.bind(None, None, **args)
            except TypeError as e:
                raise ValueError(f"reward {name!r}: arguments {args} do not fit {fn.__name__}{signature}: {e}; "
                                 f"a user reward is called as f(images, prompts, **args)") from None
        self.name, self.fn, self.args = name, fn, args

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        out = self.fn(images, prompts, **self.args)
        try:
            return torch.as_tensor(out, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            what = type(out).__name__
            if isinstance(out, (list, tuple)) and out:
                what += f" of {type(out[0]).__name__}"
            raise ValueError(f"reward {self.name!r} returned {what} {reprlib.repr(out)}, not numbers: a reward returns "
                             f"one float score per image (a tensor, array or list of {len(prompts)} numbers)") from None


def check_batch(name: str, images: torch.Tensor, prompts: Sequence[str] | None = None) -> None:
    """Raise ValueError unless `images` is [B, 3, H, W] and `prompts` (when given) has B entries; `name`
    (the reward's, or "") prefixes the message."""
    prefix = f"{name}: " if name else ""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{prefix}expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"{prefix}{images.shape[0]} images but {len(prompts)} prompts")


def build_reward(name: str, args: dict[str, Any] | None = None) -> RewardFn:
    """A ready reward from a registered factory name or a user "package.module:function" reward."""
    args = dict(args or {})
    target = REWARDS.get(name)
    if ":" in name and name not in REWARDS.names():
        return UserReward(name, target, args)
    try:
        return target(**args)
    except TypeError as e:
        raise ValueError(f"reward {name!r}: arguments {args} do not fit its factory: {e}") from None
