"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, "sac+logos+ava1-l14-linearMSE.pth").

A 5-layer MLP on the L2-normalised CLIP ViT-L/14 image embedding, regressing a 1-10 aesthetic rating.
Checkpoint: the MLP's state dict (keys layers.{0,2,4,6,7}.{weight,bias}) plus a transformers CLIP directory
for the embedding (openai/clip-vit-large-patch14: a CLIPModel or CLIPVisionModelWithProjection directory).
score = MLP(f_img / |f_img|), f_img = visual_projection(pooled vision output). The prompt is not used.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mixgrpo.rewards.base import REWARDS, RewardError
from mixgrpo.rewards.clip import (LazyModelReward, check_model_dir, check_weights_fit, clip_preprocess,
                                  existing_path, read_state_dict)


class RatingMLP(nn.Module):
    """The rating head of the aesthetic predictor, reused by ImageReward: [N, input_size] -> [N].

    layers = Linear(input_size, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout,
    Linear(64, 16), Linear(16, 1): no activations (as published); the Dropouts only keep the checkpoint's
    layer indices (layers.{0,2,4,6,7}).
    """

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def load_score_mlp(state: dict[str, torch.Tensor], reward: str) -> RatingMLP:
    """A `RatingMLP` with its input size read from the checkpoint, loaded strictly, in eval mode."""
    if "layers.0.weight" not in state:
        raise RewardError(f"{reward}: the MLP checkpoint has no 'layers.0.weight' (keys: {sorted(state)[:5]}); "
                          f"expected the state dict of the 5-layer rating MLP")
    mlp = RatingMLP(state["layers.0.weight"].shape[1])
    try:
        mlp.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise RewardError(f"{reward}: the MLP checkpoint does not match the 5-layer rating MLP: {e}") from e
    return mlp.eval()


class AestheticReward(LazyModelReward):
    name = "aesthetic"

    def __init__(self, path: str, clip: str, **kwargs: Any):
        super().__init__(**kwargs)
        self._path, self._clip = path, clip
        self.vision: Any = None
        self.mlp: RatingMLP | None = None

    def check(self) -> None:
        state = read_state_dict(existing_path(self._path, self.name, "MLP checkpoint"), self.name, shapes_only=True)
        if "layers.0.weight" not in state:
            raise RewardError(f"{self.name}: the MLP checkpoint has no 'layers.0.weight' (keys: {sorted(state)[:5]}); "
                              f"expected the state dict of the 5-layer rating MLP")
        check_weights_fit(lambda: RatingMLP(state["layers.0.weight"].shape[1]), state, self.name,
                          "expected sac+logos+ava1-l14-linearMSE.pth (the 5-layer rating MLP)")
        check_model_dir(self._clip, self.name)

    def load(self) -> None:
        from transformers import CLIPVisionModelWithProjection

        self.mlp = load_score_mlp(read_state_dict(existing_path(self._path, self.name, "MLP checkpoint"),
                                                  self.name), self.name).to(self.device)
        clip_dir = existing_path(self._clip, self.name, "CLIP directory")
        self.vision = CLIPVisionModelWithProjection.from_pretrained(
            str(clip_dir), local_files_only=True, dtype=self.dtype).to(self.device).eval()
        if self.vision.config.projection_dim != self.mlp.input_size:
            raise RewardError(f"{self.name}: the CLIP embedding has {self.vision.config.projection_dim} dims but the "
                              f"MLP expects {self.mlp.input_size}; use the CLIP the MLP was trained on "
                              f"(ViT-L/14 for sac+logos+ava1-l14-linearMSE.pth)")

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        assert self.mlp is not None
        pixels = clip_preprocess(images, self.vision.config.image_size).to(self.dtype)
        embedding = self.vision(pixel_values=pixels).image_embeds.float()  # [B, D]
        return self.mlp(F.normalize(embedding, dim=-1))


@REWARDS.register("aesthetic", modules=("transformers",))
def aesthetic(path: str, clip: str, device: str = "cpu", dtype: str = "float32",
              batch_size: int = 16) -> AestheticReward:
    """LAION aesthetic predictor v2: `path` = the MLP .pth, `clip` = a CLIP ViT-L/14 transformers directory.

    score = MLP(f_img / |f_img|), a rating on the 1-10 scale.
    """
    return AestheticReward(path, clip, device=device, dtype=dtype, batch_size=batch_size)
