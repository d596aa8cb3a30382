"""FLUX.1 (dev, schnell, or any `FluxTransformer2DModel` checkpoint) loaded from a local diffusers directory.

The directory is what `FluxPipeline.save_pretrained` writes and what the hub's FLUX.1 repositories hold:
model_index.json, transformer/, vae/, text_encoder/ (CLIP-L), tokenizer/, text_encoder_2/ (T5-XXL),
tokenizer_2/. Nothing is ever downloaded: every component is read with local_files_only=True.

The model is the generic `FluxAdapter` (packing, image ids, guidance embedding) with:
- `FluxTextEncoder`: CLIP-L's pooled output + T5's token states, exactly as `FluxPipeline.encode_prompt`;
- `VaeDecoder`: latents -> images with the VAE's scaling and shift factors, as the pipeline decodes.
With `embedding_cache` (a directory written by `mixgrpo preprocess`) the text encoders are not loaded at all.
The loading helpers shared with the SD3 loader live in `mixgrpo.models._diffusers`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.models._diffusers import (PIPELINE_MODULES, check_pipeline_dir, check_pipeline_run, load_pipeline,
                                       module_device, tokenize)
from mixgrpo.models.base import MODELS, Cond, Frozen, Images, ModelSpec, PromptSets, TextEncoder
from mixgrpo.models.flux import FluxAdapter, flux_lora_format

EXAMPLE = "black-forest-labs/FLUX.1-dev"  # the checkpoint the error messages name
TEXT_FOLDERS = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]  # CLIP-L, then T5-XXL


class FluxTextEncoder(Frozen):
    """Frozen CLIP-L + T5 of FLUX.1, encoding like `FluxPipeline.encode_prompt`.

    encode(prompts) -> {"prompt_embeds": [B, L, D_t5] T5 last hidden states (L = max_sequence_length),
                        "pooled": [B, D_clip] CLIP pooled output (77 CLIP tokens)}.
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, tokenizer_2, text_encoder_2: nn.Module,
                 max_sequence_length: int = 512):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.clip = text_encoder.eval().requires_grad_(False)
        self.t5 = text_encoder_2.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        """images: ignored (CLIP and T5 see no image; FLUX.1-Kontext's adapter encodes its input images itself)."""
        prompts = list(prompts)
        clip_ids = tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        pooled = self.clip(clip_ids.to(module_device(self.clip)), output_hidden_states=False).pooler_output
        t5_ids = tokenize(self.tokenizer_2, prompts, self.max_sequence_length)
        states = self.t5(t5_ids.to(module_device(self.t5)), output_hidden_states=False)[0]
        return {"prompt_embeds": states.to(self.t5.dtype), "pooled": pooled.to(self.clip.dtype)}


def load_flux_text_encoder(path: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                           max_sequence_length: int = 512) -> FluxTextEncoder:
    """The CLIP-L + T5 text encoder of a local FLUX.1 pipeline directory (used by `mixgrpo preprocess`)."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path = check_pipeline_dir(path, "flux", components=TEXT_FOLDERS, example=EXAMPLE)
    dtype = parse_dtype(dtype)
    kw = dict(torch_dtype=dtype, local_files_only=True)
    return FluxTextEncoder(
        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).to(device),
        T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
        T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **kw).to(device),
        max_sequence_length=max_sequence_length,
    )


def load_flux(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 1024,
              width: int = 1024, guidance: float | None = 3.5, max_sequence_length: int = 512,
              embedding_cache: str | None = None, text_encoder: TextEncoder | None = None) -> FluxAdapter:
    """A FLUX.1 `FluxAdapter` from a local diffusers pipeline directory, in eval mode.

    path: the pipeline directory (model_index.json, transformer/, vae/, text encoders, tokenizers).
    dtype: weights dtype of every component ("bfloat16" for FLUX.1-dev on GPUs).
    height, width: image size in pixels (multiples of 16: VAE factor 8 x patch 2); latents are
        [16, height / 8, width / 8].
    guidance: FLUX.1-dev's distilled guidance value (the pipeline's guidance_scale); None for a transformer
        without a guidance embedding (FLUX.1-schnell).
    max_sequence_length: T5 tokens per prompt (512 for dev, 256 for schnell).
    embedding_cache: a directory written by `mixgrpo preprocess`; when given, CLIP and T5 are not loaded and
        prompts are looked up in the cache.
    text_encoder: an already loaded text encoder (anything with encode(prompts) -> Cond) to share, e.g. the
        policy's with a frozen reference copy; then none is loaded.
    """
    from diffusers import FluxTransformer2DModel

    # the adapter packs 2 x 2 latent patches into one token (the transformer's own patch_size is 1)
    transformer, decoder, text_encoder, factor = load_pipeline(
        "flux", path, example=EXAMPLE, transformer_class=FluxTransformer2DModel, dtype=dtype, device=device,
        size=(height, width), patch=2, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=lambda root, torch_dtype: load_flux_text_encoder(
            root, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length))
    latent_shape = (transformer.config.in_channels // 4, height // factor, width // factor)
    return FluxAdapter(transformer, text_encoder, patch_size=2, latent_shape=latent_shape, decoder=decoder,
                       guidance=guidance).eval()


def _check_flux_run(args: dict, prompts: PromptSets) -> list[str]:
    return check_pipeline_run("flux", args, prompts, text_folders=TEXT_FOLDERS, t5_tokenizer="tokenizer_2",
                              max_sequence_length=512, text_length=lambda n: n, example=EXAMPLE)


MODELS.add(ModelSpec("flux", load_flux, text_encoder=load_flux_text_encoder, check=_check_flux_run,
                     lora_format=flux_lora_format, modules=PIPELINE_MODULES, token_patch=2, pipeline_sigmas=True))
