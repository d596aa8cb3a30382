"""An analytic flow model: the exact velocity field of Gaussian data, with trainable data means.

Data x0 ~ N(mu_c, s^2 I), where mu_c = mu + shift(prompt) is a trainable per-pixel mean plus a fixed
per-prompt offset. For x = (1 - sigma) x0 + sigma eps the exact velocity is

    v(x, sigma) = E[eps - x0 | x] = (sigma - (1 - sigma) s^2) / V * (x - (1 - sigma) mu_c) - mu_c,
    V = (1 - sigma)^2 s^2 + sigma^2,

so sampling with it is exact and cheap. Used by tests (closed forms, invariances, resume) and as a
stand-in model for measuring engine overhead. Images are decoded as clamp((x + 1) / 2, 0, 1).
With `frames` F > 0 it is a video model: latents [B, 3, F, H, W] (channels first, as a video VAE's), decoded to
videos [B, F, 3, H, W]; the same closed form holds per element.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from mixgrpo.models.base import MODELS, Cond, FlowModel, ModelSpec


class GaussianFlow(FlowModel):
    def __init__(self, size: int = 8, data_std: float = 0.5, init_mean: float = 0.0, frames: int = 0):
        super().__init__()
        self.latent_shape = (3, frames, size, size) if frames else (3, size, size)
        self.data_std = data_std
        self.mu = nn.Parameter(torch.full(self.latent_shape, float(init_mean)))

    @property
    def denoiser(self) -> nn.Module:
        return self

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """A deterministic per-prompt offset in [-0.25, 0.25] ("" -> 0), as "offset" [B, 1]."""
        values = [0.0 if not p else int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF * 0.5 - 0.25
                  for p in prompts]
        return {"offset": torch.tensor(values, dtype=torch.float32)[:, None]}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        per_sample = (-1, *([1] * (x.dim() - 1)))
        mu = self.mu + cond["offset"].to(x.dtype).view(per_sample)  # [B, *latent_shape]
        s = sigma.to(x.dtype).view(per_sample)
        var = (1 - s) ** 2 * self.data_std**2 + s**2
        return (s - (1 - s) * self.data_std**2) / var * (x - (1 - s) * mu) - mu

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> images [B, 3, H, W]; [B, 3, F, H, W] -> videos [B, F, 3, H, W]."""
        image = ((x + 1) / 2).clamp(0, 1)
        return image.transpose(1, 2) if x.dim() == 5 else image

    def save_pretrained(self, path, state_dict: dict | None = None) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        mu = (self.state_dict() if state_dict is None else state_dict)["mu"]
        Path(path).mkdir(parents=True, exist_ok=True)
        save_file({"mu": mu.detach().cpu().contiguous()}, str(Path(path) / "model.safetensors"))


def gaussian(size: int = 8, data_std: float = 0.5, init_mean: float = 0.0, path: str | None = None,
             frames: int = 0) -> GaussianFlow:
    """The analytic Gaussian-data model (exact velocity; tests, benchmarks; frames > 0: videos of F frames)."""
    model = GaussianFlow(size, data_std, init_mean, frames)
    if path is not None:
        from pathlib import Path

        from safetensors.torch import load_file

        model.mu.data.copy_(load_file(str(Path(path) / "model.safetensors"))["mu"])
    return model


MODELS.add(ModelSpec("gaussian", gaussian))
