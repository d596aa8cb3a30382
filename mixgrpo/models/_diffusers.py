"""Loading helpers shared by the diffusers-pipeline models (FLUX.1, SD3, Qwen-Image, FLUX.2, Wan): directory checks
and pre-flight, the components (transformer, VAE, the text encoder or its embedding cache) behind one loading bar,
tokenisation with a truncation record, the VAE decoders and encoders (FLUX.1 / SD3's, and the causal video VAE's of
Wan and Qwen-Image), and the input images of the editing and image-to-video models (checks, PIL round trips)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.models.base import MODELS, Frozen, Images, PromptSets, TextEncoder, check_images
from mixgrpo.models.text import note_truncations

PIPELINE_MODULES = ("diffusers", "transformers")
"""What a diffusers-pipeline model imports (`ModelSpec.modules`)."""


def check_pipeline_dir(path: str | Path, pipeline: str, *, components: Sequence[str], example: str) -> Path:
    """The local diffusers pipeline directory `path`, after checking that it holds `components`."""
    path = Path(path).expanduser()
    if not (path / "model_index.json").is_file():
        raise ConfigError(f"{pipeline}: {path} is not a local diffusers pipeline directory (no model_index.json). "
                          f"Point model.args.path at a downloaded checkpoint, e.g. "
                          f"`huggingface-cli download {example} --local-dir {shlex.quote(str(path))}`; nothing is "
                          f"downloaded by mixgrpo.")
    missing = [c for c in components if not (path / c).is_dir()]
    if missing:
        raise ConfigError(f"{pipeline}: {path} lacks the component folders {missing}; is the download complete?")
    return path


def preprocess_command(name: str, path: str, prompt_files: Sequence[str], cache: str, max_len: int,
                       dtype: str | None) -> str:
    """The `mixgrpo preprocess` command line that writes a run's embedding cache, quoted for a POSIX shell."""
    return shlex.join(["mixgrpo", "preprocess", "--model", name, "--path", str(path), "--prompts",
                       *map(str, prompt_files), "--out", str(cache), "--max-sequence-length", str(max_len),
                       *(["--dtype", str(dtype)] if dtype else [])])


def check_pipeline_run(name: str, args: dict, prompts: PromptSets, *, text_folders: Sequence[str],
                       t5_tokenizer: str | None, max_sequence_length: int, text_length: Callable[[int], int],
                       example: str, widths: dict[str, str] | None = None) -> list[str]:
    """Pre-flight of a diffusers-pipeline run (`ModelSpec.check`), from files only: the pipeline directory; with an
    embedding cache, its coverage of the prompts, its widths against the transformer's config (`widths`: cache key
    -> config field; default FLUX.1 / SD3's joint_attention_dim and pooled_projection_dim) and its text length
    (`text_length(max_sequence_length)` tokens) against model.args; without one, a warning for the prompts the
    T5 tokenizer will truncate (as diffusers does)."""
    path, cache = args.get("path"), args.get("embedding_cache")
    if not path:
        return [f"model.args.path is not set: give the local {name} pipeline directory "
                f"(`huggingface-cli download {example} --local-dir ckpt/{example.split('/')[-1]}`, then "
                f"model.args.path=ckpt/{example.split('/')[-1]})"]
    try:
        root = check_pipeline_dir(path, name, components=["transformer", "vae", *([] if cache else text_folders)],
                                  example=example)
    except ValueError as e:
        return [str(e)]
    config = json.loads((root / "transformer" / "config.json").read_text())
    problems = size_problems(name, args, config, json.loads((root / "vae" / "config.json").read_text()))
    max_len = args.get("max_sequence_length", max_sequence_length)
    if cache:
        from mixgrpo.models.text import EmbeddingCache, coverage_problems

        command = preprocess_command(name, path, [source for source, _ in prompts.values()], cache, max_len,
                                     args.get("dtype"))
        problems += coverage_problems(cache, prompts, f"encode the run's prompt files into it: `{command}`")
        try:
            shapes = EmbeddingCache(cache).shapes
        except (OSError, ValueError):
            return problems  # already named by coverage_problems
        fields = widths or {"prompt_embeds": "joint_attention_dim", "pooled": "pooled_projection_dim"}
        for key, width in ((k, config[f]) for k, f in fields.items()):
            if shapes.get(key, (None,))[-1] != width:
                problems.append(f"the embedding cache {cache} has {key} of shape {list(shapes.get(key, []))}, but the "
                                f"transformer of {path} expects width {width}: it was built with another model; "
                                f"write it again with this one: `{command}`")
        cached = shapes.get("prompt_embeds", (None,))[0]
        if cached is not None and cached != text_length(max_len):
            expected = f"{text_length(max_len)} ({max_len} T5 tokens)" if text_length(max_len) != max_len else max_len
            problems.append(f"the embedding cache {cache} holds {cached} text tokens per prompt, but model.args."
                            f"max_sequence_length = {max_len} expects {expected}: set model.args.max_sequence_length "
                            f"to the cache's, or write the cache again: `{command}`")
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
    return problems


def latent_grid(transformer: dict, vae: dict, token_patch: int = 1) -> tuple[int, int, int | None]:
    """(spatial factor, patch, temporal factor or None) of a pipeline, from its transformer's and VAE's config.json:
    pixels per latent (the VAE's), latents per token side (the transformer's patch_size x the latents the adapter
    packs into a token itself, `ModelSpec.token_patch`), and a video VAE's frames per latent frame."""
    spatial = vae.get("scale_factor_spatial") or (2 ** len(vae["temperal_downsample"]) if vae.get("temperal_downsample")
                                                  else 2 ** (len(vae["block_out_channels"]) - 1))
    patch = transformer.get("patch_size") or 1
    patch = (patch[-1] if isinstance(patch, list) else patch) * token_patch
    temporal = vae.get("scale_factor_temporal") or (2 ** sum(vae["temperal_downsample"])
                                                    if vae.get("temperal_downsample") else None)
    return spatial, patch, temporal


def size_problems(name: str, args: dict, transformer: dict, vae: dict) -> list[str]:
    """model.args height and width (and a video's num_frames) against the factors of the pipeline's config files
    (`latent_grid`), before anything loads: pixels a multiple of the spatial factor x the patch, frames 1 + (the
    temporal factor) k. The loaders check the same on the loaded modules."""
    spatial, patch, temporal = latent_grid(transformer, vae, MODELS.spec(name).token_patch)
    problems = []
    height, width = args.get("height"), args.get("width")
    multiple = spatial * patch
    if height is not None and width is not None and (height % multiple or width % multiple):
        fit = lambda n: max(multiple, round(n / multiple) * multiple)  # noqa: E731
        problems.append(f"model.args: height {height} and width {width} must be multiples of {multiple} for {name} "
                        f"(VAE factor {spatial} x patch {patch}): use e.g. height={fit(height)} width={fit(width)}")
    frames = args.get("num_frames")
    if frames is not None and temporal and (frames < 1 or (frames - 1) % temporal):
        problems.append(f"model.args.num_frames = {frames} must be 1 + {temporal} k for {name} (the VAE compresses "
                        f"{temporal} frames into one after the first): use e.g. num_frames="
                        f"{max(frames - 1, 0) // temporal * temporal + 1}")
    return problems


def load_components(name: str, path: str | Path, *, example: str, classes: dict[str, type],
                    dtype: str | torch.dtype, device: str, text_encoder: TextEncoder | None,
                    embedding_cache: str | None, load_text_encoder: Callable[[Path, torch.dtype], TextEncoder],
                    cache_widths: Callable[[dict[str, nn.Module]], dict[str, int]],
                    check: Callable[[dict[str, nn.Module]], None] | None = None,
                    optional: Sequence[str] = ()) -> tuple[dict[str, nn.Module], TextEncoder]:
    """({subfolder: component}, text encoder) of a local diffusers pipeline directory `path`, behind one loading bar.

    classes: subfolder -> diffusers class (e.g. {"transformer": ..., "vae": ...}), each loaded in eval mode on
    `device`; a subfolder of `optional` that the directory lacks (Wan 2.1 has no transformer_2) is left out.
    check(components) runs before the text encoder loads (a wrong size stops before T5-XXL is read). The text
    encoder is `text_encoder` (already loaded, shared with another model), else the embedding cache (its
    widths checked against `cache_widths(components)`: key -> last dimension), else load_text_encoder(path, dtype).
    """
    from mixgrpo.progress import bar

    if text_encoder is not None and embedding_cache is not None:
        raise ConfigError(f"{name}: give text_encoder or embedding_cache, not both")
    path = check_pipeline_dir(path, name, components=[c for c in classes if c not in optional], example=example)
    dtype = parse_dtype(dtype)
    kw = dict(torch_dtype=dtype, local_files_only=True)
    present = {c: cls for c, cls in classes.items() if c not in optional or (path / c).is_dir()}
    loads_text = text_encoder is None and embedding_cache is None
    components = {}
    with bar(total=len(present) + loads_text, desc=f"loading {name} from {path}", unit="component") as progress:
        for folder, cls in present.items():
            components[folder] = cls.from_pretrained(path, subfolder=folder, **kw).to(device).eval()
            progress.update()
        if check is not None:
            check(components)
        if embedding_cache is not None:
            from mixgrpo.models.text import EmbeddingCache

            text_encoder = EmbeddingCache(embedding_cache, device=device)
            text_encoder.check_widths(name, **cache_widths(components))
        elif text_encoder is None:
            text_encoder = load_text_encoder(path, dtype)
            progress.update()
    return components, text_encoder


def check_size(name: str, size: tuple[int, int], multiple: int, why: str) -> None:
    """Raise unless height and width (pixels) are multiples of `multiple` (`why`: e.g. "VAE factor 8 x patch 2")."""
    height, width = size
    if height % multiple or width % multiple:
        raise ConfigError(f"{name}: height {height} and width {width} must be multiples of {multiple} ({why})")


def load_pipeline(name: str, path: str | Path, *, example: str, transformer_class: type, dtype: str | torch.dtype,
                  device: str, size: tuple[int, int], patch: int | None, text_encoder: TextEncoder | None,
                  embedding_cache: str | None, load_text_encoder: Callable[[Path, torch.dtype], TextEncoder]):
    """(transformer, VAE decoder, text encoder, VAE downsampling factor) of a local FLUX / SD3 pipeline
    directory `path`, in eval mode on `device`, behind one loading bar.

    size (height, width) in pixels must be a multiple of the VAE factor x `patch` (None: the transformer's own
    patch_size). The text encoder is `text_encoder` (already loaded, shared with another model), else the
    embedding cache (its widths checked against the transformer), else load_text_encoder(path, dtype)."""
    from diffusers import AutoencoderKL

    def factor_and_patch(c: dict[str, nn.Module]) -> tuple[int, int]:
        return (2 ** (len(c["vae"].config.block_out_channels) - 1),
                c["transformer"].config.patch_size if patch is None else patch)

    def check(c: dict[str, nn.Module]) -> None:
        factor, p = factor_and_patch(c)
        check_size(name, size, factor * p, f"VAE factor {factor} x patch {p}")

    components, text_encoder = load_components(
        name, path, example=example, classes={"transformer": transformer_class, "vae": AutoencoderKL}, dtype=dtype,
        device=device, text_encoder=text_encoder, embedding_cache=embedding_cache,
        load_text_encoder=load_text_encoder, check=check,
        cache_widths=lambda c: {"prompt_embeds": c["transformer"].config.joint_attention_dim,
                                "pooled": c["transformer"].config.pooled_projection_dim})
    return components["transformer"], VaeDecoder(components["vae"]), text_encoder, factor_and_patch(components)[0]


def tokenize(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length] padded to max_length, truncating like the diffusers pipelines (the first prompt
    truncated warns, the others are counted: `mixgrpo.models.text.note_truncations`)."""
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids
    note_truncations(tokenizer, max_length, prompts, [len(i) for i in tokenizer(prompts, verbose=False).input_ids])
    return ids


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class VaeDecoder(Frozen):
    """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], as the FLUX / SD3 pipelines decode:

    images = clamp(vae.decode(latents / scaling_factor + shift_factor) / 2 + 1/2, 0, 1), returned in float32.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


class _CausalVae(Frozen):
    """A frozen 3-D causal VAE (AutoencoderKLWan, AutoencoderKLQwenImage) with its per-channel latents_mean and
    latents_std as buffers [1, C, 1, 1, 1]: what its decoder and encoder share."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(shape), persistent=False)


class CausalVaeDecoder(_CausalVae):
    """Latents [B, C, F, h, w] -> videos [B, F', 3, H, W] in [0, 1] (float32), as the Wan and Qwen-Image pipelines
    decode with their 3-D causal VAEs (AutoencoderKLWan, AutoencoderKLQwenImage):
    vae.decode(latents / (1 / latents_std) + latents_mean) (the pipelines' arithmetic), mapped from [-1, 1]."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = self.vae.dtype
        z = latents.to(dtype) / (1.0 / self.std.to(dtype)) + self.mean.to(dtype)
        video = self.vae.decode(z, return_dict=False)[0]                          # [B, 3, F', H, W] in [-1, 1]
        return (video.float().transpose(1, 2) / 2 + 0.5).clamp(0, 1)


class VaeEncoder(Frozen):
    """Images [B, 3, H, W] in [0, 1] -> latents [B, C, H/f, W/f], as FluxKontextPipeline encodes its reference image:
    latents = (mode(vae.encode(2 images - 1)) - shift_factor) * scaling_factor (the distribution's mode, no noise),
    in the VAE's dtype."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.shift_factor or 0.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()
        return (z - self.shift_factor) * self.scaling_factor


class CausalVaeEncoder(_CausalVae):
    """Videos [B, 3, F', H, W] in [0, 1] -> latents [B, C, F, H/f, W/f] normalised as the Wan and Qwen-Image pipelines
    normalise theirs: (mode(vae.encode(2 videos - 1)) - latents_mean) / latents_std (the inverse of
    `CausalVaeDecoder`), in the VAE's dtype."""

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        dtype = self.vae.dtype
        z = self.vae.encode((videos * 2 - 1).to(dtype)).latent_dist.mode()
        return (z - self.mean.to(dtype)) / self.std.to(dtype)


def input_images(model: nn.Module, prompts: Sequence[str], images: Images | None,
                 size: tuple[int, int]) -> torch.Tensor:
    """The input images of an image-conditioned model's examples, checked and stacked: [B, k, 3, H, W] float32.

    images: one tuple per prompt of k tensors [3, H, W] in [0, 1] (`FlowModel.encode_prompts`; k checked by
    `check_images` against the model's `image_inputs`, and the same for every example of a batch); size: (H, W) the
    model's resolution, which every input must have (`mixgrpo.images.load_inputs` loads them so)."""
    check_images(model, prompts, images)
    name = type(model).__name__
    counts = sorted({len(example) for example in images})
    if len(counts) > 1:
        raise ConfigError(f"{name}: the examples of a batch have {counts} input images; give every example of a "
                          f"prompt file the same number")
    for example in images:
        for image in example:
            if image.dim() != 3 or image.shape[0] != 3 or tuple(image.shape[1:]) != tuple(size):
                raise ConfigError(f"{name}: an input image of shape {list(image.shape)}, but the model takes "
                                  f"[3, {size[0]}, {size[1]}] (its height and width): resize the inputs to the "
                                  f"model's resolution")
    return torch.stack([torch.stack([image.float() for image in example]) for example in images])


def to_pil(image: torch.Tensor):
    """[3, H, W] float in [0, 1] -> an 8-bit RGB PIL image (rounded), what the stock pipelines' image processors take:
    exact for an image read from a file (values k / 255)."""
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def from_pil(image) -> torch.Tensor:
    """An RGB PIL image -> [3, H, W] float32 in [0, 1], as diffusers' image processors read one (uint8 / 255)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
