"""HPS-v2.1 (Wu et al. 2023, Human Preference Score v2): an open_clip ViT-H-14 fine-tuned on HPDv2.

Checkpoint: `HPS_v2.1_compressed.pt`, an open_clip state dict (raw, or under "state_dict"). We convert its
keys to a transformers `CLIPModel` (`open_clip_to_transformers`) built from `VIT_H_14` (or a given config),
so neither open_clip nor hpsv2 is needed. The tokenizer is open_clip's CLIP BPE with 77 tokens: any
transformers CLIP tokenizer directory holds the same vocabulary (e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K or
openai/clip-vit-large-patch14). Padding does not matter: the text tower is causal and pools at end-of-text.

score = <f_img / |f_img|, f_txt / |f_txt|>: the official `hpsv2.score` returns the diagonal of
image_features @ text_features.T, where open_clip's forward already normalises both, i.e. the cosine
(no logit scale; ~0.25-0.37 for good images).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from mixgrpo.rewards.base import REWARDS, RewardError
from mixgrpo.rewards.clip import (ClipSimilarityReward, check_weights_fit, existing_path, parse_dtype,
                                  read_state_dict)

VIT_H_14: dict[str, Any] = {
    "projection_dim": 1024,
    "vision_config": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1024},
    "text_config": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096,
                    "num_hidden_layers": 24, "num_attention_heads": 16, "max_position_embeddings": 77,
                    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "projection_dim": 1024,
                    "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0},
}
"""open_clip's ViT-H-14 (the HPS-v2.1 and PickScore backbone) as CLIPConfig kwargs: exact GELU, LayerNorm eps
1e-5, 16 heads of 80 (vision) and of 64 (text)."""

# open_clip name -> transformers name, per residual block and outside the blocks. A block's fused
# attention `in_proj` is split into q, k, v separately (see `open_clip_to_transformers`).
_BLOCK_KEYS = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_TOP_KEYS = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
# open_clip stores projections as [width, embed] used as x @ proj; nn.Linear stores [embed, width].
_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_IGNORED = {"attn_mask", "visual.attn_mask"}  # the causal-mask buffer some open_clip versions save


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip CLIP state dict to transformers `CLIPModel` keys.

    in_proj_weight [3W, W] -> q_proj, k_proj, v_proj [W, W] each (rows in that order, nn.MultiheadAttention's
    layout); proj [W, E] -> Linear weight [E, W] (transposed); everything else is a rename. Keys this does not
    know raise a RewardError (a checkpoint of another architecture), so nothing is silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP_KEYS:
            out[_TOP_KEYS[key]] = value
        elif key in _PROJECTIONS:
            out[_PROJECTIONS[key]] = value.t().contiguous()
        elif m := _IN_PROJ.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{tower}.encoder.layers.{m.group(2)}.self_attn.{name}.{m.group(3)}"] = part.contiguous()
        elif (m := _BLOCK.match(key)) and m.group(3) in _BLOCK_KEYS:
            tower = "vision_model" if m.group(1) else "text_model"
            out[f"{tower}.encoder.layers.{m.group(2)}.{_BLOCK_KEYS[m.group(3)]}.{m.group(4)}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise RewardError(f"hps: {len(unknown)} checkpoint keys are not open_clip CLIP keys this converter knows "
                          f"(e.g. {unknown[:3]}); is this an open_clip ViT checkpoint such as HPS_v2.1?")
    return out


_HPS_FIX = "for HPS-v2.1 leave `config` unset (ViT-H-14) and give HPS_v2.1_compressed.pt"


def check_hps_checkpoint(path: str, config: dict[str, Any] | None) -> None:
    """The checkpoint's converted keys and shapes fit the CLIPModel of `config`, checked on the meta device."""
    from transformers import CLIPConfig, CLIPModel

    state = open_clip_to_transformers(read_state_dict(existing_path(path, "hps", "checkpoint"), "hps",
                                                      shapes_only=True))
    check_weights_fit(lambda: CLIPModel(CLIPConfig(**(config if config is not None else VIT_H_14))), state, "hps",
                      _HPS_FIX)


def load_hps_model(path: str, config: dict[str, Any] | None, device: torch.device, dtype: torch.dtype):
    """Build a transformers CLIPModel from `config` (default `VIT_H_14`) and load the converted checkpoint."""
    from transformers import CLIPConfig, CLIPModel

    state = open_clip_to_transformers(read_state_dict(existing_path(path, "hps", "checkpoint"), "hps"))
    check_weights_fit(lambda: CLIPModel(CLIPConfig(**(config if config is not None else VIT_H_14))), state, "hps",
                      _HPS_FIX)  # one line naming the mismatch, not a page of load_state_dict errors
    with device:  # built where it runs: ViT-H-14 is 4 GB in float32
        model = CLIPModel(CLIPConfig(**(config if config is not None else VIT_H_14)))
    # a shape mismatch raises here; a depth mismatch shows as missing or unexpected keys below
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RewardError(f"hps: checkpoint does not match the CLIP config: missing {result.missing_keys[:4]}, "
                          f"unexpected {result.unexpected_keys[:4]}; for HPS-v2.1 leave `config` unset (ViT-H-14)")
    return model.to(device=device, dtype=dtype).eval()


@REWARDS.register("hps", modules=("transformers",))
def hps(path: str, tokenizer: str, config: dict[str, Any] | None = None, device: str = "cpu",
        dtype: str = "float32", batch_size: int = 16) -> ClipSimilarityReward:
    """HPS-v2.1: `path` = HPS_v2.1_compressed.pt, `tokenizer` = a CLIP tokenizer directory.

    score = <f_img / |f_img|, f_txt / |f_txt|>. `config` (CLIPConfig kwargs) defaults to `VIT_H_14`.
    """
    torch_dtype, torch_device = parse_dtype(dtype), torch.device(device)
    return ClipSimilarityReward("hps", lambda: load_hps_model(path, config, torch_device, torch_dtype),
                                tokenizer, lambda cos, model: cos,
                                check_model=lambda: check_hps_checkpoint(path, config),
                                device=device, dtype=dtype, batch_size=batch_size)
