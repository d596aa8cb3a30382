"""Wan image-to-video (any `WanImageToVideoPipeline` checkpoint: Wan2.1-I2V-14B-480P / 720P, Wan2.2-I2V-A14B,
Wan2.2-TI2V-5B) loaded from a local diffusers directory: each example is (prompt, its first frame).

The directory is `mixgrpo.models.wan`'s (model_index.json, transformer/ [, transformer_2/], vae/, text_encoder/,
tokenizer/) plus, for Wan 2.1 I2V, image_encoder/ (a CLIP vision model) and image_processor/. Nothing is downloaded.
Everything the text-to-video adapter does (`WanAdapter`: timesteps, UMT5 text, true CFG, the two experts of
Wan 2.2 A14B, decoding) holds; what the first frame adds, as `WanImageToVideoPipeline.__call__` does it:
- Wan 2.1 / 2.2 A14B I2V: the condition video (the frame, then num_frames - 1 frames of zeros in [-1, 1]) is encoded
  by the VAE and normalised, and 4 mask channels (1 on the first latent frame, 0 after) go before it:
  "image_condition" [B, 4 + C, F, h, w], concatenated on channels to the noisy latents at every call (the
  transformer's in_channels = 2 C + 4). Wan 2.1 also cross-attends to the CLIP vision encoder's penultimate states
  of the frame ("image_embeds" [B, 257, 1280]), computed by the checkpoint's image processor (224 x 224 crop) from
  the frame as 8-bit RGB, as the pipeline computes them from a PIL image.
- Wan 2.2 TI2V-5B (`expand_timesteps`): the frame's latents "image_condition" [B, C, 1, h, w] replace the first
  latent frame of every transformer input, whose tokens get timestep 0. The pipeline lets its scheduler move the
  first frame's latents anyway and overwrites them with the condition at the end; here the first frame's velocity
  is the one whose clean prediction is the condition, v = (x - c) / sigma, so that the rollout ends on the
  condition (an Euler step to sigma = 0 lands on it exactly) and those latents carry no policy gradient.
- the unconditional (CFG) rows are encode_prompts([""] * n, images): the pipeline uses the same condition and image
  states for its negative prompt.
The first frame must come at the model's height and width (the pipeline resizes; the data pipeline does here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.errors import ConfigError
from mixgrpo.models._diffusers import (PIPELINE_MODULES, CausalVaeEncoder, check_pipeline_run, input_images,
                                       module_device, to_pil)
from mixgrpo.models.base import MODELS, Cond, ModelSpec, PromptSets, TextEncoder
from mixgrpo.models.wan import (WanAdapter, _trained_sigma_problems, _wan_lora_format, load_wan_components,
                                load_wan_text_encoder)

EXAMPLE = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"


class WanI2VAdapter(WanAdapter):
    """`WanAdapter` conditioned on each example's first frame (see the module docstring).

    encoder: videos [B, 3, F', H, W] in [0, 1] -> normalised latents (`CausalVaeEncoder`); num_frames: F' of the
    videos made; pixels: (H, W). image_encoder, image_processor: Wan 2.1's CLIP vision model and its processor, or
    None (Wan 2.2). Other arguments as `WanAdapter`'s.
    """

    image_inputs = 1

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int, int],
                 decoder: nn.Module, encoder: nn.Module, num_frames: int, pixels: tuple[int, int],
                 image_encoder: nn.Module | None = None, image_processor=None, **kw):
        super().__init__(transformer, text_encoder, latent_shape, decoder, **kw)
        c = latent_shape[0]
        self.mask_channels = encoder.vae.config.scale_factor_temporal  # the pipeline's mask: one per frame folded
        channels = c if self.expand_timesteps else 2 * c + self.mask_channels
        if transformer.config.in_channels != channels:
            raise ConfigError(f"wan_i2v: the transformer takes {transformer.config.in_channels} input channels, but "
                              f"an image-to-video one takes {channels} (the latents' {c}"
                              f"{'' if self.expand_timesteps else f', {self.mask_channels} mask and {c} condition'}"
                              f" channels): is this a text-to-video checkpoint? Use model `wan` for it")
        if (transformer.config.image_dim is not None) != (image_encoder is not None):
            raise ConfigError("wan_i2v: the transformer's image_dim and the pipeline's image_encoder/ come together "
                              "(Wan 2.1 I2V has both, Wan 2.2 neither); is the download complete?")
        self.encoder = encoder
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.num_frames = num_frames
        self.pixels = tuple(pixels)

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the inputs and outputs: the model's resolution."""
        return self.pixels

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], images: Sequence[Sequence[torch.Tensor]] | None = None) -> Cond:
        """Text conditioning of `prompts`, plus "image_condition" and (Wan 2.1) "image_embeds" of each example's first
        frame (one [3, H, W] tensor in [0, 1] per prompt, at the model's height and width)."""
        frames = input_images(self, prompts, images, self.pixels)[:, 0]                 # [B, 3, H, W]
        cond = dict(self.text_encoder.encode(list(prompts), images))  # an embedding cache may be keyed by example
        device = next(self.encoder.parameters()).device
        frames = frames.to(device)
        if self.expand_timesteps:
            cond["image_condition"] = self.encoder(frames[:, :, None])                    # [B, C, 1, h, w]
        else:
            b, _, h, w = frames.shape
            rest = frames.new_full((b, 3, self.num_frames - 1, h, w), 0.5)  # zeros in the VAE's [-1, 1]
            latents = self.encoder(torch.cat([frames[:, :, None], rest], dim=2))        # [B, C, F, h, w]
            mask = torch.zeros_like(latents[:, :1]).repeat(1, self.mask_channels, 1, 1, 1)
            mask[:, :, 0] = 1
            cond["image_condition"] = torch.cat([mask, latents], dim=1)                  # [B, 4 + C, F, h, w]
        if self.image_encoder is not None:
            pixels = self.image_processor(images=[to_pil(f) for f in frames], return_tensors="pt").pixel_values
            states = self.image_encoder(pixels.to(module_device(self.image_encoder), self.image_encoder.dtype),
                                        output_hidden_states=True).hidden_states[-2]
            cond["image_embeds"] = states                                                 # [B, 257, 1280]
        return cond

    def _call(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One transformer's velocity on rows x [N, C, F, h, w], sigma [N], cond [N, ...] with the first frame."""
        dtype = transformer.dtype
        condition = cond["image_condition"].to(x.dtype)
        timestep = self._timesteps(transformer, sigma)
        if self.expand_timesteps:
            hidden = torch.cat([condition, x[:, :, 1:]], dim=2)       # the first latent frame is the input's
            _, _, h, w = self.latent_shape
            _, ph, pw = transformer.config.patch_size
            timestep = timestep.clone()
            timestep[:, :(h // ph) * (w // pw)] = 0                   # its tokens are clean
        else:
            hidden = torch.cat([x, condition], dim=1)                 # [N, 2 C + 4, F, h, w]
        image = cond.get("image_embeds")
        out = transformer(hidden_states=hidden.to(dtype), timestep=timestep,
                          encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                          encoder_hidden_states_image=None if image is None else image.to(dtype),
                          return_dict=False)[0].to(x.dtype)
        if self.expand_timesteps:  # the velocity whose clean prediction is the condition: (x - c) / sigma
            s = sigma.to(x.dtype).view(-1, 1, 1, 1, 1)
            out = torch.cat([(x[:, :, :1] - condition) / s, out[:, :, 1:]], dim=2)
        return out


def load_wan_i2v(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 480,
                 width: int = 832, num_frames: int = 81, max_sequence_length: int = 512,
                 trained_expert: str = "high_noise", embedding_cache: str | None = None,
                 text_encoder: TextEncoder | None = None) -> WanI2VAdapter:
    """A Wan image-to-video `WanI2VAdapter` from a local diffusers pipeline directory, in eval mode; the arguments are
    `mixgrpo.models.wan.load_wan`'s (height and width are also the first frame's size). The embedding cache holds
    the prompts' UMT5 states; the first frame is encoded here."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    components, text_encoder, parts = load_wan_components(
        "wan_i2v", path, example=EXAMPLE, dtype=dtype, device=device, height=height, width=width,
        num_frames=num_frames, max_sequence_length=max_sequence_length, embedding_cache=embedding_cache,
        text_encoder=text_encoder, extra={"image_encoder": CLIPVisionModel})
    image_encoder = components.get("image_encoder")
    processor = None
    if image_encoder is not None:
        processor = CLIPImageProcessor.from_pretrained(Path(path).expanduser(), subfolder="image_processor",
                                                       local_files_only=True)
    return WanI2VAdapter(components["transformer"], text_encoder, encoder=CausalVaeEncoder(components["vae"]),
                         num_frames=num_frames, pixels=(height, width), image_encoder=image_encoder,
                         image_processor=processor, trained_expert=trained_expert, **parts).eval()


def _check_wan_i2v_run(args: dict, prompts: PromptSets) -> list[str]:
    problems = check_pipeline_run("wan_i2v", args, prompts, text_folders=["text_encoder", "tokenizer"],
                                  t5_tokenizer="tokenizer", max_sequence_length=512, text_length=lambda n: n,
                                  example=EXAMPLE, widths={"prompt_embeds": "text_dim"})
    root = Path(args.get("path") or "")
    config = root / "transformer" / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("image_dim") is not None:
        missing = [f for f in ("image_encoder", "image_processor") if not (root / f).is_dir()]
        if missing:
            problems.append(f"wan_i2v: {root} has a Wan 2.1 I2V transformer (image cross-attention) but lacks "
                            f"{missing}; is the download of {EXAMPLE} complete?")
    return problems


MODELS.add(ModelSpec("wan_i2v", load_wan_i2v, text_encoder=load_wan_text_encoder, check=_check_wan_i2v_run,
                     trained_sigma_check=_trained_sigma_problems, lora_format=_wan_lora_format,
                     modules=PIPELINE_MODULES, joint_attention=False, image_inputs=1))
