"""JPEG compressibility (DDPO's weight-free reward): smaller JPEG files score higher."""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from mixgrpo.errors import ConfigError
from mixgrpo.rewards.base import REWARDS, check_batch


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image saved as a JPEG by Pillow at `quality`.

    images: [B, 3, H, W] in [0, 1], quantised to 8 bits by rounding. Returns [B] float32.
    """
    check_batch("", images)
    pixels = (images.detach().to("cpu", torch.float32).clamp(0, 1) * 255).round().to(torch.uint8)
    sizes = []
    for hwc in pixels.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(hwc)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility:
    """reward_b = -(JPEG size of image b in kB); the prompts are ignored."""

    def __init__(self, quality: int = 95):
        if not 1 <= quality <= 95:
            raise ConfigError(f"jpeg_compressibility: quality must be in 1..95 (Pillow's useful range), got {quality}")
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return -jpeg_size_kb(images, self.quality)


@REWARDS.register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95) -> JpegCompressibility:
    """DDPO's JPEG compressibility: minus the JPEG size in kB at `quality` (no weights)."""
    return JpegCompressibility(quality)
