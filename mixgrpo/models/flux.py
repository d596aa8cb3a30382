"""A generic adapter around a diffusers `FluxTransformer2DModel`, in pixel or latent space.

The adapter owns everything FLUX-specific between the rollout's tensors and the transformer:
- packing: x [B, C, H, W] is cut into p x p patches, giving N = (H/p)(W/p) tokens of C*p*p channels
  (row-major; for p = 2 this is exactly diffusers' `FluxPipeline._pack_latents`);
- position ids: img_ids[n] = (0, row, col) of the patch, txt_ids = 0 (FLUX convention) or, with
  `text_positions`, txt_ids[k] = (k, 0, 0): token k's place in the prompt on the first rotary axis;
- time: the transformer takes timestep = sigma in [0, 1] (it multiplies by 1000 itself);
- guidance: FLUX-dev's distilled guidance value, fed to its guidance embedding (None for models without one);
- reference images (FLUX.1-Kontext and the tiny editing base): a Cond with "image_latents" [B, C, H', W'] (the input
  image in the same latent space as x) has their tokens appended after the target's, with position ids
  (1, row, col) (`reference_ids`), as `FluxKontextPipeline` does; only the target tokens' output is the velocity
  (`with_references`).

Pixel space (the tiny model): C = 3, p = 4, the model works on [-1, 1] and `decode_pixels` maps to [0, 1].
Latent space (FLUX.1): C = 16, p = 2, `decoder` is the VAE decode. The velocity follows docs/notation.md:
v ~= eps - x0, which is what FLUX's transformer predicts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from mixgrpo.errors import ConfigError
from mixgrpo.models.base import Cond, Images, TextEncoder, TransformerAdapter


def pack(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> tokens [B, (H/p)(W/p), C*p*p], patches in row-major order, channels (c, i, j)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack(tokens: torch.Tensor, shape: tuple[int, int, int], patch: int) -> torch.Tensor:
    """Inverse of `pack`: tokens [B, N, C*p*p] -> [B, C, H, W] for shape = (C, H, W)."""
    c, h, w = shape
    x = tokens.view(tokens.shape[0], h // patch, w // patch, c, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(tokens.shape[0], c, h, w)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """Rotary position ids of the patch grid: [rows * cols, 3], row n = (0, row, col), row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3).float()


def reference_ids(rows: int, cols: int, index: int = 1) -> torch.Tensor:
    """Position ids of a reference image's patch grid: [rows * cols, 3], row n = (index, row, col). FLUX.1-Kontext
    gives its (single) reference image index 1, which tells it apart from the target grid's 0."""
    ids = image_ids(rows, cols)
    ids[:, 0] = index
    return ids


def with_references(tokens: torch.Tensor, ids: torch.Tensor, references: torch.Tensor,
                    patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kontext-style conditioning: the reference image's tokens after the target's in one sequence.

    tokens: [B, N, C p^2] the target's packed tokens; ids: [N, 3] their position ids;
    references: [B, C, H', W'] the input image in the same latent space (any size divisible by p).
    Returns (tokens [B, N + N', C p^2], ids [N + N', 3]); the transformer's output rows [:, :N] are the target's.
    """
    rows, cols = references.shape[-2] // patch, references.shape[-1] // patch
    ref_tokens = pack(references.to(tokens.dtype), patch)                           # [B, N', C p^2]
    ref_ids = reference_ids(rows, cols).to(device=ids.device, dtype=ids.dtype)      # [N', 3]
    return torch.cat([tokens, ref_tokens], dim=1), torch.cat([ids, ref_ids], dim=0)


def encode_pixels(images: torch.Tensor) -> torch.Tensor:
    """Pixel-space "encoder", the inverse of `decode_pixels`: images [B, 3, H, W] in [0, 1] -> model space [-1, 1]."""
    return images.float() * 2 - 1


def decode_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixel-space "decoder": model space [-1, 1] -> images [0, 1] (clamped), images = (x + 1) / 2."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def flux_lora_format() -> tuple[type, type]:
    """(transformer class, pipeline class) of FLUX.1's LoRA format (`ModelSpec.lora_format`): the tiny model's and
    FLUX.1's transformers are both `FluxTransformer2DModel`."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    return FluxTransformer2DModel, FluxPipeline


class FluxAdapter(TransformerAdapter):
    """(x, sigma, cond) -> velocity for a `FluxTransformer2DModel`.

    transformer: the diffusers model (in_channels must equal C * patch^2).
    text_encoder: any object with `encode(prompts) -> Cond` giving "prompt_embeds" [B, L, D] and "pooled" [B, Dp].
    patch_size: p, the side of the square patches that become tokens (4 for 3-channel pixels, 2 for FLUX latents).
    latent_shape: (C, H, W) of what the rollout integrates; H and W divisible by p.
    decoder: latents [B, C, H, W] -> images [B, 3, H', W'] in [0, 1]; `decode_pixels` in pixel space.
    guidance: distilled guidance value for transformers built with guidance_embeds=True, else None.
    text_positions: give text token k the rotary position (k, 0, 0) instead of FLUX's (0, 0, 0), so that
        attention sees word order ("a red circle and a green square" is not "a green circle and a red square"
        when the text states barely tell them apart, as MiniLM's do). Only for models trained with it.
    image_encoder: for an editing model (image_inputs = 1): input images [B, 3, H, W] in [0, 1] -> latents
        [B, C, H', W'] in x's space (`encode_pixels` in pixel space, the VAE encode for FLUX.1-Kontext); the
        Cond then carries them as "image_latents" and `forward` conditions Kontext-style (`with_references`).
    """

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, patch_size: int,
                 latent_shape: tuple[int, int, int], decoder: Callable[[torch.Tensor], torch.Tensor] = decode_pixels,
                 guidance: float | None = None, text_positions: bool = False,
                 image_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None):
        c, h, w = latent_shape
        patch = patch_size
        if h % patch or w % patch:
            raise ConfigError(f"latent_shape {latent_shape}: H and W must be divisible by the patch size {patch}")
        in_channels = transformer.config.in_channels
        if in_channels != c * patch * patch:
            raise ConfigError(f"transformer.in_channels = {in_channels} but C * patch^2 = {c} * {patch}^2 = "
                              f"{c * patch * patch}; build the transformer with in_channels = C * patch^2")
        has_guidance = bool(transformer.config.guidance_embeds)
        if has_guidance != (guidance is not None):
            raise ConfigError(f"transformer guidance_embeds={has_guidance} but guidance={guidance}: a guidance "
                              f"value is needed exactly when the transformer has a guidance embedding")
        super().__init__(transformer, text_encoder, decoder, (c, h, w))
        self.patch_size = patch
        self.guidance = guidance
        self.text_positions = text_positions
        self.image_encoder = image_encoder
        if image_encoder is not None:
            self.image_inputs = 1
        self.register_buffer("img_ids", image_ids(h // patch, w // patch), persistent=False)

    def image_size(self) -> tuple[int, int]:
        if self.decoder is decode_pixels:  # pixel space: the latents are the images
            return tuple(self.latent_shape[1:])
        return super().image_size()

    def encode_prompts(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        """The text encoder's Cond, plus "image_latents" [B, C, H', W'] (`image_encoder` of each example's input
        image) for an editing model."""
        cond = super().encode_prompts(prompts, images)
        if images is not None:
            device = cond["prompt_embeds"].device
            pixels = torch.stack([example[0] for example in images]).to(device)      # [B, 3, H, W]
            cond["image_latents"] = self.image_encoder(pixels)
        return cond

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, C, H, W]; sigma: [B] (or a scalar) in [0, 1]; returns [B, C, H, W] in x's dtype."""
        dtype = self.transformer.dtype
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device).expand(b)
        text = cond["prompt_embeds"].to(dtype)                                      # [B, L, D]
        txt_ids = torch.zeros(text.shape[1], 3, device=x.device, dtype=self.img_ids.dtype)  # [L, 3]
        if self.text_positions:
            txt_ids[:, 0] = torch.arange(text.shape[1], device=x.device, dtype=txt_ids.dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((b,), float(self.guidance), device=x.device, dtype=dtype)
        tokens, ids = pack(x.to(dtype), self.patch_size), self.img_ids                 # [B, N, C p^2], [N, 3]
        if "image_latents" in cond:
            tokens, ids = with_references(tokens, ids, cond["image_latents"], self.patch_size)
        out = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=text,
            pooled_projections=cond["pooled"].to(dtype),                             # [B, Dp]
            timestep=sigma.to(dtype),
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        out = out[:, : self.img_ids.shape[0]]                                        # the target tokens only
        return unpack(out, self.latent_shape, self.patch_size).to(x.dtype)
