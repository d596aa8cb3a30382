"""Qwen-Image (any `QwenImagePipeline` checkpoint) loaded from a local diffusers directory.

The directory is what `QwenImagePipeline.save_pretrained` writes and what the hub's Qwen/Qwen-Image repository
holds: model_index.json, transformer/ (QwenImageTransformer2DModel), vae/ (AutoencoderKLQwenImage, a causal video
VAE used on one frame), text_encoder/ (Qwen2.5-VL-7B-Instruct), tokenizer/. Nothing is downloaded.

What the adapter does, as `QwenImagePipeline.__call__` does it:
- latents [16, H/8, W/8] are packed into 2 x 2 patches (`mixgrpo.models.flux.pack`, the pipeline's _pack_latents),
  with img_shapes [(1, H/16, W/16)] for the transformer's 3-D rotary embedding;
- time: timestep = sigma (the pipeline passes its scheduler's t / 1000);
- text (`QwenImageTextEncoder`): the prompt in the pipeline's chat template, Qwen2.5-VL's last hidden states with
  the template's first PROMPT_TEMPLATE_START tokens dropped, then zero-padded to max_sequence_length with a mask
  ("prompt_mask"), so that a prompt's conditioning has one shape in every batch and in the embedding cache. The
  transformer masks the padding out of attention and gives text tokens rotary positions that do not depend on
  the padded length, so the padding changes nothing; the adapter trims it to the batch's longest prompt;
- true CFG is the rollout's (cond and uncond in one batch) with the pipeline's combination (`guide`): the guided
  velocity v_u + s (v_c - v_u) rescaled, token by token, to the norm of the conditional one;
- decoding: latents * latents_std + latents_mean through the VAE as one frame, images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.models._diffusers import (PIPELINE_MODULES, CausalVaeDecoder, check_pipeline_dir, check_pipeline_run,
                                       check_size, load_components, module_device)
from mixgrpo.models.base import MODELS, Cond, Frozen, ModelSpec, PromptSets, TextEncoder, TransformerAdapter
from mixgrpo.models.flux import pack, unpack
from mixgrpo.models.text import note_truncations

EXAMPLE = "Qwen/Qwen-Image"
# QwenImagePipeline's prompt template and the number of its leading tokens dropped from the states (the system
# part and "<|im_start|>user\n" in Qwen2.5-VL's tokenizer): QwenImagePipeline.__init__ sets both.
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATE_START = 34
TOKENIZER_MAX_LENGTH = 1024  # the pipeline's tokenizer_max_length (prompt tokens after the template's start)
# Attention projections of both streams of every block: the LoRA layers of the recipes.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class QwenImageTextEncoder(Frozen):
    """Frozen Qwen2.5-VL of Qwen-Image, encoding like `QwenImagePipeline.encode_prompt`, padded to a fixed length.

    encode(prompts) -> {"prompt_embeds": [B, L, D] (L = max_sequence_length, zeros past a prompt's end; D = 3584),
                        "prompt_mask": [B, L] long, 1 on the prompt's tokens}.
    A prompt of more than L tokens is truncated to L, as the pipeline's max_sequence_length does (the first with a
    warning, the others counted: `note_truncations`).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512):
        super().__init__()
        if not 1 <= max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ConfigError(f"qwen_image: max_sequence_length = {max_sequence_length} must be in 1..1024 (the "
                              f"pipeline's limit)")
        self.tokenizer = tokenizer
        self.qwen = text_encoder.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        texts = [PROMPT_TEMPLATE.format(p) for p in prompts]
        tokens = self.tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_START, padding=True,
                                truncation=True, return_tensors="pt")
        device = module_device(self.qwen)
        mask = tokens.attention_mask.to(device)
        states = self.qwen(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                           output_hidden_states=True).hidden_states[-1]                      # [B, T, D]
        length = self.max_sequence_length
        embeds = states.new_zeros(len(texts), length, states.shape[-1])
        out_mask = torch.zeros(len(texts), length, dtype=torch.long, device=device)
        lengths = []
        for b in range(len(texts)):
            real = states[b][mask[b].bool()][PROMPT_TEMPLATE_START:]                       # the prompt's tokens
            lengths.append(real.shape[0])
            real = real[:length]
            embeds[b, :real.shape[0]] = real
            out_mask[b, :real.shape[0]] = 1
        note_truncations(self.tokenizer, length, prompts, lengths)
        return {"prompt_embeds": embeds.to(self.qwen.dtype), "prompt_mask": out_mask}


def load_qwen_image_text_encoder(path: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                                 max_sequence_length: int = 512) -> QwenImageTextEncoder:
    """The Qwen2.5-VL text encoder of a local Qwen-Image pipeline directory (used by `mixgrpo preprocess`)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    path = check_pipeline_dir(path, "qwen_image", components=["text_encoder", "tokenizer"], example=EXAMPLE)
    return QwenImageTextEncoder(
        AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        Qwen2_5_VLForConditionalGeneration.from_pretrained(path, subfolder="text_encoder",
                                                           torch_dtype=parse_dtype(dtype),
                                                           local_files_only=True).to(device),
        max_sequence_length=max_sequence_length)


class QwenImageAdapter(TransformerAdapter):
    """(x, sigma, cond) -> velocity for a `QwenImageTransformer2DModel` on VAE latents.

    transformer: the diffusers model (in_channels = 4 C: 2 x 2 patches of the C latent channels).
    text_encoder: anything with encode(prompts) -> {"prompt_embeds" [B, L, D], "prompt_mask" [B, L]}.
    latent_shape: (C, h, w), h and w even. decoder: latents -> images in [0, 1].
    """

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int],
                 decoder: nn.Module):
        c, h, w = latent_shape
        if transformer.config.in_channels != 4 * c:
            raise ConfigError(f"latent_shape {latent_shape}: the transformer's in_channels "
                              f"{transformer.config.in_channels} must be 4 C (2 x 2 patches)")
        if h % 2 or w % 2:
            raise ConfigError(f"latent_shape {latent_shape}: h and w must be even (2 x 2 patches)")
        if transformer.config.guidance_embeds:
            raise ConfigError("qwen_image: a transformer with a guidance embedding is not Qwen-Image's")
        super().__init__(transformer, text_encoder, decoder, latent_shape)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, C, h, w]; sigma: [B] (or a scalar) in [0, 1]; returns [B, C, h, w] in x's dtype."""
        return self.velocity(x, sigma, cond)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, extra: torch.Tensor | None = None,
                 extra_shapes: Sequence[tuple[int, int, int]] = ()) -> torch.Tensor:
        """`forward`, with the tokens `extra` [B, M, 4 C] (e.g. an edit's input images, grids `extra_shapes` of
        (1, rows, cols) each) after the target's, their outputs dropped."""
        dtype = self.transformer.dtype
        b, _, h, w = x.shape
        sigma = torch.as_tensor(sigma, device=x.device).expand(b)
        mask = cond["prompt_mask"].to(x.device)
        used = max(int(mask.sum(1).max()), 1)  # the padding after the longest prompt is masked anyway: trim it
        mask = mask[:, :used]
        tokens = pack(x.to(dtype), 2)                                                     # [B, h w / 4, 4 C]
        if extra is not None:
            tokens = torch.cat([tokens, extra.to(dtype)], dim=1)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond["prompt_embeds"][:, :used].to(dtype),              # [B, L', D]
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # the pipeline's None when all real
            timestep=(sigma.float() * 1000 / 1000).to(dtype),  # the scheduler's t / 1000, as the pipeline divides
            img_shapes=[[(1, h // 2, w // 2), *extra_shapes]] * b,
            return_dict=False,
        )[0]
        return unpack(out[:, :h * w // 4], self.latent_shape, 2).to(x.dtype)

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's true CFG: v = v_u + s (v_c - v_u), then each token (2 x 2 patch, all channels) rescaled to
        the norm of the conditional velocity's token: v * ||v_c|| / ||v||."""
        guided = v_uncond + scale * (v_cond - v_uncond)
        tokens, cond_tokens = pack(guided, 2), pack(v_cond, 2)                     # [N, h w / 4, 4 C]
        rescaled = tokens * (cond_tokens.norm(dim=-1, keepdim=True) / tokens.norm(dim=-1, keepdim=True))
        return unpack(rescaled, self.latent_shape, 2)


class QwenImageDecoder(nn.Module):
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1]: the causal VAE on one frame, as the pipeline decodes."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.video = CausalVaeDecoder(vae)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video(latents.unsqueeze(2))[:, 0]


def load_qwen_image(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 1024,
                    width: int = 1024, max_sequence_length: int = 512, embedding_cache: str | None = None,
                    text_encoder: TextEncoder | None = None) -> QwenImageAdapter:
    """A Qwen-Image `QwenImageAdapter` from a local diffusers pipeline directory, in eval mode.

    path: the pipeline directory (model_index.json, transformer/, vae/, text_encoder/, tokenizer/).
    dtype: weights dtype of every component ("bfloat16" on GPUs).
    height, width: image size in pixels (multiples of 16: VAE factor 8 x patch 2); latents are [16, H/8, W/8].
    max_sequence_length: prompt tokens kept (the pipeline's default 512, at most 1024).
    embedding_cache: a directory written by `mixgrpo preprocess`; when given, Qwen2.5-VL is not loaded.
    text_encoder: an already loaded text encoder to share (e.g. with a frozen reference copy).
    """
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    def factor(c: dict[str, nn.Module]) -> int:
        return 2 ** len(c["vae"].config.temperal_downsample)  # the pipeline's vae_scale_factor

    components, text_encoder = load_components(
        "qwen_image", path, example=EXAMPLE,
        classes={"transformer": QwenImageTransformer2DModel, "vae": AutoencoderKLQwenImage}, dtype=dtype,
        device=device, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=lambda root, torch_dtype: load_qwen_image_text_encoder(
            root, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length),
        cache_widths=lambda c: {"prompt_embeds": c["transformer"].config.joint_attention_dim},
        check=lambda c: check_size("qwen_image", (height, width), 2 * factor(c), f"VAE factor {factor(c)} x patch 2"))
    transformer, vae = components["transformer"], components["vae"]
    latent_shape = (vae.config.z_dim, height // factor(components), width // factor(components))
    return QwenImageAdapter(transformer, text_encoder, latent_shape, QwenImageDecoder(vae)).eval()


def _check_qwen_image_run(args: dict, prompts: PromptSets) -> list[str]:
    return check_pipeline_run("qwen_image", args, prompts, text_folders=["text_encoder", "tokenizer"],
                              t5_tokenizer=None, max_sequence_length=512, text_length=lambda n: n, example=EXAMPLE,
                              widths={"prompt_embeds": "joint_attention_dim"})


def _qwen_image_lora_format() -> tuple[type, type]:
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    return QwenImageTransformer2DModel, QwenImagePipeline


MODELS.add(ModelSpec("qwen_image", load_qwen_image, text_encoder=load_qwen_image_text_encoder,
                     check=_check_qwen_image_run, lora_format=_qwen_image_lora_format,
                     modules=PIPELINE_MODULES, pipeline_sigmas=True))
