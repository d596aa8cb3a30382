"""The model-adapter interface: the only thing the rollout and the trainer know about a base model.

An adapter maps (x, sigma, conditioning) to a velocity v ~= eps - x0 (see docs/notation.md). Everything
model-specific (patchifying, position ids, timestep scaling, guidance embedding, VAE) lives behind it.

Shapes: B = batch, latent_shape = the per-sample shape the rollout integrates: (C, H, W) for images,
(C, F, H, W) for videos (F latent frames). The step math and the rollout are shape-agnostic; `decode` gives images
[B, 3, H, W] or videos [B, F', 3, H, W] (F' decoded frames), which rewards score frame by frame.
Conditioning (`Cond`) is a dict of batch-first tensors, so it can be indexed, repeated and concatenated
generically with the helpers below.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from mixgrpo.dtypes import parse_dtype
from mixgrpo.errors import ConfigError
from mixgrpo.registry import Registry

Cond = dict[str, torch.Tensor]

PromptSets = dict[str, tuple[str, list[str]]]
"""Prompts a run will encode: {"train": (source, prompts), "eval": (source, prompts)}."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything the package knows about one base model, registered at the foot of its file
    (`MODELS.add(ModelSpec(...))`): a new model is one file and one import line in `mixgrpo/models/__init__.py`.

    factory: (**model.args) -> FlowModel; keyword arguments only (`build_model` passes device, dtype, height,
        width and text_encoder to a factory that takes them).
    text_encoder: (path, *, dtype, device, [max_sequence_length], **args) -> a text encoder (`encode(prompts)`),
        loaded without the transformer, for `mixgrpo preprocess`; None: preprocess loads the whole model.
    check: (model.args, prompt sets) -> problems (one line each, naming the fix), run before training loads the
        model (`mixgrpo.preflight`): files, embedding-cache coverage, prompt lengths.
    trained_sigma_check: (model.args, trained) -> problems, for a model that can train only some sigmas (Wan 2.2
        A14B: one expert per run); trained = {sigma: the first iteration that trains it} of a run's plans, checked
        by the pre-flight so that a window that walks out of that range stops the run before the model loads.
    lora_format: () -> (the diffusers transformer class, the diffusers pipeline whose LoRA format and loader fit
        it), imported when called: `save_lora` writes that pipeline's format (None: no LoRA export).
    modules: the Python modules beyond the core that building the model imports; the pre-flight names the missing
        ones with their pip command before anything loads.
    text_tokens: max_sequence_length -> the text tokens the transformer sees (SD3: CLIP's 77 before T5's), and
    joint_attention: whether they run through every block beside the image tokens (False: cross-attention, Wan);
        both for the memory estimate (`mixgrpo.memory`).
    token_patch: latents per token side that the adapter packs into one token itself (FLUX.1, FLUX.2: 2 x 2), on top
        of the transformer config's own patch_size: a token's side in pixels is the VAE factor x patch_size x
        token_patch (`mixgrpo.models._diffusers.latent_grid`: the size checks, the memory estimate, the grid's shift).
    pipeline_sigmas: whether the stock pipeline hands its scheduler sigmas = linspace(1, 1/N, N) (FLUX.1, FLUX.2,
        Qwen-Image) rather than asking it for N steps (SD3, Wan): the pipeline's own grid (`mixgrpo.pipeline_grid`).
    """

    name: str
    factory: Callable[..., "FlowModel"]
    text_encoder: Callable[..., Any] | None = None
    check: Callable[[dict, PromptSets], list[str]] | None = None
    trained_sigma_check: Callable[[dict, dict[float, int]], list[str]] | None = None
    lora_format: Callable[[], tuple[type, type]] | None = None
    modules: tuple[str, ...] = ()
    text_tokens: Callable[[int], int] = lambda n: n
    joint_attention: bool = True
    token_patch: int = 1
    pipeline_sigmas: bool = False


class ModelRegistry(Registry["FlowModel"]):
    """The base models: name -> `ModelSpec`. `get(name)` is the factory (or a "package.module:factory" callable
    of user code), `spec(name)` the whole description."""

    def __init__(self) -> None:
        super().__init__("base model")
        self._specs: dict[str, ModelSpec] = {}

    def add(self, spec: ModelSpec) -> ModelSpec:
        self.register(spec.name, spec.modules)(spec.factory)
        self._specs[spec.name] = spec
        return spec

    def spec(self, name: str) -> ModelSpec:
        """The description of a registered model; a user's "package.module:factory" gets one with its factory
        only (no checks, no separate text encoder). Raises ConfigError for an unknown name."""
        factory = self.get(name)
        return self._specs.get(name) or ModelSpec(name, factory)

    def specs(self) -> list[ModelSpec]:
        return [self._specs[n] for n in self.names()]


MODELS = ModelRegistry()


class Frozen(nn.Module):
    """A module that always stays in eval mode: the text encoders and decoders an adapter holds never switch
    dropout (or any training-mode behaviour) on when a trainer calls .train() on the whole adapter."""

    def train(self, mode: bool = True) -> "Frozen":
        return super().train(False)


class FlowModel(nn.Module):
    """Base class of every model adapter.

    Subclasses set `latent_shape` and implement `forward`, `encode_prompts` and `decode`.
    `denoiser` is the network that is trained (LoRA or full); text encoders and VAEs stay frozen.
    """

    latent_shape: tuple[int, ...]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, *latent_shape]; sigma: [B] in [0, 1] (1 = noise); returns [B, *latent_shape]."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning for a list of prompts; "" is the unconditional (empty) prompt."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images [B, 3, H, W] (or videos [B, F, 3, H, W]), float in [0, 1]."""
        raise NotImplementedError

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of two velocities [N, *latent_shape]: v_u + s (v_c - v_u). An adapter whose
        stock pipeline combines them otherwise (Qwen-Image rescales to the conditional norm) overrides it."""
        return classifier_free_guidance(v_cond, v_uncond, scale)

    @property
    def denoiser(self) -> nn.Module:
        """The trainable network (the transformer)."""
        raise NotImplementedError


def classifier_free_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_u + s (v_c - v_u): the guided velocity of most pipelines (FLUX.1's true CFG, SD3, FLUX.2 klein, Wan)."""
    return v_uncond + scale * (v_cond - v_uncond)


class TextEncoder(Protocol):
    def encode(self, prompts: Sequence[str]) -> Cond: ...


class TransformerAdapter(FlowModel):
    """A FlowModel made of a diffusers transformer (the denoiser), a frozen text encoder (anything with
    `encode(prompts) -> Cond`, e.g. an embedding cache) and a decoder (latents -> images in [0, 1]).
    Subclasses implement `forward` for their transformer's calling convention."""

    def __init__(self, transformer: nn.Module, text_encoder: TextEncoder,
                 decoder: Callable[[torch.Tensor], torch.Tensor], latent_shape: tuple[int, ...]):
        super().__init__()
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.decoder = decoder
        self.latent_shape = tuple(latent_shape)

    @property
    def denoiser(self) -> nn.Module:
        return self.transformer

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        return self.text_encoder.encode(list(prompts))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


def accepts(factory: Callable, name: str) -> bool:
    """Whether a model factory takes keyword argument `name`."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_model(name: str, args: dict[str, Any], device: str | None = None, dtype: str | None = None,
                resolution: tuple[int, int] | None = None, text_encoder: Any = None) -> FlowModel:
    """A registered model from its factory arguments, in eval mode, with optional overrides: device and dtype go
    to the factory when it takes them (flux, sd3) and are applied to the built model otherwise; a resolution
    (height, width) needs a factory that takes height and width. text_encoder: an already loaded one to share
    (for factories that accept it), e.g. between a fine-tuned model and its base in hybrid inference."""
    factory = MODELS.get(name)
    args = dict(args)
    if resolution is not None:
        if not (accepts(factory, "height") and accepts(factory, "width")):
            raise ConfigError(f"model {name!r} has a fixed resolution (its factory takes no height/width): drop "
                              f"--resolution")
        args["height"], args["width"] = resolution
    for key, value in (("device", device), ("dtype", dtype)):
        if value is not None and accepts(factory, key):
            args[key] = value
    if text_encoder is not None and accepts(factory, "text_encoder") and not args.get("embedding_cache"):
        args["text_encoder"] = text_encoder
    try:
        model = factory(**args)
    except TypeError as e:
        raise ConfigError(f"model.args do not fit model {name!r}: {e}") from None
    if device is not None and not accepts(factory, "device"):
        model = model.to(device)
    if dtype is not None and not accepts(factory, "dtype"):
        model = model.to(parse_dtype(dtype))
    return model.eval()


@torch.no_grad()
def copy_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy `weights` (parameter name -> tensor) into the parameters of `module` that have those names, in place:
    the EMA weights into the live model for an export or an evaluation, and the live ones back."""
    for name, param in module.named_parameters():
        if name in weights:
            param.copy_(weights[name])


def cond_index(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """Select rows of every tensor of `cond`."""
    return {k: v[index] for k, v in cond.items()}


def cond_expand(row: Cond, n: int) -> Cond:
    """[1, ...] -> [n, ...]: one conditioning row (CFG's unconditional one) for every sample of a batch, as views
    (no copy)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in row.items()}


def cond_repeat_interleave(cond: Cond, repeats: int) -> Cond:
    """[P, ...] -> [P * repeats, ...], each row repeated `repeats` times in place (group layout)."""
    return {k: v.repeat_interleave(repeats, dim=0) for k, v in cond.items()}


def cond_cat(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditionings along the batch dimension."""
    keys = conds[0].keys()
    return {k: torch.cat([c[k] for c in conds], dim=0) for k in keys}


def cond_to(cond: Cond, device: torch.device | str) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


def guided_velocity(model: FlowModel, x: torch.Tensor, sigma: torch.Tensor, cond: Cond,
                    uncond: Cond | None, guidance_scale: float) -> torch.Tensor:
    """Velocity with classifier-free guidance: v_u + s (v_c - v_u), cond and uncond in one batch, combined by the
    model's `guide` (plain CFG unless its stock pipeline does otherwise).

    x: [N, *latent]; sigma: [N]; cond, uncond: [N, ...] rows. Returns float32 [N, *latent].
    """
    if uncond is None or guidance_scale == 1.0:
        return model(x, sigma, cond).float()
    n = x.shape[0]
    v = model(torch.cat([x, x]), torch.cat([sigma, sigma]), cond_cat([cond, uncond])).float()
    v_cond, v_uncond = v[:n], v[n:]
    return getattr(model, "guide", classifier_free_guidance)(v_cond, v_uncond, guidance_scale)
