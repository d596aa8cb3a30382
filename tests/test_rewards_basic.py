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


# --------------------------------------------------------------------------------------------------
# input_consistency


def _cells_kept_by_loop(image, source, grid, tolerance):
    """The fraction of kept cells, written out cell by cell (the reference for the vectorised reward)."""
    _, height, width = image.shape
    h, w = (grid, round(grid * width / height)) if height <= width else (round(grid * height / width), grid)
    kept = 0
    for i in range(h):
        for j in range(w):
            rows = slice(i * height // h, -(-(i + 1) * height // h))  # adaptive pooling's cell bounds
            cols = slice(j * width // w, -(-(j + 1) * width // w))
            change = max(abs(image[c, rows, cols].mean() - source[c, rows, cols].mean()) for c in range(3))
            kept += bool(change <= tolerance)
    return kept / (h * w)


def test_input_consistency_is_the_fraction_of_cells_kept():
    """1 for the input itself and for pixel noise below the tolerance; a local edit loses exactly its cells; a redraw
    or a global change loses (nearly) all; equal to the cell-by-cell loop, on a non-square image too."""
    gen = torch.Generator().manual_seed(0)
    source = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 12, generator=gen), size=(32, 48), mode="bilinear")
    reward = build_reward("input_consistency", {"grid": 4, "tolerance": 0.1})  # 4 x 6 cells of 8 x 8 pixels
    assert getattr(reward, "takes_inputs", False)
    noisy = (source + 0.05 * (2 * torch.rand(source.shape, generator=gen) - 1)).clamp(0, 1)
    edited = source.clone()
    edited[:, :, 8:24, 16:24] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # a red object over 2 cells
    redrawn = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 6, generator=gen), size=(32, 48))  # another scene
    brighter = (source + 0.2).clamp(0, 1)
    images = torch.cat([source, noisy, edited, redrawn, brighter])
    scores = reward(images, [""] * 5, inputs=source.expand(5, -1, -1, -1))
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    assert scores[0] == 1 and scores[1] == 1 and scores[2] == 1 - 2 / 24
    assert scores[3] < 0.5 and scores[4] < 0.25
    for image, score in zip(images, scores):
        assert score == pytest.approx(_cells_kept_by_loop(image, source[0], 4, 0.1), abs=1e-6)


def test_input_consistency_pools_an_input_of_another_size_to_the_same_cells():
    source = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    small = torch.nn.functional.avg_pool2d(source, 2)  # the same image at half the size
    images = source.flip(0)
    reward = build_reward("input_consistency", {"grid": 8})
    assert torch.equal(reward(images, ["", ""], inputs=source), reward(images, ["", ""], inputs=small))


def test_input_consistency_scores_the_frames_of_a_video_against_its_input():
    """I2V: each frame is compared with the conditioning frame, then the frame scores are aggregated."""
    source = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    videos = source[:, None].repeat(1, 3, 1, 1, 1)       # [B, F, 3, H, W], every frame the input
    videos[0, 2] = 1 - videos[0, 2]                       # video 0's last frame changed everywhere
    videos[1, 1, :, :8, :8] = 0.0                         # video 1's middle frame loses its top-left quarter (mostly)
    frame_scores = torch.stack([build_reward("input_consistency", {"grid": 4})(videos[:, f], ["", ""], inputs=source)
                                for f in range(3)], 1)
    for frames, aggregate in (("mean", lambda s: s.mean(1)), ("min", lambda s: s.amin(1))):
        scores = build_reward("input_consistency", {"grid": 4}, frames=frames)(videos, ["", ""], inputs=source)
        assert torch.equal(scores, aggregate(frame_scores))
    assert frame_scores[0].tolist()[:2] == [1.0, 1.0] and frame_scores[0, 2] < 0.2


def test_input_consistency_names_what_is_missing_or_wrong():
    from mixgrpo.errors import ConfigError

    reward = build_reward("input_consistency")
    with pytest.raises(ConfigError, match="image-conditioned model"):
        reward(torch.zeros(1, 3, 32, 32), [""])
    with pytest.raises(ConfigError, match="grid <= 8"):
        reward(torch.zeros(1, 3, 8, 8), [""], inputs=torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="2 images but 1 input images"):
        reward(torch.zeros(2, 3, 32, 32), ["", ""], inputs=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="tolerance must lie in"):
        build_reward("input_consistency", {"tolerance": 0})
    with pytest.raises(ConfigError, match="grid must be a positive integer"):
        build_reward("input_consistency", {"grid": 0})
