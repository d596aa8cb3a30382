"""The GRPO run every new base model must pass on its tiny pipeline (tests/test_models_*.py): one MixGRPO iteration
through the trainer, full or LoRA, and the comparison of its final/ with the stock diffusers pipeline.

`grpo_run` trains and checks what an iteration must show (the on-policy ratio is 1, gradients flow, the trained
weights moved and nothing else did); `our_samples` samples the run's result as `mixgrpo sample` does (the run's base
with final/ put in, an ODE plan), so a test can hand the same noise and sigmas to the stock pipeline with the export
put in by diffusers' own loaders (`with_final`) and compare.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixgrpo.config import build_config
from mixgrpo.export import load_run
from mixgrpo.models import MODELS
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from mixgrpo.rundir import read_metrics
from mixgrpo.train import train

STEPS = 4  # the plan of the run and of the comparison


def grpo_run(out: Path, name: str, args: dict, lora: int, guidance_scale: float, **over) -> Path:
    """One MixGRPO iteration (2 prompts x 2 images, window of 1 step at the start) of `name` with `args`; returns the
    run directory after checking the metrics and which weights changed."""
    base = MODELS.get(name)(**args)
    prompts = out.parent / f"{out.name}_prompts.txt"
    prompts.write_text("a red cube on a table\ntwo blue spheres\na green cone\n")
    cfg = build_config({"algorithm": "mixgrpo", "sampler": {"num_steps": STEPS, "window": {"size": 1}}, "model": {"name": name, "args": args}, "rewards": [{"name": "toy_rewards:brightness"}], "rollout": {"prompts": str(prompts), "guidance_scale": guidance_scale, "prompts_per_iteration": 2, "group_size": 2}, "run": {"iterations": 1, "out_dir": str(out)}, "update": {"steps_per_epoch": 1, "micro_batch_size": 4}, "optim": {"lr": 1.0e-2}, "loss": {"clip_range": 0.2}, "eval": {"num_prompts": 0}, "lora": {"rank": lora, "alpha": 2 * lora, **({"target_modules": over.pop("targets")} if "targets" in over
                                                     else {})}, **over})
    run = train(cfg, progress=False)
    (record,) = read_metrics(run)
    assert record["onpolicy_ratio_error"] < 1e-4 and record["grad_norm"] > 0
    tuned = load_run(run)
    before = dict(base.named_parameters())
    moved = {n for n, p in tuned.named_parameters()  # a LoRA-wrapped layer keeps its weight as .base_layer.weight
             if ".lora_" not in n and not torch.equal(p, before[n.replace(".base_layer", "")])}
    denoiser = {id(p) for p in tuned.denoiser.parameters()}
    denoiser = {n for n, p in tuned.named_parameters() if id(p) in denoiser}
    if lora:
        assert moved == set()  # the base stays as it is; only the adapter was trained
        assert any(".lora_B." in n and p.abs().max() > 0 for n, p in tuned.named_parameters())
    else:
        assert moved and moved <= denoiser  # only the denoiser moved: not the text encoder, VAE or another expert
    return run


@torch.no_grad()
def our_samples(run: Path, prompts: list[str], seeds: list[int], guidance_scale: float) -> torch.Tensor:
    """The run's final model sampled on the ODE plan of STEPS steps (shift 3), CFG against "" when guidance_scale
    > 1: latents [N, *latent_shape]."""
    model = load_run(run)
    uncond = model.encode_prompts([""] * len(prompts)) if guidance_scale > 1 else None
    return sample(model, ode_plan(STEPS, 3.0), model.encode_prompts(prompts), seeds, uncond, guidance_scale)


def noise(latent_shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """The rollout's initial noise for `seeds` (one generator each), [len(seeds), *latent_shape]."""
    return torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


def sigmas() -> list[float]:
    """The sigmas of `our_samples`' plan (sigma_0 .. sigma_{T-1}; the stock schedulers append 0)."""
    return [s.sigma for s in ode_plan(STEPS, 3.0).steps]


def with_final(pipe, run: Path, lora: int):
    """The stock pipeline `pipe` with the run's final/ put in by diffusers alone: `load_lora_weights` for a LoRA, the
    transformer's own class `from_pretrained` for a full fine-tune; returns `pipe`."""
    if lora:
        pipe.load_lora_weights(run / "final")
    else:
        pipe.transformer = type(pipe.transformer).from_pretrained(run / "final")
    return pipe
