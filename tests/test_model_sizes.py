"""The real-size denoisers of the new base models, built on the meta device (no memory, no weights): their parameter
counts are the published sizes, and the adapters' LoRA targets match layers of each.

Configs: the transformer/config.json values of the released checkpoints. Qwen-Image, FLUX.2-dev and Wan 14B are the
diffusers classes' defaults (which are those releases' configs); FLUX.2-klein 4B / 9B, Wan2.1 1.3B and Wan2.2 TI2V-5B
set the fields in which they differ, as written from their hub configs (not readable on this offline machine); the
published sizes (from the model cards: "20B", "32B", "4B", "9B", "1.3B", "14B", "5B"; FLUX.1-Kontext-dev "12B",
FLUX.1-dev's architecture; Qwen-Image-Edit-2511 "20B", Qwen-Image's with zero_cond_t) are what checks them.
"""

import pytest
import torch
from torch import nn

from mixgrpo.models import flux2, qwen_image, wan

REAL = {  # name -> (diffusers class, config fields that differ from the class defaults, published size in 1e9)
    "Qwen-Image": ("QwenImageTransformer2DModel", {}, 20),
    "FLUX.2-dev": ("Flux2Transformer2DModel", {}, 32),
    "FLUX.2-klein-4B": ("Flux2Transformer2DModel", dict(num_layers=5, num_single_layers=20, num_attention_heads=24,
                                                        joint_attention_dim=7680, guidance_embeds=False), 4),
    "FLUX.2-klein-9B": ("Flux2Transformer2DModel", dict(num_layers=8, num_single_layers=24, num_attention_heads=32,
                                                        joint_attention_dim=12288, guidance_embeds=False), 9),
    "Wan2.1-T2V-1.3B": ("WanTransformer3DModel", dict(num_attention_heads=12, ffn_dim=8960, num_layers=30), 1.3),
    "Wan2.1-T2V-14B": ("WanTransformer3DModel", {}, 14),
    "Wan2.2-TI2V-5B": ("WanTransformer3DModel", dict(num_attention_heads=24, ffn_dim=14336, num_layers=30,
                                                     in_channels=48, out_channels=48), 5),
    "FLUX.1-Kontext-dev": ("FluxTransformer2DModel", dict(guidance_embeds=True), 12),
    "Qwen-Image-Edit-2511": ("QwenImageTransformer2DModel", dict(zero_cond_t=True), 20),
}
# The counts these configs give (exact; a change in diffusers' classes would show here first).
COUNTS = {"Qwen-Image": 20_430_401_088, "FLUX.2-dev": 32_223_281_152, "FLUX.2-klein-4B": 3_875_544_576,
          "FLUX.2-klein-9B": 9_078_581_248, "Wan2.1-T2V-1.3B": 1_418_996_800, "Wan2.1-T2V-14B": 14_288_491_584,
          "Wan2.2-TI2V-5B": 4_999_787_712, "FLUX.1-Kontext-dev": 11_901_408_320, "Qwen-Image-Edit-2511": 20_430_401_088}
TARGETS = {"Qwen-Image": qwen_image.LORA_TARGETS, "FLUX.2-dev": flux2.LORA_TARGETS, "Wan2.1-T2V-14B": wan.LORA_TARGETS}


def _meta(name: str) -> nn.Module:
    import diffusers

    cls, fields, _ = REAL[name]
    with torch.device("meta"):
        return getattr(diffusers, cls)(**fields)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_denoisers_have_the_published_parameter_counts(name):
    model = _meta(name)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing was allocated
    count = sum(p.numel() for p in model.parameters())
    assert count == COUNTS[name]
    published = REAL[name][2] * 1e9
    assert abs(count - published) < 0.1 * published, f"{name}: {count / 1e9:.2f} B, published {REAL[name][2]} B"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_the_lora_targets_fit_each_architecture(name):
    """Every LoRA target of the adapter names linear layers of the real architecture, and together they cover the
    attention of every block (FLUX.2: its single-stream blocks through to_qkv_mlp_proj)."""
    model, targets = _meta(name), TARGETS[name]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        assert any(n == target or n.endswith("." + target) for n in linear), target
    blocks = {n.split(".")[0] + "." + n.split(".")[1] for n in linear if any(n.endswith("." + t) for t in targets)}
    all_blocks = {f"{attr}.{i}" for attr in ("transformer_blocks", "single_transformer_blocks", "blocks")
                  for i in range(len(getattr(model, attr, [])))}
    assert blocks == all_blocks
