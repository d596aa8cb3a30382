"""The weight-free rewards: the shapes-world verifier and DDPO's JPEG compressibility."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import mixgrpo.rewards  # noqa: F401  (registers the rewards)
from mixgrpo.rewards.base import REWARDS, build_reward
from mixgrpo.world.scene import PromptParseError, parse_prompt, render_batch
from mixgrpo.world.verifier import verify


def test_both_rewards_are_registered_on_import():
    assert {"verifier", "jpeg_compressibility"} <= set(REWARDS.names())


@pytest.mark.parametrize("score", ["dense", "strict"])
def test_verifier_reward_is_the_verifier_score(score):
    prompts = ["a red circle left of a blue square", "two green triangles", "a yellow square"]
    drawn = ["a red circle right of a blue square", "two green triangles", "a yellow circle"]
    images = render_batch([parse_prompt(p) for p in drawn], seed=0)
    reward = build_reward("verifier", {"score": score})
    scores = reward(images, prompts)
    expected = getattr(verify(images, [parse_prompt(p) for p in prompts]), score)
    assert scores.dtype == torch.float32 and torch.equal(scores, expected)
    assert scores[1] == 1 and scores[0] < 1 and scores[2] < 1
    assert torch.equal(reward(images, prompts), scores)  # the second call reads cached parses


@pytest.mark.parametrize("name", ["verifier", "shape_quality"])
def test_scene_rewards_score_images_with_nan_or_inf_pixels_nan(name):
    """A diverged model's images (NaN pixels once crashed the segmentation: astype(np.int64) of NaN); the
    others in the batch keep their scores."""
    prompts = ["two green triangles", "a yellow square", "a red circle"]
    images = render_batch([parse_prompt(p) for p in prompts], seed=0)
    clean = build_reward(name)(images, prompts)
    images[0, 1, 5, 5], images[2, 0, 0, 0] = float("nan"), float("inf")
    scores = build_reward(name)(images, prompts)
    assert torch.isnan(scores[[0, 2]]).all() and scores[1] == clean[1] > 0.5


def test_verifier_reward_rejects_prompts_outside_the_grammar():
    reward = build_reward("verifier")
    with pytest.raises(PromptParseError, match="'a photo of a cat'.*shapes-world prompts only"):
        reward(torch.zeros(1, 3, 32, 32), ["a photo of a cat"])
    with pytest.raises(ValueError, match="'dense' or 'strict'"):
        build_reward("verifier", {"score": "mean"})


def test_jpeg_reward_is_minus_the_pillow_jpeg_size_in_kb():
    gen = torch.Generator().manual_seed(0)
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), torch.rand(1, 3, 32, 32, generator=gen)])
    scores = build_reward("jpeg_compressibility", {"quality": 80})(images, ["", ""])
    for image, score in zip(images, scores):
        buffer = io.BytesIO()
        pixels = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=80)
        assert score.item() == pytest.approx(-len(buffer.getvalue()) / 1000)
    assert scores[0] > scores[1]  # a flat image compresses better than noise
    with pytest.raises(ValueError, match="quality"):
        build_reward("jpeg_compressibility", {"quality": 0})
