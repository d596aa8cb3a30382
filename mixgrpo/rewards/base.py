"""The reward interface and registry.

A reward is a callable `reward(images, prompts) -> scores`:
    images: [B, 3, H, W] float in [0, 1] (on any device; the reward moves them where it runs), or videos
            [B, F, 3, H, W] (F frames)
    prompts: list of B strings
    scores: [B] float32 tensor on the CPU, higher is better.

Videos: a reward that scores whole videos says so with a true `scores_videos` attribute (the temporal reward);
any other reward is an image reward and `build_reward` applies it to every frame, then aggregates the F scores of
a video (`FRAME_AGGREGATIONS`: mean by default, `frames:` of the reward's config), so that every image reward
scores videos with no change.

A reward that cannot score raises `RewardError` (never returns 0 for a failure); NaN in the scores marks a
single image it could not score. The trainer applies the failure policy (retry, skip the group, abort).

A reward that draws random numbers (a VLM judge sampling its answer) says so with a true `takes_seeds` attribute and
is called as `reward(images, prompts, seeds=...)`, one integer per image derived from (seed, iteration, image index)
(`mixgrpo.seeding.reward_seeds`), so that a rerun asks the same questions with the same seeds; `call_reward` does it.

A reward that compares the result with the example's input image (an editing model's source image, an image-to-video
model's conditioning frame) says so with a true `takes_inputs` attribute and is called as
`reward(images, prompts, inputs=...)`, inputs [B, 3, H, W] in [0, 1]: each sample's first input image at the result's
size (`call_reward` does it; a video reward that scores frames gets the input beside every frame).

Factories are registered by name in `REWARDS` (`@REWARDS.register("name", modules=(...))`: modules names the Python
packages beyond the core that the reward imports, which the pre-flight checks before a run loads anything); configs
name them, with keyword arguments. A user reward is
named "package.module:function": that function is the reward itself, called as
`function(images, prompts, **args)`. `build_reward` resolves both kinds.
"""

from __future__ import annotations

import inspect
import reprlib
from typing import Any, Callable, Protocol, Sequence

import torch

from mixgrpo.errors import ConfigError, UserError
from mixgrpo.registry import Registry


class RewardError(UserError, RuntimeError):
    """A reward could not score a batch (model failure, unreachable endpoint, ...)."""


class RewardFn(Protocol):
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


REWARDS: Registry[RewardFn] = Registry("reward")


def call_reward(fn: RewardFn, images: torch.Tensor, prompts: Sequence[str],
                seeds: Sequence[int] | None = None, inputs: torch.Tensor | None = None) -> torch.Tensor:
    """fn(images, prompts), with `seeds` (one per image) passed on to a reward that takes them, and `inputs`
    ([B, 3, H, W], each sample's input image) to a reward that compares with them (`takes_inputs`)."""
    kwargs = {}
    if seeds is not None and getattr(fn, "takes_seeds", False):
        kwargs["seeds"] = seeds
    if getattr(fn, "takes_inputs", False):
        kwargs["inputs"] = inputs
    return fn(images, prompts, **kwargs)


class UserReward:
    """A user reward `function(images, prompts, **args)`, checked when it is built (a function that accepts
    these arguments) and at every call (one number per image), so that a mistake in it is named as such."""

    def __init__(self, name: str, fn: Callable, args: dict[str, Any]):
        if not callable(fn):
            raise ConfigError(f"reward {name!r} is {type(fn).__name__} {repr(fn)[:40]}, not a function: name a "
                              f"function f(images, prompts, **args) that returns one score per image")
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some builtins have none: nothing to check
            signature = None
        if signature is not None:
            try:
                signature.bind(None, None, **args, **({"inputs": None} if getattr(fn, "takes_inputs", False) else {}))
            except TypeError as e:
                raise ConfigError(f"reward {name!r}: arguments {args} do not fit {fn.__name__}{signature}: {e}; "
                                  f"a user reward is called as f(images, prompts, **args) (and inputs= when it says "
                                  f"takes_inputs)") from None
        self.name, self.fn, self.args = name, fn, args
        self.scores_videos = bool(getattr(fn, "scores_videos", False))  # a user video reward gets videos whole
        self.takes_seeds = bool(getattr(fn, "takes_seeds", False))
        self.takes_inputs = bool(getattr(fn, "takes_inputs", False))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
        extra = {k: v for k, v in (("seeds", seeds), ("inputs", inputs)) if v is not None}
        out = self.fn(images, prompts, **self.args, **extra)
        try:
            return torch.as_tensor(out, dtype=torch.float32).flatten()
        except (TypeError, ValueError, RuntimeError):
            what = type(out).__name__
            if isinstance(out, (list, tuple)) and out:
                what += f" of {type(out[0]).__name__}"
            raise ConfigError(f"reward {self.name!r} returned {what} {reprlib.repr(out)}, not numbers: a reward "
                              f"returns one float score per image (a tensor, array or list of {len(prompts)} "
                              f"numbers)") from None


def check_batch(name: str, images: torch.Tensor, prompts: Sequence[str] | None = None) -> None:
    """Raise ValueError unless `images` is [B, 3, H, W] and `prompts` (when given) has B entries; `name`
    (the reward's, or "") prefixes the message."""
    prefix = f"{name}: " if name else ""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{prefix}expected images of shape [B, 3, H, W], got {tuple(images.shape)}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise ValueError(f"{prefix}{images.shape[0]} images but {len(prompts)} prompts")


FRAME_AGGREGATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda s: s.mean(1),
    "min": lambda s: s.amin(1),  # a video is as good as its worst frame
    "max": lambda s: s.amax(1),
    "median": lambda s: s.median(1).values,
}
"""How the per-frame scores [B, F] of an image reward become one score per video [B]. NaN (a frame that could not
be scored) makes the video's score NaN under each of them, so a failed frame is never averaged away."""


class PerFrame:
    """An image reward applied to videos: each of the F frames of a video is scored with the video's prompt (and,
    for a reward that takes inputs, the video's input image: its conditioning frame), the F scores are aggregated by
    FRAME_AGGREGATIONS[frames]. Images [B, 3, H, W] go to the reward unchanged."""

    def __init__(self, fn: RewardFn, frames: str = "mean"):
        if frames not in FRAME_AGGREGATIONS:
            raise ConfigError(f"frames = {frames!r} is not a frame aggregation: use one of "
                              f"{sorted(FRAME_AGGREGATIONS)}")
        self.fn, self.frames = fn, frames

    def __getattr__(self, name: str):  # the wrapped reward's own attributes (check(), ...) stay reachable
        return getattr(self.__dict__["fn"], name) if "fn" in self.__dict__ else super().__getattribute__(name)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], seeds: Sequence[int] | None = None,
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
        if images.dim() != 5:
            return call_reward(self.fn, images, prompts, seeds, inputs)
        b, f = images.shape[:2]
        frame_seeds = None if seeds is None else [s for s in seeds for _ in range(f)]  # a video's frames share its seed
        frame_inputs = None if inputs is None else inputs.repeat_interleave(f, dim=0)  # [B * F, 3, H, W]
        scores = torch.as_tensor(call_reward(self.fn, images.flatten(0, 1), [p for p in prompts for _ in range(f)],
                                             frame_seeds, frame_inputs), dtype=torch.float32).flatten().cpu()
        if scores.numel() != b * f:
            raise RewardError(f"returned {scores.numel()} scores for the {b * f} frames of {b} videos")
        return FRAME_AGGREGATIONS[self.frames](scores.view(b, f))


def build_reward(name: str, args: dict[str, Any] | None = None, frames: str = "mean") -> RewardFn:
    """A ready reward from a registered factory name or a user "package.module:function" reward. An image reward
    scores videos frame by frame, aggregated by `frames` (FRAME_AGGREGATIONS); a video reward (`scores_videos`)
    gets the videos whole."""
    args = dict(args or {})
    target = REWARDS.get(name)
    if ":" in name and name not in REWARDS.names():
        fn = UserReward(name, target, args)
    else:
        try:
            fn = target(**args)
        except TypeError as e:
            raise ConfigError(f"reward {name!r}: arguments {args} do not fit its factory: {e}") from None
    if not getattr(fn, "scores_videos", False):
        return PerFrame(fn, frames)
    if frames != "mean":  # the default: a video reward gets no aggregation, so any other value is a mistake
        raise ConfigError(f"frames = {frames!r} does not apply to reward {name!r}: it scores whole videos, not frame "
                          f"by frame; drop frames (it aggregates the frame scores of an image reward)")
    return fn
