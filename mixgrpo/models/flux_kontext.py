"""FLUX.1-Kontext (dev, or any `FluxKontextPipeline` checkpoint): instruction-based image editing, loaded from a local
diffusers directory.

The directory has FLUX.1's layout (model_index.json, transformer/, vae/, text_encoder/ + tokenizer/ (CLIP-L),
text_encoder_2/ + tokenizer_2/ (T5-XXL)); nothing is downloaded. Each example is (instruction, one input image).

What the adapter adds to FLUX.1's (`mixgrpo.models.flux.FluxAdapter`), as `FluxKontextPipeline.__call__` does it:
- the input image, [3, H, W] in [0, 1] at the model's resolution, is encoded by the VAE (the distribution's mode,
  then (z - shift_factor) * scaling_factor) into latents [16, H/8, W/8], once per example, into the conditioning
  ("image_latents");
- every transformer call sees the target's N tokens followed by the input's 2 x 2 tokens; the input's position ids
  are the target's with the first coordinate 1 instead of 0, and only the target's N output tokens are the velocity
  (`FluxAdapter`'s reference tokens, `mixgrpo.models.flux.with_references`);
- the guidance embedding takes Kontext-dev's distilled guidance (2.5 in its model card's example); true CFG, when a
  run asks for it, is the rollout's, the unconditional rows encoding "" with the same input image, as the pipeline
  encodes its negative prompt (the image tokens are the same in both branches).
The text encoders see no image, so an embedding cache written by `mixgrpo preprocess` (keyed by prompt, also from
an example file) serves Kontext as it serves FLUX.1; the image latents are always computed.

What the stock pipeline does and the adapter does not: it snaps the output size to max_area (1024^2 by default) and
the input to the preferred Kontext resolution nearest its aspect ratio (PREFERRED_KONTEXT_RESOLUTIONS, e.g.
1024 x 1024, 1184 x 880). The adapter takes height and width as given and the input at that size, which is the
stock pipeline's behaviour whenever height x width is one of those resolutions (the tests call the pipeline with
_auto_resize=False and max_area = H W, which makes any size behave so).
"""

from __future__ import annotations

import torch
from torch import nn

from mixgrpo.models._diffusers import PIPELINE_MODULES, VaeEncoder, check_pipeline_run, load_pipeline
from mixgrpo.models.base import MODELS, ModelSpec, PromptSets, TextEncoder
from mixgrpo.models.flux import FluxAdapter, flux_lora_format
from mixgrpo.models.flux_pipeline import TEXT_FOLDERS, load_flux_text_encoder

EXAMPLE = "black-forest-labs/FLUX.1-Kontext-dev"
GUIDANCE = 2.5  # Kontext-dev's distilled guidance in its model card's example (the pipeline's default is 3.5)


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1-Kontext: a `FluxAdapter` (patch 2 on FLUX latents) whose image encoder is the VAE (`VaeEncoder`), so that
    each example's input image conditions it Kontext-style ("image_latents", `mixgrpo.models.flux.with_references`).
    pixels: (H, W) of the outputs and of the inputs, the model's resolution."""

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int],
                 decoder: nn.Module, encoder: nn.Module, guidance: float | None, pixels: tuple[int, int]):
        super().__init__(transformer, text_encoder, patch_size=2, latent_shape=latent_shape, decoder=decoder,
                         guidance=guidance, image_encoder=encoder)
        self.pixels = tuple(pixels)

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the inputs and outputs: the model's resolution."""
        return self.pixels


def load_flux_kontext(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 1024,
                      width: int = 1024, guidance: float | None = GUIDANCE, max_sequence_length: int = 512,
                      embedding_cache: str | None = None,
                      text_encoder: TextEncoder | None = None) -> FluxKontextAdapter:
    """A FLUX.1-Kontext `FluxKontextAdapter` from a local diffusers pipeline directory, in eval mode.

    path: the pipeline directory (FLUX.1's layout). dtype: weights dtype of every component ("bfloat16" on GPUs).
    height, width: output and input size in pixels (multiples of 16: VAE factor 8 x patch 2; use one of Kontext's
        preferred resolutions, e.g. 1024 x 1024, to match the stock pipeline exactly).
    guidance: the distilled guidance value (the pipeline's guidance_scale; Kontext-dev's card uses 2.5).
    max_sequence_length: T5 tokens per prompt (512). embedding_cache: a `mixgrpo preprocess` directory for the
    instructions (the images are encoded by the VAE here). text_encoder: an already loaded one to share.
    """
    from diffusers import FluxTransformer2DModel

    transformer, decoder, text_encoder, factor = load_pipeline(
        "flux_kontext", path, example=EXAMPLE, transformer_class=FluxTransformer2DModel, dtype=dtype, device=device,
        size=(height, width), patch=2, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=lambda root, torch_dtype: load_flux_text_encoder(
            root, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length))
    latent_shape = (transformer.config.in_channels // 4, height // factor, width // factor)
    return FluxKontextAdapter(transformer, text_encoder, latent_shape, decoder, VaeEncoder(decoder.vae), guidance,
                              (height, width)).eval()


def _check_flux_kontext_run(args: dict, prompts: PromptSets) -> list[str]:
    return check_pipeline_run("flux_kontext", args, prompts, text_folders=TEXT_FOLDERS, t5_tokenizer="tokenizer_2",
                              max_sequence_length=512, text_length=lambda n: n, example=EXAMPLE)


MODELS.add(ModelSpec("flux_kontext", load_flux_kontext, text_encoder=load_flux_text_encoder,
                     check=_check_flux_kontext_run, lora_format=flux_lora_format, modules=PIPELINE_MODULES,
                     token_patch=2, pipeline_sigmas=True, image_inputs=1,
                     input_tokens=lambda args, tokens: tokens))  # the input at the target's size
