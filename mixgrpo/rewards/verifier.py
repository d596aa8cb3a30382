"""Shapes-world rewards: the programmatic verifier (`mixgrpo.world.verifier`), the continuous shape-quality
score against the scene each prompt describes, and the colour purity of the drawn objects
(`mixgrpo.world.quality`)."""

from __future__ import annotations

from typing import Sequence

import torch

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import REWARDS
from mixgrpo.world.quality import color_purity as _color_purity
from mixgrpo.world.quality import shape_quality as _shape_quality
from mixgrpo.world.scene import PromptParseError, Scene, parse_prompt
from mixgrpo.world.verifier import verify


class _SceneReward:
    """Parses each prompt into its scene once (cached); a prompt outside the shapes-world grammar is an
    error naming the reward, not a 0."""

    name = ""

    def __init__(self):
        self._scenes: dict[str, Scene] = {}

    def _scene(self, prompt: str) -> Scene:
        if prompt not in self._scenes:
            try:
                self._scenes[prompt] = parse_prompt(prompt)
            except PromptParseError as e:
                raise PromptParseError(f"{self.name} reward: {e}. It scores shapes-world prompts only "
                                       f"(mixgrpo/world/prompts/*.txt); use another reward for free text") from None
        return self._scenes[prompt]

    def _score(self, images: torch.Tensor, prompts: Sequence[str], score) -> torch.Tensor:
        """[B] = score(images, scenes) over the images without NaN or inf pixels; the others (a diverged model's,
        which the pixel analysis cannot handle) score NaN."""
        scenes = [self._scene(p) for p in prompts]
        finite = torch.isfinite(images).flatten(1).all(1).cpu()  # [B]
        scores = torch.full((len(prompts),), float("nan"))
        if finite.any():
            scores[finite] = score(images[finite.to(images.device)], [s for s, ok in zip(scenes, finite) if ok])
        return scores


class VerifierReward(_SceneReward):
    """reward_b = dense_b (fraction of the prompt's requirements met) or strict_b (1 if all are met, else 0)."""

    name = "verifier"

    def __init__(self, score: str = "dense"):
        super().__init__()
        if score not in ("dense", "strict"):
            raise ConfigError(f"verifier reward: score must be 'dense' or 'strict', got {score!r}")
        self.score = score

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._score(images, prompts, lambda x, scenes: getattr(verify(x, scenes), self.score))


@REWARDS.register("verifier")
def verifier(score: str = "dense") -> VerifierReward:
    """The shapes-world verifier: score "dense" (fraction of requirements met) or "strict" (all met)."""
    return VerifierReward(score)


class ShapeQualityReward(_SceneReward):
    """reward_b = the shape-quality score of image b against its prompt's scene, in [0, 1]
    (`mixgrpo.world.quality`: the squared IoU of each requested instance with its ideal shape; missing and
    extra objects count as zeros)."""

    name = "shape_quality"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._score(images, prompts, _shape_quality)


@REWARDS.register("shape_quality")
def shape_quality() -> ShapeQualityReward:
    """How well each image draws the shapes its prompt asks for (continuous, weight-free)."""
    return ShapeQualityReward()


class ColorPurityReward(_SceneReward):
    """reward_b = the colour purity of the objects drawn in image b, in [0, 1] (`mixgrpo.world.quality`); the
    prompts are only checked. A guard metric (log it at weight 0): alone it pays for one clean blob."""

    name = "color_purity"

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._score(images, prompts, lambda x, scenes: _color_purity(x))


@REWARDS.register("color_purity")
def color_purity() -> ColorPurityReward:
    """How exactly the drawn objects keep their colour (texture: blur, noise and speckle lower it)."""
    return ColorPurityReward()
