"""Wan 2.1 / 2.2 text-to-video (any `WanPipeline` checkpoint) loaded from a local diffusers directory.

The directory is what `WanPipeline.save_pretrained` writes and what the hub's "-Diffusers" repositories hold:
model_index.json, transformer/ (and transformer_2/ for Wan 2.2 A14B), vae/ (AutoencoderKLWan), text_encoder/
(UMT5-XXL), tokenizer/. Nothing is downloaded (local_files_only=True). Covered: Wan2.1-T2V-1.3B / 14B,
Wan2.2-TI2V-5B (its own VAE: 48 channels, 16x spatial; per-token timesteps, `expand_timesteps`) and Wan2.2-T2V-A14B
(two experts split at `boundary_ratio`).

What the adapter does, as `WanPipeline.__call__` does it:
- latents are videos [C, F, H/s, W/s] (F = (num_frames - 1) / 4 + 1 latent frames, s the VAE's spatial factor),
  integrated as they are (the transformer patchifies them itself);
- time: timestep = 1000 sigma (the flow-matching scheduler's timesteps); with `expand_timesteps` one per token;
- text: UMT5's last hidden states of the real tokens, zero-padded to max_sequence_length (`WanTextEncoder`);
  the transformer attends to the padding too, so the length is part of the conditioning (512 in the pipeline);
- true CFG is the rollout's (cond and uncond in one batch, v_u + s (v_c - v_u)); uncond = "" (the pipeline's
  default negative prompt);
- Wan 2.2 A14B: sigma >= boundary_ratio goes to `transformer` (the high-noise expert), the rest to
  `transformer_2`. One expert is trained per run (`trained_expert`), the other stays frozen, and a trained step in
  the frozen expert's range is an error rather than a silent zero gradient. Both experts use one guidance scale
  (the pipeline's default when guidance_scale_2 is not given).
- decoding: latents * latents_std + latents_mean, VAE decode, videos [B, F', 3, H, W] in [0, 1]
  (F' = num_frames), as `VideoProcessor.postprocess_video(output_type="pt")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.models._diffusers import (PIPELINE_MODULES, CausalVaeDecoder, check_pipeline_dir, check_pipeline_run,
                                       check_size, load_components, module_device, tokenize)
from mixgrpo.models.base import (MODELS, Cond, Frozen, Images, ModelSpec, PromptSets, TextEncoder,
                                 TransformerAdapter, cond_index)

EXAMPLE = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
NUM_TRAIN_TIMESTEPS = 1000  # the transformer takes timestep = 1000 sigma
EXPERTS = ("high_noise", "low_noise")  # transformer, transformer_2 of Wan 2.2 A14B
# Self- and cross-attention projections of every block (attn1, attn2): the LoRA layers of the recipe.
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class WanTextEncoder(Frozen):
    """Frozen UMT5 of Wan, encoding like `WanPipeline._get_t5_prompt_embeds`: prompts cleaned (ftfy when installed,
    HTML entities, whitespace), tokenised to max_sequence_length, the real tokens' states kept and the rest zeros.

    encode(prompts) -> {"prompt_embeds": [B, max_sequence_length, D]} (D = 4096 for UMT5-XXL).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, max_sequence_length: int = 512):
        super().__init__()
        self.tokenizer = tokenizer
        self.umt5 = text_encoder.eval().requires_grad_(False)
        self.max_sequence_length = max_sequence_length

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        """images: ignored (UMT5 sees no image; the image-to-video adapter encodes the first frame itself)."""
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # the pipeline's own cleaning

        prompts = [prompt_clean(p) for p in prompts]
        ids = tokenize(self.tokenizer, prompts, self.max_sequence_length)
        mask = (ids != self.tokenizer.pad_token_id).long()  # the tokenizer's attention mask (right padding)
        device = module_device(self.umt5)
        states = self.umt5(ids.to(device), mask.to(device)).last_hidden_state
        states = states * mask.to(device, states.dtype)[..., None]  # padding -> zeros, as the pipeline pads
        return {"prompt_embeds": states.to(self.umt5.dtype)}


def load_wan_text_encoder(path: str | Path, *, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                          max_sequence_length: int = 512) -> WanTextEncoder:
    """The UMT5 text encoder of a local Wan pipeline directory (used by `mixgrpo preprocess`)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    path = check_pipeline_dir(path, "wan", components=["text_encoder", "tokenizer"], example=EXAMPLE)
    return WanTextEncoder(
        AutoTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        UMT5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=parse_dtype(dtype),
                                         local_files_only=True).to(device),
        max_sequence_length=max_sequence_length)


def high_noise(sigma: torch.Tensor, boundary: float) -> torch.Tensor:
    """[B] bool: the sigmas Wan 2.2 A14B's high-noise expert denoises. The pipeline compares timesteps:
    t >= boundary_ratio * 1000."""
    return sigma.float() * NUM_TRAIN_TIMESTEPS >= boundary * NUM_TRAIN_TIMESTEPS


class WanAdapter(TransformerAdapter):
    """(x, sigma, cond) -> velocity for a `WanTransformer3DModel` (or Wan 2.2's pair of experts) on video latents.

    transformer: the (high-noise) transformer; transformer_2: Wan 2.2 A14B's low-noise expert or None.
    boundary: sigma at and above which `transformer` denoises (model_index.json's boundary_ratio), with transformer_2.
    trained_expert: "high_noise" or "low_noise" (Wan 2.2 A14B): the expert that is `denoiser`.
    expand_timesteps: one timestep per token (Wan 2.2 TI2V-5B).
    latent_shape: (C, F, h, w) with h and w divisible by the transformer's spatial patch.
    """

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder, latent_shape: tuple[int, int, int, int],
                 decoder: nn.Module, transformer_2: nn.Module | None = None, boundary: float | None = None,
                 trained_expert: str = "high_noise", expand_timesteps: bool = False):
        c, _, h, w = latent_shape
        _, ph, pw = transformer.config.patch_size
        if c != transformer.config.out_channels:
            raise ConfigError(f"latent_shape {latent_shape}: C must equal the transformer's out_channels "
                              f"{transformer.config.out_channels}")
        if h % ph or w % pw:
            raise ConfigError(f"latent_shape {latent_shape}: h and w must be divisible by the patch {ph} x {pw}")
        if (transformer_2 is None) != (boundary is None):
            raise ConfigError("Wan 2.2's two experts need a boundary (boundary_ratio) and Wan 2.1's one transformer "
                              "none")
        if trained_expert not in EXPERTS:
            raise ConfigError(f"trained_expert = {trained_expert!r}: use one of {EXPERTS}")
        super().__init__(transformer, text_encoder, decoder, latent_shape)
        self.transformer_2 = transformer_2
        self.boundary = boundary
        self.trained_expert = trained_expert
        self.expand_timesteps = expand_timesteps

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer_2 if self.trained_expert == "low_noise" else self.transformer

    def _timesteps(self, transformer: nn.Module, sigma: torch.Tensor) -> torch.Tensor:
        """[B] sigma -> the transformer's timestep: [B] 1000 sigma, as the scheduler's; with `expand_timesteps`
        [B, F (h/2) (w/2)], one per token (the pipeline's mask[:, ::2, ::2] * t)."""
        timestep = sigma.float() * NUM_TRAIN_TIMESTEPS
        if self.expand_timesteps:
            _, f, h, w = self.latent_shape
            _, ph, pw = transformer.config.patch_size
            timestep = timestep[:, None].expand(-1, f * (h // ph) * (w // pw))
        return timestep

    def _call(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """One transformer's velocity on rows x [N, C, F, h, w], sigma [N], cond [N, ...]."""
        dtype = transformer.dtype
        out = transformer(hidden_states=x.to(dtype), timestep=self._timesteps(transformer, sigma),
                          encoder_hidden_states=cond["prompt_embeds"].to(dtype), return_dict=False)[0]
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, C, F, h, w]; sigma: [B] (or a scalar) in [0, 1]; returns [B, C, F, h, w] in x's dtype."""
        sigma = torch.as_tensor(sigma, device=x.device).expand(x.shape[0])
        if self.transformer_2 is None:
            return self._call(self.transformer, x, sigma, cond)
        high = high_noise(sigma, self.boundary)
        frozen = ~high if self.trained_expert == "high_noise" else high
        if torch.is_grad_enabled() and bool(frozen.any()) and any(p.requires_grad for p in self.denoiser.parameters()):
            s = float(sigma[frozen][0])
            raise ConfigError(f"wan: a trained step at sigma {s:.3f} is denoised by the frozen "
                              f"{EXPERTS[int(self.trained_expert == 'high_noise')]} expert (Wan 2.2's boundary is "
                              f"sigma {self.boundary}); model.args.trained_expert = {self.trained_expert!r} trains "
                              f"only sigma {'>=' if self.trained_expert == 'high_noise' else '<'} {self.boundary}: "
                              f"keep the trained steps (the window) there, or train the other expert")
        out = torch.empty_like(x)
        for rows, transformer in ((high, self.transformer), (~high, self.transformer_2)):
            if rows.any():
                out[rows] = self._call(transformer, x[rows], sigma[rows], cond_index(cond, rows))
        return out


def _pipeline_config(path: Path) -> dict:
    return json.loads((path / "model_index.json").read_text())


def load_wan(path: str, dtype: str | torch.dtype = "bfloat16", device: str = "cpu", height: int = 480,
             width: int = 832, num_frames: int = 81, max_sequence_length: int = 512, trained_expert: str = "high_noise",
             embedding_cache: str | None = None, text_encoder: TextEncoder | None = None) -> WanAdapter:
    """A Wan 2.1 / 2.2 text-to-video `WanAdapter` from a local diffusers pipeline directory, in eval mode.

    path: the pipeline directory (model_index.json, transformer/ [, transformer_2/], vae/, text_encoder/, tokenizer/).
    dtype: weights dtype of every component ("bfloat16" on GPUs).
    height, width: frame size in pixels (multiples of the VAE's spatial factor x the patch: 16 for Wan 2.1,
        32 for Wan 2.2 TI2V-5B); the pipeline's default is 480 x 832.
    num_frames: frames per video, 1 + 4k (81 = 5 s at 16 fps); latents have (num_frames - 1) / 4 + 1 frames.
    max_sequence_length: UMT5 tokens per prompt (512, the pipeline's default; the padding is seen by the model).
    trained_expert: Wan 2.2 A14B only: "high_noise" (sigma >= boundary_ratio) or "low_noise", the expert trained.
    embedding_cache: a directory written by `mixgrpo preprocess`; when given, UMT5 is not loaded.
    text_encoder: an already loaded text encoder to share (e.g. with a frozen reference copy).
    """
    components, text_encoder, parts = load_wan_components(
        "wan", path, example=EXAMPLE, dtype=dtype, device=device, height=height, width=width, num_frames=num_frames,
        max_sequence_length=max_sequence_length, embedding_cache=embedding_cache, text_encoder=text_encoder)
    return WanAdapter(components["transformer"], text_encoder, trained_expert=trained_expert, **parts).eval()


def load_wan_components(name: str, path: str, *, example: str, dtype: str | torch.dtype, device: str, height: int,
                        width: int, num_frames: int, max_sequence_length: int, embedding_cache: str | None,
                        text_encoder: TextEncoder | None, extra: dict[str, type] | None = None,
                        ) -> tuple[dict[str, nn.Module], TextEncoder, dict]:
    """What every Wan pipeline directory holds, loaded and checked (`load_wan`'s arguments): ({folder: component},
    text encoder, the `WanAdapter` keyword arguments latent_shape, decoder, transformer_2, boundary and
    expand_timesteps). extra: further optional folders -> classes (the image-to-video pipeline's image_encoder)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = check_pipeline_dir(path, name, components=["transformer", "vae"], example=example)
    config = _pipeline_config(root)
    vae_config = json.loads((root / "vae" / "config.json").read_text())
    temporal = vae_config.get("scale_factor_temporal") or 4
    if num_frames < 1 or (num_frames - 1) % temporal:
        fit = (max(num_frames - 1, 0) // temporal) * temporal + 1
        raise ConfigError(f"{name}: num_frames = {num_frames} must be 1 + {temporal} k (the VAE compresses {temporal} "
                          f"frames into one after the first), e.g. {fit}")

    def check(c: dict[str, nn.Module]) -> None:
        spatial = c["vae"].config.scale_factor_spatial
        _, ph, pw = c["transformer"].config.patch_size
        check_size(name, (height, width), spatial * ph, f"VAE factor {spatial} x patch {ph}")

    components, text_encoder = load_components(
        name, root, example=example, classes={"transformer": WanTransformer3DModel,
                                              "transformer_2": WanTransformer3DModel, "vae": AutoencoderKLWan,
                                              **(extra or {})},
        dtype=dtype, device=device, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=lambda r, torch_dtype: load_wan_text_encoder(
            r, dtype=torch_dtype, device=device, max_sequence_length=max_sequence_length),
        cache_widths=lambda c: {"prompt_embeds": c["transformer"].config.text_dim}, check=check,
        optional=["transformer_2", *(extra or {})])
    vae, transformer = components["vae"], components["transformer"]
    transformer_2 = components.get("transformer_2")
    boundary = config.get("boundary_ratio") if transformer_2 is not None else None
    if transformer_2 is not None and boundary is None:
        raise ConfigError(f"{name}: {root} has a transformer_2 but model_index.json has no boundary_ratio")
    spatial = vae.config.scale_factor_spatial
    latent_shape = (transformer.config.out_channels, (num_frames - 1) // temporal + 1, height // spatial,
                    width // spatial)
    return components, text_encoder, dict(latent_shape=latent_shape, decoder=CausalVaeDecoder(vae),
                                          transformer_2=transformer_2, boundary=boundary,
                                          expand_timesteps=bool(config.get("expand_timesteps", False)))


def _check_wan_run(args: dict, prompts: PromptSets) -> list[str]:
    return check_pipeline_run("wan", args, prompts, text_folders=["text_encoder", "tokenizer"],
                              t5_tokenizer="tokenizer", max_sequence_length=512, text_length=lambda n: n,
                              example=EXAMPLE, widths={"prompt_embeds": "text_dim"})


def _trained_sigma_problems(args: dict, trained: dict[float, int]) -> list[str]:
    """Wan 2.2 A14B trains one expert: every trained sigma must be one that expert denoises (from model_index.json
    and transformer_2/, before anything loads)."""
    path = Path(args.get("path") or "")
    expert = args.get("trained_expert", "high_noise")
    if not (path / "transformer_2").is_dir() or not trained or expert not in EXPERTS:
        return []  # Wan 2.1 (one transformer), or a problem the loader names
    boundary = _pipeline_config(path).get("boundary_ratio")
    if boundary is None:
        return []
    sigmas = sorted(trained)
    high = high_noise(torch.tensor(sigmas), boundary).tolist()
    outside = [s for s, h in zip(sigmas, high) if h != (expert == "high_noise")]
    if not outside:
        return []
    first = min(outside, key=lambda s: (trained[s], -s))  # the first iteration's first (noisiest) step
    other = EXPERTS[int(expert == "high_noise")]
    return [f"wan: iteration {trained[first]} trains sigma {first:.3f}, which Wan 2.2's frozen {other} expert "
            f"denoises (boundary sigma {boundary}; model.args.trained_expert = {expert!r} trains sigma "
            f"{'>=' if expert == 'high_noise' else '<'} {boundary}): keep the trained steps there (e.g. "
            f"sampler.window.strategy=frozen, or fewer iterations), or train the other expert"]


def _wan_lora_format() -> tuple[type, type]:
    from diffusers import WanPipeline, WanTransformer3DModel

    return WanTransformer3DModel, WanPipeline


MODELS.add(ModelSpec("wan", load_wan, text_encoder=load_wan_text_encoder, check=_check_wan_run,
                     trained_sigma_check=_trained_sigma_problems, lora_format=_wan_lora_format,
                     modules=PIPELINE_MODULES, joint_attention=False))  # text enters by cross-attention
