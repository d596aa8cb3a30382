"""Shapes-world rewards: the programmatic verifier (`mixgrpo.world.verifier`), the continuous shape-quality
score against the scene each prompt describes, the colour purity of the drawn objects (`mixgrpo.world.quality`),
and the edit verifier of the editing world (`mixgrpo.world.edit_verifier`, a reward that takes the inputs)."""

from __future__ import annotations

from typing import Sequence

import torch

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import REWARDS
from mixgrpo.world.edit_verifier import verify_edit
from mixgrpo.world.edits import Edit, EditParseError, parse_instruction
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


class EditVerifierReward:
    """reward_b = the edit verifier's score of result b against its input and instruction
    (`mixgrpo.world.edit_verifier`): "dense" (fraction of the requirements met), "strict" (1 when the edit was
    made and everything else kept), "made" or "kept" (either half alone, e.g. to log at weight 0)."""

    name = "edit_verifier"
    takes_inputs = True
    SCORES = ("dense", "strict", "made", "kept")

    def __init__(self, score: str = "dense"):
        if score not in self.SCORES:
            raise ConfigError(f"edit_verifier reward: score must be one of {', '.join(self.SCORES)}, got {score!r}")
        self.score = score
        self._edits: dict[str, Edit] = {}

    def _edit(self, prompt: str) -> Edit:
        if prompt not in self._edits:
            try:
                self._edits[prompt] = parse_instruction(prompt)
            except PromptParseError as e:
                raise EditParseError(f"edit_verifier reward: {e}. It scores shapes-world edit instructions only "
                                       f"(world:edit_train, world:edit_heldout)") from None
        return self._edits[prompt]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
        """images, inputs: [B, 3, H, W] in [0, 1]; prompts: B edit instructions. Results with NaN or inf pixels
        score NaN."""
        if inputs is None:
            raise ConfigError("edit_verifier reward compares each result with its example's input image, and got "
                              "none: use it in an editing run (world:edit_train examples and an editing model)")
        edits = [self._edit(p) for p in prompts]
        finite = torch.isfinite(images).flatten(1).all(1).cpu()  # [B]
        scores = torch.full((len(prompts),), float("nan"))
        if finite.any():
            keep = finite.to(images.device)
            result = verify_edit(images[keep], inputs.to(images.device)[keep], [e for e, ok in zip(edits, finite) if ok])
            scores[finite] = getattr(result, "success" if self.score == "strict" else self.score)
        return scores


@REWARDS.register("edit_verifier")
def edit_verifier(score: str = "dense") -> EditVerifierReward:
    """The shapes-world edit verifier (needs the example's input image): score "dense", "strict" (edit made and
    the rest kept), "made" or "kept"."""
    return EditVerifierReward(score)
