"""A weight-free reward for edits: how much of the input image the result keeps (`input_consistency`).

Both images are averaged over a grid of cells (`grid` cells along the shorter side, square cells), and a cell is kept
when no channel of its mean colour moved by more than `tolerance`:

    A = cells(result), I = cells(input)                 [3, h, w] cell means, h x w = grid x round(grid * W / H)
    d_ij = max_c |A_cij - I_cij|                        the largest channel change of cell (i, j)
    score = (1 / hw) sum_ij 1[d_ij <= tolerance]        the fraction of cells kept, in [0, 1]; 1 is best

so a local edit (a recoloured object, an added one) loses only the cells it touches, while a result that redraws the
scene loses most of them, whatever its quality. Averaging over a cell first makes the score blind to what a VAE round
trip or sampling noise does to single pixels; the threshold makes it blind to how much a changed cell changed, so a
bold edit costs what a faint one of the same area does. It is a regulariser, not an edit reward: an edit that has to
change the whole image (a new style, a new background, a global relight) is scored down by it, and a model that
ignores the instruction scores 1. Weight it below the reward that checks the edit (docs/rewards.md).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import REWARDS, check_batch


def cell_grid(height: int, width: int, grid: int) -> tuple[int, int]:
    """(h, w): `grid` cells along the shorter side, as many square cells as fit along the longer (at least 1)."""
    if height <= width:
        return grid, max(1, round(grid * width / height))
    return max(1, round(grid * height / width)), grid


def kept_cells(images: torch.Tensor, inputs: torch.Tensor, grid: int, tolerance: float) -> torch.Tensor:
    """kept [B, h, w] bool: the cells of `images` whose mean colour is within `tolerance` of `inputs`' on every channel.

    images: [B, 3, H, W], inputs: [B, 3, H', W'] in [0, 1]; inputs are pooled to the cells of images, so another size
    of the same aspect ratio gives the same cells."""
    h, w = cell_grid(images.shape[-2], images.shape[-1], grid)
    a = F.adaptive_avg_pool2d(images.detach().float(), (h, w)).cpu()                       # [B, 3, h, w]
    b = F.adaptive_avg_pool2d(inputs.detach().to(images.device, torch.float32), (h, w)).cpu()  # [B, 3, h, w]
    return (a - b).abs().amax(1) <= tolerance                                             # [B, h, w]


class InputConsistency:
    """reward_b = the fraction of cells of result b whose mean colour stayed within `tolerance` of the input's."""

    takes_inputs = True  # called as reward(images, prompts, inputs=...) (`mixgrpo.rewards.base.call_reward`)

    def __init__(self, grid: int = 16, tolerance: float = 0.1):
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ConfigError(f"input_consistency: grid must be a positive integer (cells along the shorter side), "
                              f"got {grid!r}")
        try:  # a YAML 1.1 reader leaves 1e-6 a string
            tolerance = float(tolerance)
        except (TypeError, ValueError):
            raise ConfigError(f"input_consistency: tolerance must be a number, got {tolerance!r}") from None
        if not 0 < tolerance < 1:
            raise ConfigError(f"input_consistency: tolerance must lie in (0, 1) (a change of a cell's mean colour, "
                              f"pixels in [0, 1]), got {tolerance!r}")
        self.grid, self.tolerance = grid, float(tolerance)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 inputs: torch.Tensor | None = None) -> torch.Tensor:
        check_batch("input_consistency", images, prompts)
        if inputs is None:
            raise ConfigError("input_consistency compares each result with its example's input image, and this run "
                              "gives none: use it with an image-conditioned model (flux_kontext, qwen_image_edit, "
                              "wan_i2v, tiny_edit), or drop it from the rewards")
        check_batch("input_consistency (inputs)", inputs)
        if inputs.shape[0] != images.shape[0]:
            raise ValueError(f"input_consistency: {images.shape[0]} images but {inputs.shape[0]} input images")
        if self.grid > min(images.shape[-2:]):
            raise ConfigError(f"input_consistency: grid = {self.grid} cells is finer than the "
                              f"{images.shape[-1]}x{images.shape[-2]} images: use grid <= {min(images.shape[-2:])}")
        return kept_cells(images, inputs, self.grid, self.tolerance).flatten(1).float().mean(1)  # [B]


@REWARDS.register("input_consistency")
def input_consistency(grid: int = 16, tolerance: float = 0.1) -> InputConsistency:
    """How much of the input image an edit keeps (no weights; needs an image-conditioned model).

    score = the fraction of cells (`grid` along the shorter side) whose mean colour moved by at most `tolerance`."""
    return InputConsistency(grid, tolerance)
