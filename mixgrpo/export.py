"""A run's result in the formats stock diffusers pipelines load, and the way back from a run directory.

Export (`export_model`, a collective: every rank calls it). The weights are gathered from every rank, FSDP
shards included (`dist.full_weights`), and rank 0 writes them atomically:
- a LoRA run: diffusers' LoRA format (`pytorch_lora_weights.safetensors`, rank and alpha in its metadata),
  which `FluxPipeline.load_lora_weights` / `StableDiffusion3Pipeline.load_lora_weights` read;
- a full fine-tune: the adapter's own format when it has one (`save_pretrained(dir, state_dict)`: the tiny
  model's config.json + model.safetensors), else a diffusers transformer directory
  (`FluxTransformer2DModel.from_pretrained(dir)`, `SD3Transformer2DModel.from_pretrained(dir)`).
`mixgrpo export` writes the same files from a checkpoint (full or sharded, written under any world size), so a
run that stopped before its end still delivers its model.

Loading (`load_run`): the base model is rebuilt from the run's config.yaml (model.name and model.args, with
device / dtype / resolution overrides), then the fine-tuned weights go in: final/ (`load_export`) or a
checkpoint (`load_checkpoint_weights`). `mixgrpo sample`, `eval` and `export` load runs this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mixgrpo import dist
from mixgrpo.checkpoint import (MARKER, CheckpointError, dcp_load, describe_checkpoints, is_sharded_checkpoint,
                                 latest_checkpoint, read_weights)
from mixgrpo.errors import ConfigError
from mixgrpo.fileio import atomic_directory, writing
from mixgrpo.models.base import FlowModel, build_model, copy_weights
from mixgrpo.rundir import CONFIG, FINAL


# --------------------------------------------------------------------------------------------------
# writing


def export_model(model: FlowModel, path: str | Path, ema: dict[str, torch.Tensor] | None = None) -> Path | None:
    """Write the fine-tuned model to `path` (see the module docstring for the formats); returns `path` on
    rank 0, None elsewhere. ema: weights (parameter name -> tensor) that replace the trainable ones first.
    Collective: every rank calls it, outside `dist.unsharded`."""
    from mixgrpo.models.lora import has_lora, lora_parameters, save_full, save_lora

    if ema is not None:
        copy_weights(model, ema)
    lora = has_lora(model.denoiser)
    if lora:  # the gather selects the adapter by requires_grad (a model loaded for inference has it off)
        for param in lora_parameters(model.denoiser, trainable_only=False):
            param.requires_grad_(True)
    state = dist.full_weights(model.denoiser, trainable_only=lora)  # a LoRA: only the adapter, not the base
    if not dist.is_main():
        return None
    path = Path(path)
    with writing(path):  # a full disk is reported as such, naming the path, whatever the format's library says
        if lora:
            save_lora(model, path, state_dict=state)
        elif hasattr(model, "save_pretrained"):
            with atomic_directory(path) as tmp:  # a kill mid-export never leaves a half-written model
                model.save_pretrained(tmp, state_dict=state)
        else:
            save_full(model.denoiser, path, state_dict=state)
    return path


# --------------------------------------------------------------------------------------------------
# reading


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def is_checkpoint_dir(path: str | Path) -> bool:
    """A checkpoint of a run: RUN/checkpoints/iter_N (complete)."""
    path = Path(path)
    return (path / MARKER).is_file() and (path / "state.json").is_file() and is_run_dir(path.parent.parent)


def run_of(path: str | Path | None) -> Path | None:
    """The run directory a model path belongs to: the run itself, one of its checkpoints, or an export inside it
    (RUN/final); None for "base" and for a directory outside any run."""
    if not path or str(path) == "base":
        return None
    p = Path(path).expanduser()
    if is_run_dir(p):
        return p
    if is_checkpoint_dir(p):
        return p.parent.parent
    if p.is_dir() and is_run_dir(p.parent):
        return p.parent
    return None


def run_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()):
    """The TrainConfig a run was trained with (its config.yaml, written by any mixgrpo version), with `key.sub=value`
    overrides (a moved run's files: model.args.path=/new/place)."""
    from mixgrpo.config import load_config

    return load_config(Path(run_dir) / CONFIG, overrides, saved=True)


def load_run(run_dir: str | Path, weights: str | Path | None = FINAL, device: str | None = None,
             dtype: str | None = None, resolution: tuple[int, int] | None = None, text_encoder: Any = None,
             args: dict[str, Any] | None = None, ema: bool = True, overrides: list[str] | tuple[str, ...] = ()
             ) -> FlowModel:
    """A run's model: its base (model.name and model.args of RUN/config.yaml with `overrides`, updated by `args`)
    with the fine-tuned weights of `weights` put in: "final" (RUN/final, an export), a checkpoint directory (its
    EMA weights when it has them and `ema`), another export directory, or None for the base alone. The base
    model's files must be the ones the run was trained with (`check_base_files`).
    device, dtype, resolution, text_encoder: as `build_model`. In eval mode, nothing trainable."""
    from mixgrpo.preflight import package_problems

    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    missing = package_problems(cfg, training=False)  # before the base model loads (minutes for FLUX.1)
    if missing:
        raise ConfigError(missing[0])
    model_args = {**cfg.model.args, **(args or {})}
    check_base_files(run_dir, model_args)
    source = None if weights is None else run_dir / FINAL if str(weights) == FINAL else Path(weights)
    checkpoint = source is not None and (source.parent.name == "checkpoints" or is_checkpoint_dir(source))
    # a checkpoint's weights are read before the base loads (minutes for FLUX): a run still training into run_dir
    # rotates old checkpoints away, and can then do so only during the read, which says so (CheckpointRotated)
    read = read_weights(source, ema) if checkpoint and not is_sharded_checkpoint(source) else None
    model = build_model(cfg.model.name, model_args, device, dtype, resolution, text_encoder)
    if checkpoint:
        if cfg.lora.rank > 0:
            from mixgrpo.models.lora import apply_lora

            apply_lora(model.denoiser, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                       target_modules=list(cfg.lora.target_modules))
        load_checkpoint_weights(model, source, ema=ema, weights=read)
    elif source is not None:
        load_export(model, source)
    return model.eval().requires_grad_(False)


def check_base_files(run_dir: Path, model_args: dict[str, Any]) -> None:
    """Raise ValueError when a file or directory of the run's model.args (its base model, embedding cache) is not
    here, or is not the one its latest checkpoint was trained with (`mixgrpo.runfiles`), naming the fix: a run
    that moved is told where its files now are with `--set model.args.path=PATH`."""
    from mixgrpo.checkpoint import read_state
    from mixgrpo.runfiles import identities, mismatches, missing

    data = {"model": {"args": model_args}}
    gone = missing(data)
    if gone:
        raise ConfigError(f"run {run_dir} names files that are not here (was it moved?): "
                          f"{', '.join(f'{field} = {path}' for field, path in gone)}; give their place now with "
                          + " ".join(f"--set {field}=PATH" for field, _ in gone))
    latest = latest_checkpoint(run_dir)
    recorded = read_state(latest).get("files", {}) if latest is not None else {}
    differ = mismatches({k: v for k, v in recorded.items() if k.startswith("model.")}, identities(data))
    if differ:
        raise ConfigError(f"run {run_dir} was trained with other files ({'; '.join(differ)}): point "
                          f"--set {differ[0].split(':', 1)[0]}=PATH at a copy of the files it was trained with")


def final_or_latest(run_dir: str | Path) -> Path:
    """RUN/final, or the latest complete checkpoint when the run has no final/ (it stopped before its end)."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL).is_dir():
        return run_dir / FINAL
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise ConfigError(f"run {run_dir} has no final/ and {describe_checkpoints(run_dir)}: it has no fine-tuned "
                          f"model yet; wait for its first checkpoint (run.checkpoint_every)")
    return latest


def _weight_files(directory: Path) -> list[Path]:
    from mixgrpo.models.lora import WEIGHTS_PATTERN

    diffusers = sorted(directory.glob(WEIGHTS_PATTERN.format(suffix="*")))
    return diffusers or [f for f in (directory / "model.safetensors",) if f.is_file()]


def load_export(model: FlowModel, directory: str | Path) -> FlowModel:
    """Put an export (LoRA, diffusers transformer directory, or an adapter's own model.safetensors) into
    `model.denoiser`; every weight must match by name and shape."""
    from safetensors.torch import load_file

    from mixgrpo.models.lora import LORA_WEIGHTS_NAME, load_lora

    from safetensors import SafetensorError

    directory = Path(directory)
    lora = (directory / LORA_WEIGHTS_NAME).is_file()
    files = [directory / LORA_WEIGHTS_NAME] if lora else _weight_files(directory)
    if not files:
        raise ConfigError(f"{directory} holds no exported model (no {LORA_WEIGHTS_NAME}, no "
                          f"diffusion_pytorch_model*.safetensors, no model.safetensors): export a run's checkpoint "
                          f"with mixgrpo export --run and the run directory")
    try:
        if lora:
            load_lora(model.denoiser, directory)
            return model
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(str(f)))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"cannot load model weights from {directory} ({type(e).__name__}: {e}): the files are "
                          f"corrupted or incomplete; write them again with mixgrpo export --run and the run directory, "
                          f"to a new --out directory") from e
    _load_matching(model.denoiser, state, str(directory))
    return model


def _load_matching(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                   strict: bool = True) -> None:
    """module.load_state_dict(state) after a check that names the first mismatches in one line.
    strict=False: `state` may cover only part of the module (trainable weights of a checkpoint)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state)) if strict else []
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]!r})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes)) if v]
        raise ConfigError(f"the weights in {source} do not fit the model ({', '.join(parts)}): they are from another "
                          f"model or size; use the run directory they belong to")
    module.load_state_dict(state, strict=strict)


def load_checkpoint_weights(model: FlowModel, checkpoint: str | Path, ema: bool = True,
                            weights: dict[str, torch.Tensor] | None = None) -> FlowModel:
    """Put a checkpoint's trainable weights (EMA weights when it has them and `ema`) into `model`, which must
    have the run's trainable layout (the LoRA adapter added for a LoRA run). Full and sharded checkpoints,
    written under any world size, are read by one process. weights: those of a full checkpoint, already read
    (`mixgrpo.checkpoint.read_weights`)."""
    checkpoint = Path(checkpoint)
    params = dict(model.named_parameters())
    if is_sharded_checkpoint(checkpoint):
        names = _checkpoint_names(model)
        key = "ema" if ema and _dcp_has(checkpoint, "ema") else "model"
        state = {key: {n: params[n].detach() for n in names}}  # loaded in place (DCP reshards to one process)
        try:
            dcp_load(state, checkpoint)
        except Exception as e:  # noqa: BLE001  (DCP raises many kinds for a mismatching checkpoint)
            raise CheckpointError(f"sharded checkpoint {checkpoint} does not fit the run's model "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return model
    if weights is None:
        weights = read_weights(checkpoint, ema)
    missing = [n for n in _checkpoint_names(model) if n not in weights]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} lacks {len(missing)} weights of the run's model (e.g. "
                              f"{missing[0]!r}): it is from another model configuration")
    _load_matching(model, weights, str(checkpoint), strict=False)
    return model


def _checkpoint_names(model: FlowModel) -> list[str]:
    """The parameter names a checkpoint holds: the LoRA weights of a LoRA model, else the denoiser's."""
    from mixgrpo.models.lora import has_lora

    lora = has_lora(model.denoiser)
    denoiser = {id(p) for p in model.denoiser.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in denoiser and (not lora or ".lora_" in n)]


def _dcp_has(checkpoint: Path, key: str) -> bool:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(checkpoint / "dcp")).read_metadata()
    return any(k.startswith(f"{key}.") for k in metadata.state_dict_metadata)
