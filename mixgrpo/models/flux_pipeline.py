"""FLUX.1 (dev, schnell, or any `FluxTransformer2DModel` checkpoint) loaded from a local diffusers directory.

The directory is what `FluxPipeline.save_pretrained` writes and what the hub's FLUX.1 repositories hold:
model_index.json, transformer/, vae/, text_encoder/ (CLIP-L), tokenizer/, text_encoder_2/ (T5-XXL),
tokenizer_2/. Nothing is ever downloaded: every component is read with local_files_only=True.

The model is the generic `FluxAdapter` (packing, image ids, guidance embedding) with:
- `FluxTextEncoder`: CLIP-L's pooled output + T5's token states, exactly as `FluxPipeline.encode_prompt`;
- `VaeDecoder`: latents -> images with the VAE's scaling and shift factors, as the pipeline decodes.
With `embedding_cache` (a directory written by `mixgrpo preprocess`) the text encoders are not loaded at all.

The helpers shared with the SD3 loader (dtype names, directory checks, the VAE decoder, tokenisation with
a truncation warning) live here too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.models.base import MODEL_CHECKS, MODELS, Cond, PromptSets, TextEncoder
from mixgrpo.models.flux import FluxAdapter



def check_pipeline_dir(path: str | Path, pipeline: str, components: Sequence[str], example: str) -> Path:
    """The local diffusers pipeline directory `path`, after checking that it holds `components`."""
    path = Path(path).expanduser()
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{pipeline}: {path} is not a local diffusers pipeline directory (no model_index.json). "
                         f"Point model.args.path at a downloaded checkpoint, e.g. "
                         f"`huggingface-cli download {example} --local-dir DIR`; nothing is downloaded by mixgrpo.")
    missing = [c for c in components if not (path / c).is_dir()]
    if missing:
        raise ValueError(f"{pipeline}: {path} lacks the component folders {missing}; is the download complete?")
    return path


def check_pipeline_run(name: str, args: dict, prompts: PromptSets, *, text_folders: Sequence[str],
                       t5_tokenizer: str | None, max_sequence_length: int, text_length: Callable[[int], int],
                       example: str) -> list[str]:
    """Pre-flight of a FLUX / SD3 run (`MODEL_CHECKS`), from files only: the pipeline directory; with an
    embedding cache, its coverage of the prompts, its widths against the transformer's config and its text length
    (`text_length(max_sequence_length)` tokens) against model.args; without one, a warning for the prompts the
    T5 tokenizer will truncate (as diffusers does)."""
    import json

    path, cache = args.get("path"), args.get("embedding_cache")
    if not path:
        return [f"model.args.path is not set: give the local {name} pipeline directory "
                f"(`huggingface-cli download {example} --local-dir DIR`)"]
    try:
        root = check_pipeline_dir(path, name, ["transformer", "vae", *([] if cache else text_folders)], example)
    except ValueError as e:
        return [str(e)]
    config = json.loads((root / "transformer" / "config.json").read_text())
    max_len = args.get("max_sequence_length", max_sequence_length)
    if cache:
        from mixgrpo.preprocess import EmbeddingCache, coverage_problems

        files = " ".join(source for source, _ in prompts.values())
        problems = coverage_problems(cache, prompts, f"encode the run's prompt files into it: `mixgrpo preprocess "
                                                     f"--model {name} --path {path} --prompts {files} --out {cache} "
                                                     f"--max-sequence-length {max_len}`")
        try:
            shapes = EmbeddingCache(cache).shapes
        except (OSError, ValueError):
            return problems  # already named by coverage_problems
        widths = {"prompt_embeds": config["joint_attention_dim"], "pooled": config["pooled_projection_dim"]}
        for key, width in widths.items():
            if shapes.get(key, (None,))[-1] != width:
                problems.append(f"the embedding cache {cache} has {key} of shape {list(shapes.get(key, []))}, but the "
                                f"transformer of {path} expects width {width}: it was built with another model; "
                                f"re-run mixgrpo preprocess with --path {path}")
        cached = shapes.get("prompt_embeds", (None,))[0]
        if cached is not None and cached != text_length(max_len):
            expected = f"{text_length(max_len)} ({max_len} T5 tokens)" if text_length(max_len) != max_len else max_len
            problems.append(f"the embedding cache {cache} holds {cached} text tokens per prompt, but model.args."
                            f"max_sequence_length = {max_len} expects {expected}: set model.args.max_sequence_length "
                            f"to the cache's, or re-run mixgrpo preprocess with --max-sequence-length {max_len}")
        return problems
    if t5_tokenizer:
        from transformers import T5TokenizerFast

        tokenizer = T5TokenizerFast.from_pretrained(root, subfolder=t5_tokenizer, local_files_only=True)
        for split, (source, texts) in prompts.items():
            distinct = list(dict.fromkeys(texts))
            long = [t for t, ids in zip(distinct, tokenizer(distinct).input_ids) if len(ids) > max_len]
            if long:
                print(f"warning: {len(long)} of the {len(distinct)} {split} prompts ({source}) are longer than "
                      f"model.args.max_sequence_length = {max_len} T5 tokens and will be truncated, as diffusers "
                      f"does (e.g. {long[0][:60]!r}); raise max_sequence_length to keep them whole", flush=True)
    return []


def loading_bar(name: str, path: Path, text_encoders: bool):
    """A progress bar over the components a loader reads (transformer, VAE, the text encoders when loaded)."""
    from mixgrpo.progress import bar

    return bar(total=3 if text_encoders else 2, desc=f"loading {name} from {path}", unit="component")


def load_transformer_and_vae(transformer_class, path: Path, dtype: torch.dtype, device: str, progress):
    """(transformer, VAE, the VAE's downsampling factor) of a local pipeline directory, in eval mode on `device`;
    two steps of the loading bar."""
    from diffusers import AutoencoderKL

    kw = dict(torch_dtype=dtype, local_files_only=True)
    transformer = transformer_class.from_pretrained(path, subfolder="transformer", **kw).to(device).eval()
    progress.update()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw).to(device)
    progress.update()
    return transformer, vae, 2 ** (len(vae.config.block_out_channels) - 1)


def cache_or_load(name: str, transformer: nn.Module, given: TextEncoder | None, embedding_cache: str | None,
                  device: str, progress, load: Callable[[], TextEncoder]) -> TextEncoder:
    """The text encoder of a FLUX / SD3 loader: `given` (shared with another model), else the embedding cache
    (its widths checked against the transformer), else `load()` (the pipeline's encoders, a step of the bar)."""
    if given is not None:
        return given
    if embedding_cache is not None:
        from mixgrpo.preprocess import EmbeddingCache

        cache = EmbeddingCache(embedding_cache, device=device)
        cache.check_widths(name, prompt_embeds=transformer.config.joint_attention_dim,
                           pooled=transformer.config.pooled_projection_dim)
        return cache
    encoder = load()
    progress.update()
    return encoder


def tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length] padded to max_length, truncating (with a warning) like the diffusers pipelines."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if full.shape[-1] > max_length:
        longest = prompts[int((full != tokenizer.pad_token_id).sum(1).argmax())]
        warnings.warn(f"prompt {longest[:80]!r}... has {full.shape[-1]} tokens and was truncated to {max_length} "
                      f"by {type(tokenizer).__name__} (as the diffusers pipeline does)", stacklevel=3)
    return ids


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class VaeDecoder(nn.Module):
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], as the FLUX / SD3 pipelines decode:

    images = clamp(vae.decode(latents / scaling_factor + shift_factor) / 2 + 1/2, 0, 1), returned in float32.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)

    def train(self, mode: bool = True) -> "VaeDecoder":
        return super().train(False)  # frozen: never switches to training mode with the adapter

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class FluxTextEncoder(nn.Module):
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

    def train(self, mode: bool = True) -> "FluxTextEncoder":
        return super().train(False)  # frozen: dropout must never switch on

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        clip_ids = tokenize(self.tokenizer, prompts, self.tokenizer.model_max_length)
        pooled = self.clip(clip_ids.to(module_device(self.clip)), output_hidden_states=False).pooler_output
        t5_ids = tokenize(self.tokenizer_2, prompts, self.max_sequence_length)
        states = self.t5(t5_ids.to(module_device(self.t5)), output_hidden_states=False)[0]
        return {"prompt_embeds": states.to(self.t5.dtype), "pooled": pooled.to(self.clip.dtype)}


def load_flux_text_encoder(path: str | Path, dtype: str | torch.dtype = "bfloat16", device: str = "cpu",
                           max_sequence_length: int = 512) -> FluxTextEncoder:
    """The CLIP-L + T5 text encoder of a local FLUX.1 pipeline directory (used by `mixgrpo preprocess`)."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path = check_pipeline_dir(path, "flux", ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"],
                              "black-forest-labs/FLUX.1-dev")
    dtype = parse_dtype(dtype)
    kw = dict(torch_dtype=dtype, local_files_only=True)
    return FluxTextEncoder(
        CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True),
        CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw).to(device),
        T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True),
        T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", **kw).to(device),
        max_sequence_length=max_sequence_length,
    )


@MODELS.register("flux")
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

    if text_encoder is not None and embedding_cache is not None:
        raise ValueError("flux: give text_encoder or embedding_cache, not both")
    path = check_pipeline_dir(path, "flux", ["transformer", "vae"], "black-forest-labs/FLUX.1-dev")
    torch_dtype = parse_dtype(dtype)
    with loading_bar("flux", path, text_encoder is None and embedding_cache is None) as progress:
        transformer, vae, factor = load_transformer_and_vae(FluxTransformer2DModel, path, torch_dtype, device,
                                                            progress)
        if height % (2 * factor) or width % (2 * factor):
            raise ValueError(f"flux: height {height} and width {width} must be multiples of {2 * factor} "
                             f"(VAE factor {factor} x patch 2)")
        text_encoder = cache_or_load("flux", transformer, text_encoder, embedding_cache, device, progress,
                                     lambda: load_flux_text_encoder(path, torch_dtype, device, max_sequence_length))
    latent_shape = (transformer.config.in_channels // 4, height // factor, width // factor)
    return FluxAdapter(transformer, text_encoder, patch_size=2, latent_shape=latent_shape,
                       decoder=VaeDecoder(vae), guidance=guidance).eval()


MODEL_CHECKS["flux"] = lambda args, prompts: check_pipeline_run(
    "flux", args, prompts, text_folders=["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"],
    t5_tokenizer="tokenizer_2", max_sequence_length=512, text_length=lambda n: n,
    example="black-forest-labs/FLUX.1-dev")
