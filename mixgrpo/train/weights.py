"""The weights of a run besides the live ones: which are trained, their EMA, the frozen reference, and the swap
that puts a copy in place for a while (the EMA for evaluation, the sampling copy for a rollout).

The copies hold the trainable weights only (the rest of the model is shared); a reference model is the same
module run with the base weights through `torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch.func import functional_call

from mixgrpo.config import ConfigError
from mixgrpo.models import Cond, FlowModel
from mixgrpo.models.base import copy_weights


def trainable_parameters(model: FlowModel, model_name: str, lora_rank: int, lora_alpha: float,
                         lora_targets: Sequence[str], grad_checkpointing: bool) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the denoiser (lora_rank 0: full fine-tuning) or add and unfreeze LoRA
    weights (alpha 0 = rank) on the modules named by lora_targets."""
    model.requires_grad_(False)
    if lora_rank > 0:
        from mixgrpo.models.lora import apply_lora

        if not hasattr(model.denoiser, "add_adapter"):  # LoRA goes through diffusers' peft integration
            raise ConfigError(f"lora.rank = {lora_rank}: model {model_name!r} does not support LoRA "
                              f"adapters (its denoiser is not a diffusers model): use lora.rank=0")
        apply_lora(model.denoiser, rank=lora_rank, alpha=lora_alpha, target_modules=list(lora_targets))
    else:
        model.denoiser.requires_grad_(True)
    if grad_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
        model.denoiser.enable_gradient_checkpointing()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("no trainable parameters: check lora.target_modules against the model's module names")
    return params


class EMA:
    """Exponential moving average of the trainable weights (kept in float32): shadow <- d shadow + (1 - d) theta.
    Also the forward-process objectives' sampling copy (`matching.sampler_decay`)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter], decay: float | None = None) -> None:
        """One step towards the live weights; decay: this step's, instead of the constant one (a warm-up)."""
        decay = self.decay if decay is None else decay
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - decay)


def shadow_of(copy: EMA | None) -> dict[str, torch.Tensor] | None:
    """The weights of an optional copy (None: the live weights)."""
    return None if copy is None else copy.shadow


@contextlib.contextmanager
def swapped_weights(model: FlowModel, weights: dict[str, torch.Tensor] | None):
    """Run a block with some parameters replaced in place (EMA weights for evaluation, the sampling copy for a
    rollout), restoring the live ones afterwards. weights=None changes nothing."""
    if weights is None:
        yield
        return
    backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
    copy_weights(model, weights)
    try:
        yield
    finally:
        copy_weights(model, backup)


def model_with(model: FlowModel,
               weights: dict[str, torch.Tensor] | None) -> Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]:
    """A callable (x, sigma, cond) -> v that runs `model` with some parameters replaced (e.g. the frozen base)."""
    if weights is None:
        return model

    def velocity(x, sigma, cond):
        return functional_call(model, weights, (x, sigma, cond), strict=False)

    velocity.guide = model.guide  # the model's own CFG combination (guided_velocity), also for the reference
    return velocity
