"""Stable Diffusion 3 / 3.5 (any `SD3Transformer2DModel` checkpoint) loaded from a local diffusers directory.

The directory is what `StableDiffusion3Pipeline.save_pretrained` writes and what the hub's SD3 / SD3.5
repositories hold: model_index.json, transformer/, vae/, text_encoder/ (CLIP-L), text_encoder_2/ (CLIP-G),
text_encoder_3/ (T5-XXL) and their tokenizers. Nothing is downloaded (local_files_only=True).

- `SD3TextEncoder` encodes exactly like `StableDiffusion3Pipeline.encode_prompt` (no clip_skip): token states
  = [CLIP-L penultimate | CLIP-G penultimate] zero-padded to T5's width, followed by T5's states along the
  sequence; pooled = [CLIP-L projection | CLIP-G projection]. Without T5 the T5 part is zeros, as in the pipeline.
- `SD3Adapter` maps (x, sigma, cond) to the transformer's output with timestep = 1000 sigma (what the
  pipeline's FlowMatchEulerDiscreteScheduler passes); SD3 predicts the velocity v ~= eps - x0 directly.
- Classifier-free guidance is not done here: the rollout batches cond and uncond (`encode_prompts([""])`),
  like the pipeline, so the adapter is a plain conditional velocity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.models._diffusers import (PIPELINE_MODULES, check_pipeline_dir, check_pipeline_run, load_pipeline,
                                       module_device, tokenize)
from mixgrpo.models.base import MODELS, Cond, Frozen, ModelSpec, PromptSets, TextEncoder, TransformerAdapter

EXAMPLE = "stabilityai/stable-diffusion-3.5-medium"  # the checkpoint the error messages name
NUM_TRAIN_TIMESTEPS = 1000  # SD3's transformer takes timestep = 1000 sigma


class SD3TextEncoder(Frozen):
    """Frozen CLIP-L, CLIP-G and T5 of SD3, encoding like `StableDiffusion3Pipeline.encode_prompt`.

    encode(prompts) -> {"prompt_embeds": [B, 77 + L, D] (77 CLIP tokens, then L = max_sequence_length T5
    tokens; D = joint_attention_dim, T5's width), "pooled": [B, P_L + P_G] (the two CLIP projections)}.
    text_encoder_3 = None drops T5 (saves ~10 GB): its part of "prompt_embeds" is zeros of width `t5_dim`.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                 tokenizer_3=None, text_encoder_3: nn.Module | None = None, max_sequence_length: int = 256,
                 t5_dim: int | None = None):
        super().__init__()
        if text_encoder_3 is None and t5_dim is None:
            raise ValueError("SD3TextEncoder without T5 needs t5_dim (the transformer's joint_attention_dim)")
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.clip_l = text_encoder.eval().requires_grad_(False)
        self.clip_g = text_encoder_2.eval().requires_grad_(False)
        self.t5 = None if text_encoder_3 is None else text_encoder_3.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length
        self.t5_dim = t5_dim if text_encoder_3 is None else text_encoder_3.config.d_model

    def _clip(self, tokenizer, encoder: nn.Module, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate hidden states [B, 77, H], projected pooled output [B, P]) of one CLIP."""
        # The pipeline pads both CLIPs to the first tokenizer's length (77 for every real checkpoint).
        ids = tokenize(tokenizer, prompts, self.tokenizer.model_max_length)
        out = encoder(ids.to(module_device(encoder)), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        states_l, pooled_l = self._clip(self.tokenizer, self.clip_l, prompts)
        states_g, pooled_g = self._clip(self.tokenizer_2, self.clip_g, prompts)
        clip_states = torch.cat([states_l, states_g], dim=-1).to(self.clip_l.dtype)   # [B, 77, H_L + H_G]
        if self.t5 is None:
            t5_states = clip_states.new_zeros(len(prompts), self.max_sequence_length, self.t5_dim)
        else:
            ids = tokenize(self.tokenizer_3, prompts, self.max_sequence_length)
            t5_states = self.t5(ids.to(module_device(self.t5)))[0].to(self.t5.dtype)  # [B, L, D]
        # Zero-pad the CLIP states to T5's width D (the pipeline's F.pad), then CLIP tokens first.
        clip_states = nn.functional.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
        return {"prompt_embeds": torch.cat([clip_states, t5_states], dim=-2),          # [B, 77 + L, D]
                "pooled": torch.cat([pooled_l, pooled_g], dim=-1)}                     # [B, P_L + P_G]


class SD3Adapter(TransformerAdapter):
    """(x, sigma, cond) -> velocity for an `SD3Transformer2DModel` on VAE latents.

    transformer: the diffusers model; latent_shape (C, H, W) with C = in_channels, H and W divisible by its patch.
    text_encoder: any object with `encode(prompts) -> Cond` ("prompt_embeds" [B, L, D], "pooled" [B, P]):
        an `SD3TextEncoder` or a `mixgrpo.models.text.EmbeddingCache`.
    decoder: latents -> images in [0, 1] (a `VaeDecoder`).
    """

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int],
                 decoder: Callable[[torch.Tensor], torch.Tensor]):
        c, h, w = latent_shape
        patch = transformer.config.patch_size
        if c != transformer.config.in_channels:
            raise ConfigError(f"latent_shape {latent_shape}: C must equal the transformer's in_channels "
                              f"{transformer.config.in_channels}")
        if h % patch or w % patch:
            raise ConfigError(f"latent_shape {latent_shape}: H and W must be divisible by the patch size {patch}")
        super().__init__(transformer, text_encoder, decoder, (c, h, w))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, C, H, W]; sigma: [B] (or a scalar) in [0, 1]; returns [B, C, H, W] in x's dtype."""
        dtype = self.transformer.dtype
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        out = self.transformer(
            hidden_states=x.to(dtype),
            # float32 like the scheduler's timesteps (1000 sigma), whatever the weights' dtype.
            timestep=sigma.float() * NUM_TRAIN_TIMESTEPS,
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),                   # [B, L, D]
            pooled_projections=cond["pooled"].to(dtype),                             # [B, P]
            return_dict=False,
        )[0]
        return out.to(x.dtype)


def load_sd3_text_encoder(path: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                          max_sequence_length: int = 256, use_t5: bool = True) -> SD3TextEncoder:
    """The CLIP-L + CLIP-G (+ T5) text encoder of a local SD3 pipeline directory (used by `mixgrpo preprocess`)."""
    import json

    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path = check_pipeline_dir(path, "sd3", components=_text_folders(use_t5), example=EXAMPLE)
    kw = dict(torch_dtype=parse_dtype(dtype), local_files_only=True)
    t5_dim = None
    if use_t5:
        tokenizer_3 = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", local_files_only=True)
        text_encoder_3 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw).to(device)
    else:
        tokenizer_3 = text_encoder_3 = None
        t5_dim = json.loads((path / "transformer" / "config.json").read_text())["joint_attention_dim"]
    return SD3TextEncoder(
        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **kw).to(device),
        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
        CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw).to(device),
        tokenizer_3, text_encoder_3, max_sequence_length=max_sequence_length, t5_dim=t5_dim,
    )


def load_sd3(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 1024,
             width: int = 1024, max_sequence_length: int = 256, use_t5: bool = True,
             embedding_cache: str | None = None, text_encoder: TextEncoder | None = None) -> SD3Adapter:
    """An `SD3Adapter` from a local SD3 / SD3.5 diffusers pipeline directory, in eval mode.

    path: the pipeline directory (model_index.json, transformer/, vae/, three text encoders, tokenizers).
    dtype: weights dtype of every component ("bfloat16" on GPUs).
    height, width: image size in pixels (multiples of 16: VAE factor 8 x patch 2); latents are
        [16, height / 8, width / 8].
    max_sequence_length: T5 tokens per prompt (the pipeline's default 256).
    use_t5: False drops T5-XXL (zeros in its place, as the pipeline does with text_encoder_3=None).
    embedding_cache: a directory written by `mixgrpo preprocess`; when given, no text encoder is loaded.
    text_encoder: an already loaded text encoder (anything with encode(prompts) -> Cond) to share, e.g. the
        policy's with a frozen reference copy; then none is loaded.
    """
    from diffusers import SD3Transformer2DModel

    transformer, decoder, text_encoder, factor = load_pipeline(
        "sd3", path, example=EXAMPLE, transformer_class=SD3Transformer2DModel, dtype=dtype, device=device,
        size=(height, width), patch=None, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=lambda root, torch_dtype: load_sd3_text_encoder(
            root, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length, use_t5=use_t5))
    latent_shape = (transformer.config.in_channels, height // factor, width // factor)
    return SD3Adapter(transformer, text_encoder, latent_shape, decoder).eval()


def _text_folders(use_t5: bool) -> list[str]:
    """CLIP-L's and CLIP-G's folders, then T5-XXL's unless use_t5 is off."""
    return ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"] + (["text_encoder_3", "tokenizer_3"]
                                                                             if use_t5 else [])


def _text_tokens(max_sequence_length: int) -> int:
    return 77 + max_sequence_length  # CLIP's 77 tokens, then T5's


def _check_sd3_run(args: dict, prompts: PromptSets) -> list[str]:
    t5 = args.get("use_t5", True)
    return check_pipeline_run("sd3", args, prompts, text_folders=_text_folders(t5),
                              t5_tokenizer="tokenizer_3" if t5 else None, max_sequence_length=256,
                              text_length=_text_tokens,
                              example=EXAMPLE)


def _sd3_lora_format() -> tuple[type, type]:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    return SD3Transformer2DModel, StableDiffusion3Pipeline


MODELS.add(ModelSpec("sd3", load_sd3, text_encoder=load_sd3_text_encoder, check=_check_sd3_run,
                     lora_format=_sd3_lora_format, modules=PIPELINE_MODULES,
                     text_tokens=_text_tokens))
