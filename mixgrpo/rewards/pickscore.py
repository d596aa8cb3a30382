"""PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences.

Checkpoint: a transformers CLIPModel directory (yuvalkirstain/PickScore_v1); its tokenizer is the one of
laion/CLIP-ViT-H-14-laion2B-s32B-b79K (the same CLIP BPE vocabulary).
score = exp(logit_scale) * cos(image, text), the official inference formula (about 100 x cosine, so ~20-23
for good images; papers that report ~0.22 divide by 100).
"""

from __future__ import annotations

import torch

from mixgrpo.rewards.base import REWARDS
from mixgrpo.rewards.clip import ClipSimilarityReward, check_model_dir, load_clip_model, parse_dtype


@REWARDS.register("pickscore", modules=("transformers",))
def pickscore(path: str, tokenizer: str | None = None, device: str = "cpu", dtype: str = "float32",
              batch_size: int = 16) -> ClipSimilarityReward:
    """PickScore: `path` = the PickScore_v1 directory, `tokenizer` = a CLIP tokenizer directory (default: `path`).

    score = exp(logit_scale) * <f_img / |f_img|, f_txt / |f_txt|>.
    """
    torch_dtype, torch_device = parse_dtype(dtype), torch.device(device)
    return ClipSimilarityReward(
        "pickscore", lambda: load_clip_model(path, "pickscore", torch_device, torch_dtype),
        tokenizer if tokenizer is not None else path,
        lambda cos, model: model.logit_scale.float().exp() * cos,
        check_model=lambda: check_model_dir(path, "pickscore"), device=device, dtype=dtype, batch_size=batch_size)
