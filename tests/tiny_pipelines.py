"""Tiny random FLUX.1 and SD3.5 diffusers pipelines, built offline, for the tests.

Every component has the real architecture class (FluxTransformer2DModel / SD3Transformer2DModel,
AutoencoderKL, CLIPTextModel(WithProjection), T5EncoderModel) at a toy width, random weights, and the real
checkpoint layout once saved with `save_pretrained`: the loaders of `mixgrpo.models.flux_pipeline` and
`mixgrpo.models.sd3` read these directories exactly as they read FLUX.1-dev or SD3.5.

Tokenizers are constructed in code (transformers >= 5 accepts a vocabulary directly): CLIP gets a
byte-level BPE vocabulary with no merges (one token per byte), T5 a unigram vocabulary of single
characters. They tokenise any text, which is all a random model needs.

The component widths are deliberately different from each other (CLIP-L 8, CLIP-G 16, T5 32 in SD3), so a
wrong concatenation, padding or pooling order fails a shape check or an equality test instead of passing
by accident.
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77  # the CLIP context length of every real FLUX / SD3 checkpoint


def _byte_alphabet() -> list[str]:
    """The 256 printable characters GPT-2 / CLIP byte-level BPE uses to stand for the 256 byte values."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH):
    """A `CLIPTokenizer` with one token per byte (514 tokens: 256 bytes, 256 word-final bytes, bos, eos)."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def tiny_t5_tokenizer():
    """A T5 tokenizer (unigram) over lowercase letters, digits and punctuation, with pad=0, eos=1, unk=2."""
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [("▁" + c, -1.5) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _clip_text_model(tokenizer, hidden: int, projection: int | None, seed: int):
    """A 2-layer CLIP text encoder; with `projection` it is a CLIPTextModelWithProjection (SD3), else CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection or hidden, hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def _t5_encoder(tokenizer, d_model: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=8, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()  # eval: T5 dropout would make encodings random otherwise


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float, seed: int):
    """A 2-level AutoencoderKL (downsampling factor 2), configured like FLUX's / SD3's (no quant convs)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    ).eval()


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random `FluxPipeline` at toy size (FLUX.1-dev layout: guidance embedding, 16 latent channels).

    VAE factor 2, so a 32x32 image has 16x16x16 latents packed into 8x8 = 64 tokens of 64 channels.
    The scheduler uses FLUX.1's resolution-dependent (dynamic) shift.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, seed=seed + 1),
        text_encoder=_clip_text_model(clip_tok, hidden=16, projection=None, seed=seed + 2),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(t5_tok, d_model=32, seed=seed + 3),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def tiny_sd3_pipeline(seed: int = 0):
    """A random `StableDiffusion3Pipeline` at toy size (SD3.5-Medium layout: qk RMS-norm, a dual-attention layer).

    CLIP-L (hidden 8, projection 12) and CLIP-G (hidden 16, projection 20) give pooled 12 + 20 = 32 and token
    states 8 + 16 = 24 wide, zero-padded to T5's 32. VAE factor 2 (32x32 images -> 16x16x16 latents),
    transformer patch 2 (64 tokens). The scheduler uses SD3's static shift 3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok_l, clip_tok_g, t5_tok = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, seed=seed + 1),
        text_encoder=_clip_text_model(clip_tok_l, hidden=8, projection=12, seed=seed + 2),
        tokenizer=clip_tok_l,
        text_encoder_2=_clip_text_model(clip_tok_g, hidden=16, projection=20, seed=seed + 3),
        tokenizer_2=clip_tok_g,
        text_encoder_3=_t5_encoder(t5_tok, d_model=32, seed=seed + 4),
        tokenizer_3=t5_tok,
        transformer=transformer,
    )


def save_tiny_flux(directory: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Build `tiny_flux_pipeline` and save it as a diffusers pipeline directory (model_index.json + folders)."""
    tiny_flux_pipeline(seed, guidance_embeds).save_pretrained(directory)
    return Path(directory)


def tiny_flux_kontext_pipeline(seed: int = 0):
    """A random `FluxKontextPipeline` at toy size: `tiny_flux_pipeline`'s components (FLUX.1-Kontext-dev has FLUX.1's
    layout and architecture; it differs in weights and in the input image's tokens)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**tiny_flux_pipeline(seed).components)


def save_tiny_flux_kontext(directory: str | Path, seed: int = 0) -> Path:
    """Build `tiny_flux_kontext_pipeline` and save it as a diffusers pipeline directory."""
    tiny_flux_kontext_pipeline(seed).save_pretrained(directory)
    return Path(directory)


def save_tiny_sd3(directory: str | Path, seed: int = 0) -> Path:
    """Build `tiny_sd3_pipeline` and save it as a diffusers pipeline directory (model_index.json + folders)."""
    tiny_sd3_pipeline(seed).save_pretrained(directory)
    return Path(directory)


# ----------------------------------------------------------------------------------------------------------------
# Wan 2.1 / 2.2 text-to-video

WAN_VARIANTS = ("2.1", "2.2-ti2v", "2.2-a14b")


def _wan_transformer(in_channels: int, seed: int, out_channels: int | None = None, image_dim: int | None = None):
    """A 2-block WanTransformer3DModel of width 24; with image_dim, Wan 2.1 I2V's image cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=out_channels or in_channels, text_dim=32,
                                 freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32, image_dim=image_dim,
                                 added_kv_proj_dim=24 if image_dim else None).eval()


def tiny_wan_pipeline(seed: int = 0, variant: str = "2.1"):
    """A random `WanPipeline` at toy size, in the layout of Wan2.1-T2V ("2.1": one transformer, the 16-channel
    VAE of spatial factor 8), Wan2.2-TI2V-5B ("2.2-ti2v": the residual VAE with patch 2, spatial factor 16, and
    per-token timesteps) or Wan2.2-T2V-A14B ("2.2-a14b": two experts split at boundary_ratio 0.875).

    UMT5 of width 32; 64x64 frames give 8x8 (4x4 for 2.2-ti2v) latents; 5 frames give 2 latent frames. The
    scheduler is the flow-matching Euler one with shift 3 (Wan's own default is UniPC with flow_shift 3-5; the
    tests hand it mixgrpo's sigmas).
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {WAN_VARIANTS}")
    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)).eval()
    torch.manual_seed(seed + 2)
    mean, std = [0.1 * (i % 5) - 0.2 for i in range(16)], [1.0 + 0.1 * (i % 7) for i in range(16)]
    if variant == "2.2-ti2v":
        vae = AutoencoderKLWan(base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
                               in_channels=12, out_channels=12, scale_factor_spatial=16, latents_mean=mean,
                               latents_std=std).eval()
    else:
        vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std).eval()
    two = variant == "2.2-a14b"
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=_wan_transformer(16, seed), transformer_2=_wan_transformer(16, seed + 3) if two
                       else None, boundary_ratio=0.875 if two else None, expand_timesteps=variant == "2.2-ti2v")


def save_tiny_wan(directory: str | Path, seed: int = 0, variant: str = "2.1") -> Path:
    """Build `tiny_wan_pipeline` and save it as a diffusers pipeline directory."""
    tiny_wan_pipeline(seed, variant).save_pretrained(directory)
    return Path(directory)


WAN_I2V_VARIANTS = ("2.1", "2.2-ti2v", "2.2-a14b")


def tiny_wan_i2v_pipeline(seed: int = 0, variant: str = "2.1"):
    """A random `WanImageToVideoPipeline` at toy size: "2.1" in Wan2.1-I2V's layout (a CLIP vision encoder of width 16
    on 32 x 32 crops, whose penultimate states the transformer cross-attends to; the transformer takes the 16 noisy
    channels, 4 mask channels and the first frame's 16 latent channels: in_channels 36), or "2.2-ti2v" in
    Wan2.2-TI2V-5B's (no image encoder; the first frame's latents replace the first latent frame, per-token
    timesteps), or "2.2-a14b" in Wan2.2-I2V-A14B's (2.1's conditioning channels without the image encoder, two
    experts split at boundary_ratio 0.875). The text encoder, VAE and scheduler are `tiny_wan_pipeline`'s."""
    from diffusers import WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    if variant not in WAN_I2V_VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {WAN_I2V_VARIANTS}")
    parts = tiny_wan_pipeline(seed, "2.1" if variant == "2.2-a14b" else variant).components
    if variant == "2.2-a14b":
        return WanImageToVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                       vae=parts["vae"], scheduler=parts["scheduler"],
                                       transformer=_wan_transformer(36, seed, out_channels=16),
                                       transformer_2=_wan_transformer(36, seed + 3, out_channels=16),
                                       boundary_ratio=0.875)
    if variant == "2.2-ti2v":
        return WanImageToVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"],
                                       vae=parts["vae"], scheduler=parts["scheduler"],
                                       transformer=_wan_transformer(16, seed), expand_timesteps=True)
    torch.manual_seed(seed + 4)
    image_encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, image_size=32, patch_size=8)).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return WanImageToVideoPipeline(tokenizer=parts["tokenizer"], text_encoder=parts["text_encoder"], vae=parts["vae"],
                                   scheduler=parts["scheduler"], image_processor=image_processor,
                                   image_encoder=image_encoder,
                                   transformer=_wan_transformer(36, seed, out_channels=16, image_dim=16))


def save_tiny_wan_i2v(directory: str | Path, seed: int = 0, variant: str = "2.1") -> Path:
    """Build `tiny_wan_i2v_pipeline` and save it as a diffusers pipeline directory."""
    tiny_wan_i2v_pipeline(seed, variant).save_pretrained(directory)
    return Path(directory)


# ----------------------------------------------------------------------------------------------------------------
# Qwen-Image, FLUX.2: chat-template text encoders (Qwen2.5-VL, Qwen3, Mistral 3) over byte-level vocabularies

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's chat template as FLUX.2 klein uses it: a user turn, the generation prompt, thinking switched off.
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
                  "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


QWEN_VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def tiny_qwen_tokenizer(chat_template: str | None = None, vision: bool = False):
    """A Qwen2 tokenizer (byte-level BPE, no merges: one token per byte) with Qwen's special tokens (and with
    `vision`, Qwen2.5-VL's image tokens)."""
    from transformers import Qwen2Tokenizer

    special = QWEN_SPECIAL + (QWEN_VISION if vision else [])
    vocab = {t: i for i, t in enumerate(_byte_alphabet() + special)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=chat_template)
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    return tokenizer


def tiny_qwen_image_pipeline(seed: int = 0):
    """A random `QwenImagePipeline` at toy size (Qwen-Image's layout): Qwen2.5-VL of hidden width 32 (with a tiny
    vision tower, never used for text), a 2-block transformer, the causal VAE with 16 channels and factor 8
    (64x64 images -> 8x8 latents -> 16 tokens). The scheduler is Qwen-Image's kind (dynamic exponential shift)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_qwen_tokenizer()
    special = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         bos_token_id=special[0], eos_token_id=special[2], pad_token_id=special[0]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]))
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              axes_dims_rope=(4, 6, 6)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True],
                                 latents_mean=[0.1 * (i % 5) - 0.2 for i in range(16)],
                                 latents_std=[1.0 + 0.1 * (i % 7) for i in range(16)]).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02,
                                                time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def save_tiny_qwen_image(directory: str | Path, seed: int = 0) -> Path:
    """Build `tiny_qwen_image_pipeline` and save it as a diffusers pipeline directory."""
    tiny_qwen_image_pipeline(seed).save_pretrained(directory)
    return Path(directory)


QWEN_EDIT_VARIANTS = ("2509", "2511")


def tiny_qwen_image_edit_pipeline(seed: int = 0, variant: str = "2511"):
    """A random `QwenImageEditPlusPipeline` at toy size, in Qwen-Image-Edit-2509's layout ("2509") or 2511's (the
    transformer's zero_cond_t: the input images' tokens modulated at timestep 0): `tiny_qwen_image_pipeline`'s
    transformer, VAE and scheduler, and a Qwen2.5-VL whose vision tower (1 block of width 16, the real patch 14 and
    2 x 2 merge) sees the input images. Its processor is a `TinyQwenVLProcessor` (see there)."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if variant not in QWEN_EDIT_VARIANTS:
        raise ValueError(f"variant {variant!r}: one of {QWEN_EDIT_VARIANTS}")
    parts = tiny_qwen_image_pipeline(seed).components
    tokenizer = tiny_qwen_tokenizer(vision=True)
    special = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL + QWEN_VISION)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                         bos_token_id=special[0], eos_token_id=special[2], pad_token_id=special[0]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        vision_start_token_id=special[3], vision_end_token_id=special[4], image_token_id=special[5],
        video_token_id=special[6])
    torch.manual_seed(seed + 1)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = parts["transformer"]
    if variant == "2511":
        from diffusers import QwenImageTransformer2DModel

        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel.from_config(transformer.config, zero_cond_t=True).eval()
    processor = _qwen_vl_processor_class()(image_processor=Qwen2VLImageProcessorPil(), tokenizer=tokenizer)
    return QwenImageEditPlusPipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=text_encoder,
                                     tokenizer=tokenizer, processor=processor, transformer=transformer)


@functools.cache
def _qwen_vl_processor_class():
    """TinyQwenVLProcessor, defined when first used (it subclasses a transformers class)."""
    from transformers import Qwen2VLProcessor

    class TinyQwenVLProcessor(Qwen2VLProcessor):
        """transformers 5 builds a `Qwen2VLProcessor` only with a video processor, whose class needs torchvision (which
        the tests must not need): this one skips that class check and has none (the edit pipelines never pass a
        video). Saved, it is a Qwen2VLProcessor directory (the tokenizer and the image processor's config)."""

        def __init__(self, image_processor=None, tokenizer=None, video_processor=None, **kwargs):
            super().__init__(image_processor, tokenizer, video_processor, **kwargs)

        def check_argument_for_proper_class(self, argument_name, argument):
            return type(argument)

        def save_pretrained(self, save_directory, **kwargs):
            self.tokenizer.save_pretrained(save_directory)
            self.image_processor.save_pretrained(save_directory)

        @classmethod
        def from_pretrained(cls, directory, **kwargs):
            from transformers import AutoImageProcessor, AutoTokenizer

            return cls(AutoImageProcessor.from_pretrained(directory, **kwargs),
                       AutoTokenizer.from_pretrained(directory, **kwargs))

    return TinyQwenVLProcessor


def save_tiny_qwen_image_edit(directory: str | Path, seed: int = 0, variant: str = "2511") -> Path:
    """Build `tiny_qwen_image_edit_pipeline` and save it as a diffusers pipeline directory, its processor/ in the
    official layout (model_index.json names Qwen2VLProcessor, as the hub's Qwen-Image-Edit repositories do)."""
    import json

    tiny_qwen_image_edit_pipeline(seed, variant).save_pretrained(directory)
    index = Path(directory) / "model_index.json"
    config = json.loads(index.read_text())
    config["processor"] = ["transformers", "Qwen2VLProcessor"]
    index.write_text(json.dumps(config, indent=2) + "\n")
    return Path(directory)


def load_tiny_qwen_vl_processor(directory: str | Path):
    """The processor/ of a `save_tiny_qwen_image_edit` directory, as a `TinyQwenVLProcessor` for the stock pipeline."""
    return _qwen_vl_processor_class().from_pretrained(Path(directory) / "processor", local_files_only=True)


MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]"]
# Mistral-Small-3.1's chat format as FLUX.2 dev uses it: a system turn, then the user's text (content lists).
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
                    "{{ m['content'][0]['text'] }}[/SYSTEM_PROMPT]{% else %}[INST]{% for c in m['content'] %}"
                    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}[/INST]"
                    "{% endif %}{% endfor %}")


def tiny_mistral_tokenizer():
    """A byte-level BPE tokenizer (one token per byte) with Mistral's special tokens and a chat template. FLUX.2 dev's
    real tokenizer/ is a Pixtral processor, which needs torchvision; its tokenizer files load on their own, as
    this one does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(MISTRAL_SPECIAL + _byte_alphabet())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=MISTRAL_SPECIAL[4:])
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def _flux2_parts(seed: int, joint_attention_dim: int, guidance_embeds: bool):
    """A 1 + 1-block Flux2Transformer2DModel (in_channels 16: 2 x 2 patches of 4 VAE channels) and a 2-level
    AutoencoderKLFlux2 (factor 2) whose BatchNorm statistics are not the identity."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
                             norm_num_groups=4).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 16))
        vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, 16))
    return transformer, vae


def tiny_flux2_pipeline(seed: int = 0, variant: str = "klein"):
    """A random FLUX.2 pipeline at toy size: "dev" (`Flux2Pipeline`: Mistral 3 with a tiny Pixtral vision tower,
    guidance embedding) or "klein" (`Flux2KleinPipeline`: Qwen3, no guidance embedding). The language models have
    width 16 and enough layers (30 / 27) for the pipelines' default text layers, so the defaults are what is tested:
    text states 3 x 16 = 48 wide. 32x32 images -> latents [16, 8, 8] (VAE factor 2, 2 x 2 patches): 64 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    if variant == "dev":
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        tokenizer = tiny_mistral_tokenizer()
        ids = tokenizer.convert_tokens_to_ids(MISTRAL_SPECIAL)
        config = Mistral3Config(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                             num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                             bos_token_id=ids[1], eos_token_id=ids[2], pad_token_id=ids[3]),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                               head_dim=8, patch_size=4, image_size=32),
            image_token_index=ids[8], spatial_merge_size=1)
        torch.manual_seed(seed + 2)
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
        transformer, vae = _flux2_parts(seed, 48, guidance_embeds=True)
        return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_qwen_tokenizer(QWEN3_TEMPLATE)
    special = tokenizer.convert_tokens_to_ids(QWEN_SPECIAL)
    torch.manual_seed(seed + 2)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, bos_token_id=None,
        eos_token_id=special[2], pad_token_id=special[0])).eval()
    transformer, vae = _flux2_parts(seed, 48, guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer)


def save_tiny_flux2(directory: str | Path, seed: int = 0, variant: str = "klein") -> Path:
    """Build `tiny_flux2_pipeline` and save it as a diffusers pipeline directory."""
    tiny_flux2_pipeline(seed, variant).save_pretrained(directory)
    return Path(directory)
