"""The model-adapter interface: the only thing the rollout and the trainer know about a base model.

An adapter maps (x, sigma, conditioning) to a velocity v ~= eps - x0 (see docs/notation.md). Everything
model-specific (patchifying, position ids, timestep scaling, guidance embedding, VAE) lives behind it.

Shapes: B = batch, latent_shape = the per-sample shape the rollout integrates: (C, H, W) for images,
(C, F, H, W) for videos (F latent frames). The step math and the rollout are shape-agnostic; `decode` gives images
[B, 3, H, W] or videos [B, F', 3, H, W] (F' decoded frames), which rewards score frame by frame.
Conditioning (`Cond`) is a dict of batch-first tensors, so it can be indexed, repeated and concatenated
generically with the helpers below.

Image-conditioned models (editing, image-to-video) set `image_inputs` > 0: an example is (instruction, input images),
and `encode_prompts(prompts, images)` encodes the images INTO the Cond (VAE latents, vision-language states), so the
rollout, both objectives, CFG and the update carry them as they carry the text. The unconditional (CFG) rows of such
a model are `encode_prompts([""] * n, images)`: the stock pipelines encode the negative prompt with the same images.
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

Images = Sequence[tuple[torch.Tensor, ...]]
"""Input images of a batch of examples: one tuple per example of `image_inputs` tensors [3, H, W], float in [0, 1]."""

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
    image_inputs: how many input images an example of this model takes (0: text-to-image; 1: FLUX.1-Kontext, Wan
        I2V's first frame; Qwen-Image-Edit takes up to 3); the built model's `image_inputs` says the same.
    input_tokens: (model.args with the factory's defaults, the target's tokens) -> the tokens one input image adds
        beside the target's in every block (FLUX.1-Kontext: as many; Qwen-Image-Edit: its reference area's; 0 where
        the input enters otherwise, e.g. Wan I2V's channels), for the memory estimate.
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
    image_inputs: int = 0
    input_tokens: Callable[[dict, int], int] = lambda args, tokens: 0


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
    image_inputs: input images per example (0: text-to-image; see the module docstring).
    """

    latent_shape: tuple[int, ...]
    image_inputs: int = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Velocity. x: [B, *latent_shape]; sigma: [B] in [0, 1] (1 = noise); returns [B, *latent_shape]."""
        raise NotImplementedError

    def encode_prompts(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        """Conditioning of a list of prompts; "" is the unconditional (empty) prompt. images: None for a
        text-to-image model, else one tuple of `image_inputs` tensors [3, H, W] in [0, 1] per prompt, at
        `image_size()` (`mixgrpo.images.load_inputs` loads them so)."""
        raise NotImplementedError

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images `decode` gives, which is the size input images are given at. Default: decode one
        zero latent (once); adapters that know it override."""
        if getattr(self, "_image_size", None) is None:
            param = next(self.parameters())
            with torch.no_grad():
                out = self.decode(torch.zeros(1, *self.latent_shape, device=param.device, dtype=param.dtype))
            self._image_size = tuple(out.shape[-2:])
        return self._image_size

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
    """encode(prompts, images=None) -> Cond; images as in `FlowModel.encode_prompts` (a vision-language encoder
    reads them; a text-only encoder ignores them)."""

    def encode(self, prompts: Sequence[str], images: Images | None = None) -> Cond: ...


def check_images(model: FlowModel, prompts: Sequence[str], images: Images | None) -> None:
    """Raise ConfigError unless `images` fits `model` (`image_inputs`): None for a text-to-image model, one tuple of
    image_inputs tensors per prompt for an image-conditioned one."""
    wanted = getattr(model, "image_inputs", 0)
    name = type(model).__name__
    if images is None:
        if wanted:
            raise ConfigError(f"{name} edits an input image ({wanted} per example) but was given none: give prompts "
                              f"with images (a .jsonl prompt file with an \"images\" list, or --image PATH)")
        return
    if not wanted:
        raise ConfigError(f"{name} is a text-to-image model but was given input images: drop them (--image, the "
                          f"prompt file's images), or use an editing model (e.g. tiny_edit)")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} image tuples for {len(prompts)} prompts")
    counts = sorted({len(t) for t in images})
    if counts[0] < 1 or counts[-1] > wanted:
        raise ConfigError(f"{name} takes 1 to {wanted} input images per example, but an example has "
                          f"{counts[0] if counts[0] < 1 else counts[-1]}: give each example 1 to {wanted} images")


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

    def encode_prompts(self, prompts: Sequence[str], images: Images | None = None) -> Cond:
        check_images(self, prompts, images)
        if images is None:
            return self.text_encoder.encode(list(prompts))
        return self.text_encoder.encode(list(prompts), images)

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


def encode_examples(model: FlowModel, prompts: Sequence[str], images: Images | None) -> Cond:
    """model.encode_prompts(prompts, images), or (prompts) alone when there are no images, so that a text-to-image
    model written before image inputs (a user's) still works."""
    return model.encode_prompts(prompts) if images is None else model.encode_prompts(prompts, images)


def blank_inputs(model: FlowModel, n: int) -> list[tuple[torch.Tensor, ...]] | None:
    """n examples of mid-grey input images for an image-conditioned model (None for a text-to-image one): what
    conditioning built without a real example uses (a probe of the model's kernels)."""
    if not getattr(model, "image_inputs", 0):
        return None
    h, w = model.image_size()
    return [(torch.full((3, h, w), 0.5),) for _ in range(n)]


def cond_index(cond: Cond, index: torch.Tensor | slice) -> Cond:
    """Select rows of every tensor of `cond`."""
    return {k: v[index] for k, v in cond.items()}


def cond_expand(row: Cond, n: int) -> Cond:
    """[1, ...] -> [n, ...]: one conditioning row (CFG's unconditional one) for every sample of a batch, as views
    (no copy)."""
    return {k: v.expand(n, *v.shape[1:]) for k, v in row.items()}


def uncond_rows(model: FlowModel, n: int, images: Images | None, row: Cond | None) -> Cond:
    """CFG's unconditional rows of n examples ([n, ...]): the empty prompt with each example's own input images for
    an image-conditioned model (`images`: n tuples, as the stock pipelines encode their negative prompt), else `row`,
    the empty prompt's one row, for every example (`cond_expand`)."""
    if images is not None:
        return model.encode_prompts([""] * n, images)
    return cond_expand(row, n)


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
