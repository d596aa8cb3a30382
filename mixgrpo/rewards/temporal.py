"""A weight-free video reward: temporal consistency, from finite differences of the frames along time.

For a video x [F, 3, H, W] in [0, 1] and order k (1 or 2), with the k-th difference along frames
    D1_f = x_{f+1} - x_f,        D2_f = x_{f+2} - 2 x_{f+1} + x_f,
the score is 1 - mean |Dk| / 2^(k-1), in [0, 1] (|Dk| <= 2^(k-1) for pixels in [0, 1]); 1 is best.

- order 1 (frame-to-frame consistency): every change between consecutive frames costs, so a still video is optimal;
- order 2 (the default, flicker): only changes that are not steady cost; a still video and a steady pan or fade
  score the same, while frames that jump back and forth (flicker, popping objects) score low.
Either measures time only: pair it with per-frame image rewards (quality, alignment) as the recipes do, or a
policy can please it with a video that does nothing.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import REWARDS


class TemporalConsistency:
    """reward_b = 1 - mean |k-th frame difference of video b| / 2^(k-1); the prompts are ignored."""

    scores_videos = True  # gets videos [B, F, 3, H, W] whole (not frame by frame)

    def __init__(self, order: int = 2):
        if order not in (1, 2):
            raise ConfigError(f"temporal_consistency: order must be 1 (frame-to-frame) or 2 (flicker), got {order}")
        self.order = order

    def __call__(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if videos.dim() != 5 or videos.shape[2] != 3:
            raise ConfigError(f"temporal_consistency scores videos [B, F, 3, H, W], got shape {tuple(videos.shape)}: "
                              f"it needs a video model (e.g. wan); drop it from the rewards of an image model")
        if videos.shape[1] <= self.order:
            raise ConfigError(f"temporal_consistency of order {self.order} needs more than {self.order} frames, the "
                              f"videos have {videos.shape[1]}: generate more frames (model.args.num_frames) or use "
                              f"order 1")
        x = videos.detach().to("cpu", torch.float32)
        diff = torch.diff(x, n=self.order, dim=1)                                 # [B, F - k, 3, H, W]
        return 1 - diff.abs().flatten(1).mean(1) / 2 ** (self.order - 1)         # [B]


@REWARDS.register("temporal_consistency")
def temporal_consistency(order: int = 2) -> TemporalConsistency:
    """Temporal consistency of videos from their k-th frame differences (order 2: flicker; 1: frame-to-frame)."""
    return TemporalConsistency(order)
