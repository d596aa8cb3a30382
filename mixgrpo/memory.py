"""An estimate of the memory a training run needs per process, from the files alone, before any model loads.

    mixgrpo train --config flux_mixgrpo --dry-run     (pre-flight, this estimate, and nothing else)

For a diffusers pipeline directory (model.args.path), every component the adapter loads (the transformers, the
VAE, the text encoders unless an embedding cache replaces them) is built on the meta device from its config: exact
parameter counts, no memory, no weights read. The estimate then adds, per process:

- weights: every loaded parameter in model.args.dtype;
- training state of the trained weights (the denoiser, or its LoRA weights in float32): the weights themselves
  (LoRA), their gradients, AdamW's two moments, and the copies the config keeps (EMA and the forward-process
  objectives' sampling copy in float32, the KL reference in the weights' dtype); under FSDP the denoiser's share
  is divided by the world size (WORLD_SIZE of the launch, else 1: then it is the whole);
- on-policy distillation's teachers (`distill.teachers`): each a model of the student's architecture without its
  text encoders (a teacher reads the student's conditioning), in model.args.dtype, unsharded;
- activations of one training forward at the micro-batch, after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", arXiv 2205.05198, sec. 4): 34 s b h bytes per layer in 16-bit with
  attention that stores no score matrix (SDPA / flash), s tokens, b sequences, h hidden; with gradient
  checkpointing, the layers' 16-bit inputs (2 s b h each) plus one layer's 34 s b h. b doubles with true CFG in
  the GRPO update (conditional and unconditional rows in one batch).

Not counted: the reward models, the VAE decode of the rollout, the rollout's stored transitions, CUDA's own
context and the allocator's fragmentation; treat the total as a lower bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixgrpo.config import TrainConfig
from mixgrpo.objectives import OBJECTIVES

GIB = 1024 ** 3


@dataclass
class Estimate:
    """Per-process bytes of each part, the parameter count of each loaded component, the trained count."""

    params: dict[str, int]  # component -> parameters (loaded ones only)
    trained: int  # parameters the optimizer updates (the denoiser's, or its LoRA weights')
    parts: dict[str, float] = field(default_factory=dict)  # what -> bytes
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def lines(self) -> list[str]:
        """What `mixgrpo train` prints before loading the model."""
        counts = ", ".join(f"{name} {n / 1e9:.2f} B" if n >= 1e7 else f"{name} {n:,}"
                           for name, n in self.params.items())
        out = [f"memory estimate per process (before loading; a lower bound, docs/distributed.md): "
               f"{_size(self.total)}"]
        out += [f"  {what}: {_size(b)}" for what, b in self.parts.items()]
        out += [f"  parameters: {counts}; trained {self.trained:,}"] + [f"  {n}" for n in self.notes]
        return out


def estimate(cfg: TrainConfig, world_size: int = 1) -> Estimate | None:
    """The estimate for a run of `cfg` on `world_size` processes; None for a model that is not a local diffusers
    pipeline directory (the tiny and Gaussian models are small, a user's model unknown)."""
    args = cfg.model.args
    root = Path(str(args.get("path") or ""))
    if not (root / "model_index.json").is_file():
        return None
    from mixgrpo.dtypes import parse_dtype
    from mixgrpo.pipeline_grid import model_args

    resolved = model_args(cfg.model.name, args)
    get = resolved.get
    modules = meta_components(root, text=not args.get("embedding_cache"))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    trained_name = "transformer_2" if get("trained_expert") == "low_noise" and "transformer_2" in modules \
        else "transformer"
    denoiser = modules[trained_name]
    weight_bytes = parse_dtype(get("dtype") or "float32").itemsize
    est = Estimate(params, 0)
    est.parts["weights"] = sum(params.values()) * weight_bytes
    fsdp = cfg.parallel.strategy == "fsdp"
    share = 1 / world_size if fsdp else 1.0
    if cfg.lora.rank > 0:
        targets = list(cfg.lora.target_modules)
        lora = sum(cfg.lora.rank * (m.in_features + m.out_features) for n, m in denoiser.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in targets))
        est.trained, state_bytes = lora, 4  # float32 LoRA weights
        est.parts["LoRA weights, gradients, AdamW moments (float32)"] = 4 * lora * 4 * share
    else:
        est.trained, state_bytes = params[trained_name], weight_bytes
        est.parts[f"gradients and AdamW moments ({weight_bytes}-byte, as the weights)"] = \
            3 * est.trained * weight_bytes * share
        if fsdp:  # the denoiser's weights are sharded too
            est.parts["weights"] -= params[trained_name] * weight_bytes * (1 - share)
    copies = [("EMA", cfg.optim.ema_decay > 0, 4), ("KL reference", cfg.loss.kl_beta > 0, state_bytes),
              ("sampling copy", not OBJECTIVES.get(cfg.objective).stores_transitions and cfg.matching.sampler_decay > 0,
               4)]
    for name, on, nbytes in copies:
        if on:
            est.parts[f"{name} of the trained weights"] = est.trained * nbytes
    teachers = len(cfg.distill.teachers)
    if teachers:  # frozen models of the student's architecture without text encoders, in the student's dtype
        est.parts[f"{teachers} teacher{'s' * (teachers > 1)} (frozen, without text encoders)"] = \
            teachers * sum(n for name, n in params.items() if not name.startswith("text_encoder")) * weight_bytes
    est.parts.update(_activations(cfg, root, denoiser.config, resolved))
    if fsdp:
        est.notes.append(f"fsdp over {world_size} process(es): the denoiser's weights and training state divided "
                         f"by {world_size}" + (" (WORLD_SIZE unset: run under mixgrpo launch for the per-rank share)"
                                                if world_size == 1 else ""))
    if args.get("embedding_cache"):
        est.notes.append("text encoders not loaded: the embedding cache replaces them")
    return est


def _activations(cfg: TrainConfig, root: Path, transformer: Any, args: dict[str, Any]) -> dict[str, float]:
    """The training forward's stored activations at the micro-batch (module docstring); args: the model's arguments
    with the factory's defaults."""
    from mixgrpo.models import MODELS
    from mixgrpo.models._diffusers import latent_grid

    vae = json.loads((root / "vae" / "config.json").read_text())
    get = args.get
    spec = MODELS.spec(cfg.model.name)
    spatial, patch, temporal = latent_grid(dict(transformer), vae, spec.token_patch)
    height, width = get("height"), get("width")
    if height is None or width is None:
        return {}
    frames = get("num_frames")
    latent_frames = (frames - 1) // temporal + 1 if frames and temporal else 1
    tokens = (height // (spatial * patch)) * (width // (spatial * patch)) * latent_frames
    tokens += spec.input_tokens(args, tokens)  # an editing model's input images beside the target (Kontext)
    text = spec.text_tokens(get("max_sequence_length") or 0)  # SD3: CLIP's tokens before T5's
    if spec.joint_attention:  # text tokens run through every block (Wan: cross-attention)
        tokens += text
    hidden = transformer.get("num_attention_heads", 0) * transformer.get("attention_head_dim", 0)
    layers = transformer.get("num_layers", 0) + transformer.get("num_single_layers", 0)
    objective = OBJECTIVES.get(cfg.objective)
    guided = objective.guided_update and cfg.rollout.guidance_scale != 1  # cond and uncond rows
    rows = cfg.update.micro_batch_size * (2 if guided else 1) * objective.forwards_per_backward(cfg)
    scale = (2 if cfg.run.precision in ("bf16", "auto") else 4) / 2  # the formula's bytes are 16-bit
    per_layer = 34 * tokens * rows * hidden * scale
    checkpointed = cfg.update.grad_checkpointing
    stored = (2 * tokens * rows * hidden * scale * layers + per_layer) if checkpointed else per_layer * layers
    how = "gradient checkpointing" if cfg.update.grad_checkpointing else "no checkpointing"
    return {f"activations ({rows} rows x {tokens} tokens x {hidden} wide x {layers} layers, {how})": stored}


def meta_components(root: Path, text: bool = True) -> dict[str, torch.nn.Module]:
    """The modules of the pipeline directory `root` that an adapter loads (transformers, VAE, and the text encoders
    when `text`), built on the meta device from their configs: the architecture without any memory."""
    import importlib

    index = json.loads((root / "model_index.json").read_text())
    out = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] not in ("diffusers", "transformers"):
            continue
        if name.startswith("text_encoder") and not text or not (root / name / "config.json").is_file():
            continue
        cls = getattr(importlib.import_module(spec[0]), spec[1], None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizers, schedulers, processors
        with torch.device("meta"):
            if spec[0] == "diffusers":
                out[name] = cls.from_config(cls.load_config(root / name))
            else:
                from transformers import AutoConfig

                out[name] = cls._from_config(AutoConfig.from_pretrained(root / name, local_files_only=True))
    return out


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def report(cfg: TrainConfig, world_size: int) -> Estimate | None:
    """Print the estimate (rank 0) before the model loads; a model without one prints nothing, and an estimate that
    fails (a component class this module cannot build on the meta device) says so in one line."""
    from mixgrpo import dist

    try:
        est = estimate(cfg, world_size)
    except Exception as e:  # noqa: BLE001  (an estimate never stops a run: the pre-flight has passed)
        dist.print0(f"memory estimate unavailable ({type(e).__name__}: {e})")
        return None
    if est is not None:
        dist.print0("\n".join(est.lines()))
    return est
