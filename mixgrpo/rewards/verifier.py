"""The shapes-world verifier as a reward: the programmatic check of `mixgrpo.world.verifier` per image."""

from __future__ import annotations

from typing import Sequence

import torch

from mixgrpo.rewards.base import REWARDS
from mixgrpo.world.scene import PromptParseError, Scene, parse_prompt
from mixgrpo.world.verifier import verify


class VerifierReward:
    """reward_b = dense_b (fraction of the prompt's requirements met) or strict_b (1 if all are met, else 0).

    Prompts are parsed once and cached; a prompt outside the shapes-world grammar is an error, not a 0.
    """

    def __init__(self, score: str = "dense"):
        if score not in ("dense", "strict"):
            raise ValueError(f"verifier reward: score must be 'dense' or 'strict', got {score!r}")
        self.score = score
        self._scenes: dict[str, Scene] = {}

    def _scene(self, prompt: str) -> Scene:
        if prompt not in self._scenes:
            try:
                self._scenes[prompt] = parse_prompt(prompt)
            except PromptParseError as e:
                raise PromptParseError(f"verifier reward: {e}. It scores shapes-world prompts only "
                                       f"(mixgrpo/world/prompts/*.txt); use another reward for free text") from None
        return self._scenes[prompt]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        result = verify(images, [self._scene(p) for p in prompts])
        return result.dense if self.score == "dense" else result.strict


@REWARDS.register("verifier")
def verifier(score: str = "dense") -> VerifierReward:
    """The shapes-world verifier: score "dense" (fraction of requirements met) or "strict" (all met)."""
    return VerifierReward(score)
