"""LoRA through peft, and saving the trained denoiser in formats a stock diffusers pipeline loads.

- `apply_lora` adds a peft LoRA adapter to a diffusers transformer (FLUX or SD3) and freezes everything else.
  The update of a targeted linear layer W is  W x + (alpha / rank) B A x,  A: [rank, in], B: [out, rank].
  peft's default init draws A (Kaiming-uniform) and sets B = 0, so the adapted model starts equal to the base.
- `save_lora` writes diffusers' LoRA format (pytorch_lora_weights.safetensors, keys "transformer.<module>.lora_A
  .weight", with the peft config — rank, alpha, targets — in the safetensors metadata), so that
  `FluxPipeline.load_lora_weights(dir)` / `StableDiffusion3Pipeline.load_lora_weights(dir)` (and the Qwen-Image,
  FLUX.2 and Wan pipelines': each base model's `ModelSpec.lora_format`) load it as is.
- `save_full` writes a diffusers transformer directory (config.json + sharded safetensors), loadable with
  `FluxTransformer2DModel.from_pretrained(dir)` and passable as `transformer=` to a stock pipeline.
Every save is atomic: it goes to a temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mixgrpo.errors import ConfigError
from mixgrpo.fileio import atomic_directory
from mixgrpo.models.base import MODELS, FlowModel

ADAPTER = "default"  # the peft adapter name; one adapter per model
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # what load_lora_weights looks for
WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"  # diffusers' (sharded) model weights
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Attention projections of the joint (image + text) blocks: what Flow-GRPO and the diffusers LoRA scripts adapt.
ATTENTION_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def _transformer(model: nn.Module) -> nn.Module:
    return model.denoiser if isinstance(model, FlowModel) else model


def has_lora(transformer: nn.Module) -> bool:
    return ADAPTER in (getattr(transformer, "peft_config", None) or {})


def apply_lora(transformer: nn.Module, rank: int, alpha: float | None = None,
               target_modules: Sequence[str] = ATTENTION_MODULES, init: bool | str = True,
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """Add a LoRA adapter to a diffusers transformer in place; only the LoRA weights stay trainable.

    rank: r, the inner dimension of the update B A. alpha: scale numerator (update scaled by alpha / rank);
    None or 0 = rank (scale 1, the config's convention).
    target_modules: names (or name suffixes) of the linear layers to adapt.
    init: peft's init_lora_weights; True = Kaiming A, zero B (the model is unchanged at start); "gaussian",
    "pissa", ... are passed through. dtype: of the LoRA weights (float32 master weights under bf16 autocast,
    whatever the base weights' dtype). Returns `transformer`.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1 (got {rank}); use rank 0 in the config for full fine-tuning")
    if has_lora(transformer):
        raise ValueError("the transformer already has a LoRA adapter; apply_lora once per model")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank,
                        target_modules=list(target_modules), init_lora_weights=init)
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in transformer.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"LoRA target_modules {list(target_modules)} match no layer of "
                          f"{type(transformer).__name__} ({e}); linear layer names end in: {names}") from None
    transformer.requires_grad_(False)
    for param in lora_parameters(transformer, trainable_only=False):
        param.data = param.data.to(dtype)
        param.requires_grad_(True)
    return transformer


def lora_parameters(transformer: nn.Module, trainable_only: bool = True) -> list[nn.Parameter]:
    """The LoRA weights (lora_A / lora_B of every adapted layer) of a transformer."""
    return [p for n, p in transformer.named_parameters()
            if ".lora_" in n and (p.requires_grad or not trainable_only)]


def _pipeline_class(transformer: nn.Module) -> type:
    """The diffusers pipeline whose LoRA format fits `transformer`, from the base models' `ModelSpec.lora_format`
    (an FSDP-wrapped transformer is a subclass of the diffusers class)."""
    formats = [spec.lora_format() for spec in MODELS.specs() if spec.lora_format is not None]
    for transformer_class, pipeline_class in formats:
        if isinstance(transformer, transformer_class):
            return pipeline_class
    raise TypeError(f"no diffusers LoRA format known for {type(transformer).__name__}; save_lora supports "
                    f"{', '.join(dict.fromkeys(t.__name__ for t, _ in formats))}")


def save_lora(model: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA of `model` (a FlowModel or its transformer) in diffusers' format to `directory`.

    state_dict: the transformer's LoRA weights under its parameter names (e.g. gathered from FSDP shards by
    `dist.full_weights`); default: read from the transformer itself.
    Load it with no mixgrpo code: `FluxPipeline.from_pretrained(base).load_lora_weights(directory)`
    (or StableDiffusion3Pipeline for SD3).
    """
    from peft import get_peft_model_state_dict

    transformer = _transformer(model)
    if not has_lora(transformer):
        raise ValueError("save_lora: the model has no LoRA adapter (full fine-tuning?); use save_full")
    state = {k: v.detach().cpu().contiguous() for k, v in
             get_peft_model_state_dict(transformer, state_dict=state_dict, adapter_name=ADAPTER).items()}
    # The peft config (rank, alpha, targets) travels in the file's metadata: without it diffusers would
    # assume alpha = rank and scale the update wrongly.
    metadata = transformer.peft_config[ADAPTER].to_dict()
    with atomic_directory(directory) as tmp:
        _pipeline_class(transformer).save_lora_weights(tmp, transformer_lora_layers=state,
                                                       transformer_lora_adapter_metadata=metadata)
    return Path(directory)


def load_lora(transformer: nn.Module, directory: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a LoRA written by `save_lora` (or any diffusers LoRA of this architecture) into `transformer`.

    Without an adapter, one is added from the file (weights trainable, in `dtype`); with one (resuming),
    its weights are overwritten in place, so optimizer references stay valid. Returns `transformer`.
    """
    from safetensors.torch import load_file

    file = Path(directory) / LORA_WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"load_lora: {file} not found; give a directory written by save_lora")
    if not has_lora(transformer):
        transformer.load_lora_adapter(str(directory), prefix="transformer", adapter_name=ADAPTER,
                                      weight_name=LORA_WEIGHTS_NAME)
        transformer.requires_grad_(False)
        for param in lora_parameters(transformer, trainable_only=False):
            param.data = param.data.to(dtype)
            param.requires_grad_(True)
        return transformer
    # File keys "transformer.<module>.lora_A.weight" are the parameters "<module>.lora_A.default.weight".
    params = {n: p for n, p in transformer.named_parameters() if ".lora_" in n}
    state = {k.removeprefix("transformer.").removesuffix(".weight") + f".{ADAPTER}.weight": v
             for k, v in load_file(str(file)).items()}
    if set(state) != set(params) or any(state[n].shape != p.shape for n, p in params.items()):
        raise ConfigError(f"load_lora: {file} does not match the model's LoRA adapter (extra "
                          f"{sorted(set(state) - set(params))[:3]}, missing {sorted(set(params) - set(state))[:3]}, "
                          f"or other shapes); was it saved with the same rank and target_modules?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
    return transformer


def save_full(transformer: nn.Module, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None,
              dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Write a diffusers transformer directory (config.json + sharded safetensors), atomically.

    transformer: a FlowModel or its diffusers transformer (without LoRA: use save_lora for that).
    state_dict: the weights to write (e.g. gathered from FSDP shards); default transformer.state_dict().
    dtype: cast the weights on the way out (e.g. torch.bfloat16 from float32 master weights: half the size).
    Load with `FluxTransformer2DModel.from_pretrained(directory)` / `SD3Transformer2DModel.from_pretrained(...)`.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    transformer = _transformer(transformer)
    if has_lora(transformer):
        raise ValueError("save_full: the transformer has a LoRA adapter; save it with save_lora (diffusers' LoRA "
                         "format), or merge it first")
    state = transformer.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern=WEIGHTS_PATTERN,
                                               max_shard_size=max_shard_size)
    with atomic_directory(directory) as tmp:
        transformer.save_config(tmp)
        _unwrap_class_name(transformer, tmp / "config.json")
        for filename, names in split.filename_to_tensors.items():
            save_file({n: state[n] for n in names}, str(tmp / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return Path(directory)


def _unwrap_class_name(transformer: nn.Module, config_file: Path) -> None:
    """FSDP2 turns a FluxTransformer2DModel into an "FSDPFluxTransformer2DModel" subclass, and save_config
    writes that name; stock loaders expect the diffusers class name, so the config gets it back."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(transformer, FSDPModule):
        return
    cls = next(c for c in type(transformer).__mro__ if not issubclass(c, FSDPModule))
    config = json.loads(config_file.read_text())
    config["_class_name"] = cls.__name__
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
