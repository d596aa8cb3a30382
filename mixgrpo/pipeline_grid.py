"""The stock diffusers pipelines' own sampling grids, as plans of this engine: what `mixgrpo sample`, `mixgrpo eval`
and a run's held-out evaluation use on a real model, so that an untouched base draws what its pipeline draws and
evaluation numbers are comparable with anyone else's. Training keeps its configured grid (`sampler.num_steps`,
`sampler.shift`).

The grid is computed the way each pipeline's `__call__` computes it, with the directory's own scheduler (its
scheduler_config.json): the pipeline's default `num_inference_steps`; FLUX.1, Qwen-Image and FLUX.2 hand the
scheduler sigmas = linspace(1, 1/N, N) and a resolution-dependent shift mu (FLUX.1, Qwen-Image: `calculate_shift`
of the image token count; FLUX.2: `compute_empirical_mu` of the token count and N); SD3 and Wan ask the scheduler for
N steps (SD3.5: a static shift 3). The solver: FlowMatchEulerDiscreteScheduler is the engine's Euler step, exactly;
Wan's UniPCMultistepScheduler (a predictor-corrector of order 2) is not in the engine, and its nearest,
DPM-Solver++(2M) on the same sigmas, is used instead: close, not equal (`PipelineGrid.exact`).
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixgrpo.models.base import ModelSpec
from mixgrpo.plan import Plan, Step

EULER = ("FlowMatchEulerDiscreteScheduler",)
"""Schedulers whose step is the engine's Euler step."""


@dataclass(frozen=True)
class PipelineGrid:
    """A pipeline's default sampling: sigmas [N + 1] from 1 down to 0, and the engine's step for them."""

    pipeline: str  # the diffusers pipeline class, e.g. "QwenImagePipeline"
    scheduler: str  # its scheduler class
    sigmas: tuple[float, ...]
    mu: float | None  # the resolution-dependent shift, where the pipeline computes one

    @property
    def exact(self) -> bool:
        """Whether the engine runs the pipeline's own solver (else its nearest: DPM-Solver++(2M))."""
        return self.scheduler in EULER

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    def plan(self) -> Plan:
        """A deterministic plan on these sigmas: Euler steps, or DPM-Solver++(2M) for a solver the engine lacks."""
        kind = "ode" if self.exact else "dpm"
        steps = tuple(Step(float(a), float(b), kind, False) for a, b in zip(self.sigmas[:-1], self.sigmas[1:]))
        return Plan(steps, None, "flow_grpo", 0.0, 2, "midpoint")

    def describe(self) -> str:
        shift = f", resolution-dependent shift mu = {self.mu:.3f}" if self.mu is not None else ""
        solver = ("Euler, as its scheduler" if self.exact else
                  f"DPM-Solver++(2M), the engine's nearest to its {self.scheduler} (close, not equal)")
        return f"{self.pipeline}'s default grid: {self.num_steps} steps{shift}; {solver}"


def pipeline_grid(path: str | Path, spec: ModelSpec, height: int, width: int,
                  num_steps: int | None = None) -> PipelineGrid | None:
    """The default sampling grid of the pipeline in directory `path`, of the model `spec` describes, at `height` x
    `width` pixels (num_steps: the pipeline's default unless given); None when `path` is not a diffusers pipeline
    this module can read."""
    import diffusers

    from mixgrpo.models._diffusers import latent_grid

    root = Path(path)
    if not (root / "model_index.json").is_file():
        return None
    index = json.loads((root / "model_index.json").read_text())
    pipe_cls = getattr(diffusers, str(index.get("_class_name")), None)
    sched_name = (index.get("scheduler") or [None, None])[1]
    sched_cls = getattr(diffusers, str(sched_name), None)
    if pipe_cls is None or sched_cls is None or not (root / "scheduler" / "scheduler_config.json").is_file():
        return None  # not a pipeline this module can read: the engine's static grid
    steps = num_steps or inspect.signature(pipe_cls.__call__).parameters["num_inference_steps"].default
    scheduler = sched_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    config = scheduler.config
    transformer = json.loads((root / "transformer" / "config.json").read_text())
    spatial, patch, _ = latent_grid(transformer, json.loads((root / "vae" / "config.json").read_text()),
                                    spec.token_patch)
    tokens = (height // (spatial * patch)) * (width // (spatial * patch))  # the pipeline's image_seq_len
    module = sys.modules[pipe_cls.__module__]
    mu = None
    if hasattr(module, "compute_empirical_mu"):
        mu = module.compute_empirical_mu(image_seq_len=tokens, num_steps=steps)
    elif config.get("use_dynamic_shifting") and hasattr(module, "calculate_shift"):
        mu = module.calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                    config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                    config.get("max_shift", 1.15))
    kwargs = {} if mu is None else {"mu": mu}
    if spec.pipeline_sigmas and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), **kwargs)
    else:
        scheduler.set_timesteps(steps, **kwargs)
    return PipelineGrid(pipe_cls.__name__, sched_cls.__name__, tuple(float(s) for s in scheduler.sigmas), mu)


def model_args(name: str, args: dict) -> dict:
    """model.args over the registered factory's defaults (height, width, dtype, ... as the model will be built)."""
    from mixgrpo.models import MODELS

    try:
        defaults = {k: p.default for k, p in inspect.signature(MODELS.get(name)).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):  # a user's callable without a signature
        defaults = {}
    return {**defaults, **args}


def grid_of(name: str, args: dict, resolution: tuple[int, int] | None = None,
            num_steps: int | None = None) -> PipelineGrid | None:
    """The default grid of base model `name` built from model.args `args` (its pipeline directory, its height and
    width unless `resolution` overrides them); None for a model without a pipeline directory (tiny, Gaussian)."""
    full = model_args(name, args)
    if not full.get("path"):
        return None
    height, width = resolution or (full.get("height"), full.get("width"))
    if height is None or width is None:
        return None
    from mixgrpo.models import MODELS

    return pipeline_grid(full["path"], MODELS.spec(name), height, width, num_steps)
