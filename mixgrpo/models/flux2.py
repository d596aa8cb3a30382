"""FLUX.2, dev and klein (any `Flux2Pipeline` / `Flux2KleinPipeline` checkpoint), loaded from a local diffusers
directory. The pipeline class in model_index.json says which it is.

The directory is what the pipelines' save_pretrained writes and what the hub's FLUX.2 repositories hold:
model_index.json, transformer/ (Flux2Transformer2DModel), vae/ (AutoencoderKLFlux2), text_encoder/ and tokenizer/:
Mistral-Small-3.1 (Mistral3ForConditionalGeneration, tokenizer of its Pixtral processor) for dev, Qwen3 for klein.
Nothing is downloaded.

What differs from FLUX.1, all of it as the FLUX.2 pipelines do it:
- latents: the 32-channel VAE latents are 2 x 2-patchified and batch-normalised by the VAE's own BatchNorm
  statistics; the rollout integrates that space, [128, H/16, W/16], and one latent pixel is one token (no packing
  of patches beyond a reshape);
- position ids have four axes (t, h, w, l): image tokens (0, row, col, 0), text tokens (0, 0, 0, k);
- text: no pooled vector; the token states of three hidden layers of the language model, concatenated along the
  channels ([L, 3 D]): layers (10, 20, 30) of Mistral with FLUX.2's system message for dev, (9, 18, 27) of Qwen3 in
  its chat template (thinking off) for klein, both padded to max_sequence_length (512). The prompt formatting is
  diffusers' own (`Flux2Pipeline._get_mistral_3_small_prompt_embeds`, `Flux2KleinPipeline._get_qwen3_prompt_embeds`),
  so it cannot drift from the pipelines';
- guidance: dev has a distilled guidance embedding (`guidance`, default 4.0, the pipeline's guidance_scale) and no
  true CFG (the run's guidance_scale 1); klein has none and uses true CFG against "" (the rollout's guidance_scale; the pipeline's default 4.0
  for the base models; the step-distilled klein models take none: guidance_scale 1);
- time: timestep = sigma (the scheduler's t / 1000).
The tokenizer of dev is read on its own (AutoTokenizer on tokenizer/), so its Pixtral processor's torchvision
dependency is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.models._diffusers import (PIPELINE_MODULES, check_pipeline_dir, check_pipeline_run, check_size,
                                       load_components)
from mixgrpo.models.base import MODELS, Cond, Frozen, ModelSpec, PromptSets, TextEncoder, TransformerAdapter

EXAMPLE = "black-forest-labs/FLUX.2-klein-base-4B"
VARIANTS = {"Flux2Pipeline": "dev", "Flux2KleinPipeline": "klein"}  # model_index.json's _class_name -> variant
TEXT_LAYERS = {"dev": (10, 20, 30), "klein": (9, 18, 27)}  # the pipelines' text_encoder_out_layers defaults
DEV_GUIDANCE = 4.0  # Flux2Pipeline's default guidance_scale (fed to dev's guidance embedding)
# Attention projections of the double-stream blocks and the fused QKV + MLP input of the single-stream blocks (48 of
# dev's 56 blocks): the LoRA layers of the recipe.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "to_qkv_mlp_proj")


def variant_of(path: str | Path) -> str:
    """"dev" or "klein", from the pipeline class of a local FLUX.2 directory's model_index.json."""
    name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
    if name not in VARIANTS:
        raise ConfigError(f"flux2: {path} holds a {name} (model_index.json), not a FLUX.2 pipeline "
                          f"({' or '.join(VARIANTS)}); point model.args.path at a FLUX.2 dev or klein directory")
    return VARIANTS[name]


class Flux2TextEncoder(Frozen):
    """Frozen language model of FLUX.2 (Mistral 3 for dev, Qwen3 for klein), encoding like the pipeline's
    encode_prompt. encode(prompts) -> {"prompt_embeds": [B, L, 3 D]} (L = max_sequence_length)."""

    def __init__(self, variant: str, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512,
                 layers: Sequence[int] | None = None):
        super().__init__()
        self.variant = variant
        self.tokenizer = tokenizer
        self.lm = text_encoder.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length
        self.layers = tuple(layers or TEXT_LAYERS[variant])

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        from diffusers import Flux2KleinPipeline, Flux2Pipeline

        prompts = list(prompts)
        kw = dict(text_encoder=self.lm, tokenizer=self.tokenizer, prompt=prompts,
                  max_sequence_length=self.max_sequence_length, hidden_states_layers=self.layers)
        if self.variant == "dev":
            from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

            embeds = Flux2Pipeline._get_mistral_3_small_prompt_embeds(**kw, system_message=SYSTEM_MESSAGE)
        else:
            embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(**kw)
        return {"prompt_embeds": embeds}


def _tokenizer(path: Path):
    """The tokenizer of tokenizer/ with its chat template (a Pixtral processor keeps the template beside the
    tokenizer's files: chat_template.jinja or chat_template.json)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    if tokenizer.chat_template is None:
        folder = path / "tokenizer"
        if (folder / "chat_template.jinja").is_file():
            tokenizer.chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        else:
            raise ConfigError(f"flux2: {folder} has no chat template (chat_template.jinja / .json, or in "
                              f"tokenizer_config.json); is the download complete?")
    return tokenizer


def load_flux2_text_encoder(path: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                            max_sequence_length: int = 512) -> Flux2TextEncoder:
    """The text encoder of a local FLUX.2 dev or klein pipeline directory (used by `mixgrpo preprocess`)."""
    path = check_pipeline_dir(path, "flux2", components=["text_encoder", "tokenizer"], example=EXAMPLE)
    variant = variant_of(path)
    if variant == "dev":
        from transformers import Mistral3ForConditionalGeneration as Model
    else:
        from transformers import Qwen3ForCausalLM as Model
    model = Model.from_pretrained(path, subfolder="text_encoder", torch_dtype=parse_dtype(dtype),
                                  local_files_only=True).to(device)
    return Flux2TextEncoder(variant, _tokenizer(path), model, max_sequence_length)


def latent_ids(rows: int, cols: int) -> torch.Tensor:
    """Position ids (t, h, w, l) of the latent grid: [rows * cols, 4], row n = (0, row, col, 0), row-major (as
    `Flux2Pipeline._prepare_latent_ids`)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zeros = torch.zeros_like(r)
    return torch.stack([zeros, r, c, zeros], dim=-1).reshape(rows * cols, 4)


def text_ids(length: int) -> torch.Tensor:
    """Position ids of the text tokens: [length, 4], row k = (0, 0, 0, k) (as `Flux2Pipeline._prepare_text_ids`)."""
    ids = torch.zeros(length, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(length)
    return ids


class Flux2Adapter(TransformerAdapter):
    """(x, sigma, cond) -> velocity for a `Flux2Transformer2DModel` on normalised, patchified VAE latents.

    latent_shape: (C, h, w) with C = the transformer's in_channels (4 x the VAE's latent channels).
    guidance: the distilled guidance value for a transformer with a guidance embedding (dev), else None (klein).
    """

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int],
                 decoder: nn.Module, guidance: float | None):
        c, h, w = latent_shape
        if c != transformer.config.in_channels:
            raise ConfigError(f"latent_shape {latent_shape}: C must equal the transformer's in_channels "
                              f"{transformer.config.in_channels}")
        has_guidance = bool(transformer.config.guidance_embeds)
        if has_guidance != (guidance is not None):
            raise ConfigError(f"flux2: the transformer has guidance_embeds={has_guidance} but guidance={guidance}: "
                              f"FLUX.2 dev takes a guidance value (e.g. 4.0), klein none (guidance: null) and true "
                              f"CFG through guidance_scale instead")
        super().__init__(transformer, text_encoder, decoder, latent_shape)
        self.guidance = guidance
        self.register_buffer("img_ids", latent_ids(h, w), persistent=False)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, C, h, w]; sigma: [B] (or a scalar) in [0, 1]; returns [B, C, h, w] in x's dtype."""
        dtype = self.transformer.dtype
        b, c, h, w = x.shape
        sigma = torch.as_tensor(sigma, device=x.device).expand(b)
        text = cond["prompt_embeds"].to(dtype)                                       # [B, L, 3 D]
        guidance = None
        if self.guidance is not None:  # float32, as the pipeline's torch.full([1], guidance_scale)
            guidance = torch.full((b,), float(self.guidance), device=x.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=x.to(dtype).reshape(b, c, h * w).transpose(1, 2),          # [B, h w, C]
            encoder_hidden_states=text,
            timestep=(sigma.float() * 1000 / 1000).to(dtype),  # the scheduler's t / 1000, as the pipeline divides
            img_ids=self.img_ids,
            txt_ids=text_ids(text.shape[1]).to(x.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w).to(x.dtype)


class Flux2Decoder(Frozen):
    """Latents [B, 4 C, h, w] -> images [B, 3, H, W] in [0, 1] (float32), as the FLUX.2 pipelines decode: the
    VAE's BatchNorm statistics undone (x std + mean, std = sqrt(running_var + eps)), the 2 x 2 patches put back,
    vae.decode, mapped from [-1, 1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        from diffusers import Flux2Pipeline

        dtype = self.vae.dtype
        z = latents.to(dtype)
        mean = self.vae.bn.running_mean.view(1, -1, 1, 1).to(dtype)
        std = torch.sqrt(self.vae.bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(dtype)
        z = Flux2Pipeline._unpatchify_latents(z * std + mean)                          # [B, C, 2h, 2w]
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


def load_flux2(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 1024,
               width: int = 1024, guidance: float | None = None, max_sequence_length: int = 512,
               embedding_cache: str | None = None, text_encoder: TextEncoder | None = None) -> Flux2Adapter:
    """A FLUX.2 dev or klein `Flux2Adapter` from a local diffusers pipeline directory, in eval mode.

    path: the pipeline directory (model_index.json, transformer/, vae/, text_encoder/, tokenizer/).
    dtype: weights dtype of every component ("bfloat16" on GPUs).
    height, width: image size in pixels (multiples of 16: VAE factor 8 x the 2 x 2 patches); latents are
        [128, H/16, W/16].
    guidance: dev's distilled guidance value (the pipeline's guidance_scale; None: its default 4.0). klein has no
        guidance embedding and takes none (its guidance is true CFG, the run's guidance_scale).
    max_sequence_length: text tokens per prompt (512, the pipelines' default).
    embedding_cache: a directory written by `mixgrpo preprocess`; when given, the language model is not loaded.
    text_encoder: an already loaded text encoder to share (e.g. with a frozen reference copy).
    """
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    root = check_pipeline_dir(path, "flux2", components=["transformer", "vae"], example=EXAMPLE)
    variant = variant_of(root)

    def factor(c: dict[str, nn.Module]) -> int:
        return 2 ** (len(c["vae"].config.block_out_channels) - 1)

    components, text_encoder = load_components(
        "flux2", root, example=EXAMPLE, classes={"transformer": Flux2Transformer2DModel, "vae": AutoencoderKLFlux2},
        dtype=dtype, device=device, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=lambda r, torch_dtype: load_flux2_text_encoder(
            r, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length),
        cache_widths=lambda c: {"prompt_embeds": c["transformer"].config.joint_attention_dim},
        check=lambda c: check_size("flux2", (height, width), 2 * factor(c), f"VAE factor {factor(c)} x patch 2"))
    transformer, vae = components["transformer"], components["vae"]
    latent_shape = (transformer.config.in_channels, height // (2 * factor(components)),
                    width // (2 * factor(components)))
    if variant == "klein" and guidance is not None:
        raise ConfigError(f"flux2: {root} is FLUX.2 klein, which has no guidance embedding: drop model.args.guidance "
                          f"and set the run's guidance_scale (true CFG; 4.0 for the base models, 1 for the "
                          f"step-distilled ones)")
    return Flux2Adapter(transformer, text_encoder, latent_shape, Flux2Decoder(vae),
                        (DEV_GUIDANCE if guidance is None else guidance) if variant == "dev" else None).eval()


def _check_flux2_run(args: dict, prompts: PromptSets) -> list[str]:
    return check_pipeline_run("flux2", args, prompts, text_folders=["text_encoder", "tokenizer"], t5_tokenizer=None,
                              max_sequence_length=512, text_length=lambda n: n, example=EXAMPLE,
                              widths={"prompt_embeds": "joint_attention_dim"})


def _flux2_lora_format() -> tuple[type, type]:
    from diffusers import Flux2Pipeline, Flux2Transformer2DModel

    return Flux2Transformer2DModel, Flux2Pipeline  # dev and klein share the transformer and its LoRA format


MODELS.add(ModelSpec("flux2", load_flux2, text_encoder=load_flux2_text_encoder, check=_check_flux2_run,
                     lora_format=_flux2_lora_format, modules=PIPELINE_MODULES, token_patch=2, pipeline_sigmas=True))
