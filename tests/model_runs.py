"""The GRPO run every new base model must pass on its tiny pipeline (tests/test_models_*.py): one MixGRPO (or
DiffusionNFT) iteration through the trainer, full or LoRA, and the comparison of its final/ with the stock diffusers
pipeline. An editing / image-to-video model trains on examples with input images (`inputs`: their size).

`grpo_run` trains and checks what an iteration must show (the on-policy ratio is 1, gradients flow, the trained
weights moved and nothing else did); `our_samples` samples the run's result as `mixgrpo sample` does (the run's base
with final/ put in, an ODE plan), so a test can hand the same noise and sigmas to the stock pipeline with the export
put in by diffusers' own loaders (`with_final`) and compare.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gaussian_run import merged

from mixgrpo.config import build_config
from mixgrpo.export import load_run
from mixgrpo.models import MODELS
from mixgrpo.plan import ode_plan
from mixgrpo.rollout import sample
from mixgrpo.rundir import read_metrics
from mixgrpo.train import train

STEPS = 4  # the plan of the run and of the comparison


PROMPTS = ["a red cube on a table", "two blue spheres", "a green cone"]


def example_file(directory: Path, size: tuple[int, int]) -> Path:
    """PROMPTS with one random input image each (PNG files of `size` (H, W), seeded), as a JSONL example file."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, prompt in enumerate(PROMPTS):
        pixels = torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(directory / f"input_{i}.png")
        lines.append(json.dumps({"prompt": prompt, "images": [f"input_{i}.png"]}))
    (directory / "examples.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "examples.jsonl"


def inputs_of(run: Path, n: int, size: tuple[int, int]) -> list[tuple[torch.Tensor, ...]]:
    """The first n input images of `grpo_run`'s examples as the engine reads them ([3, H, W] in [0, 1] at size)."""
    from mixgrpo.images import load_input
    from mixgrpo.prompts import read_examples

    examples = read_examples(str(run.parent / f"{run.name}_examples" / "examples.jsonl"))[:n]
    return [tuple(load_input(path, size) for path in e.images) for e in examples]


def grpo_run(out: Path, name: str, args: dict, lora: int, guidance_scale: float,
             inputs: tuple[int, int] | None = None, objective: str = "grpo", reward: str = "toy_rewards:brightness",
             **over) -> Path:
    """One MixGRPO iteration (2 prompts x 2 images, window of 1 step at the start; objective "diffusion_nft": one
    DiffusionNFT iteration on ODE rollouts) of `name` with `args`; inputs: the examples' input image size (H, W) for
    an editing / image-to-video model. Returns the run directory after checking the metrics and which weights
    changed."""
    base = MODELS.get(name)(**args)
    if inputs is None:
        prompts = out.parent / f"{out.name}_prompts.txt"
        prompts.write_text("\n".join(PROMPTS) + "\n")
    else:
        prompts = example_file(out.parent / f"{out.name}_examples", inputs)
    algorithm = {"algorithm": "mixgrpo", "sampler": {"num_steps": STEPS, "window": {"size": 1}}}
    if objective == "diffusion_nft":
        algorithm = {"algorithm": "ode", "objective": "diffusion_nft", "sampler": {"num_steps": STEPS}}
    targets = {"target_modules": over.pop("targets")} if "targets" in over else {}
    cfg = build_config(merged({
        **algorithm, "model": {"name": name, "args": args}, "rewards": [{"name": reward}],
        "rollout": {"prompts": str(prompts), "guidance_scale": guidance_scale, "prompts_per_iteration": 2,
                    "group_size": 2, "shared_noise": objective != "diffusion_nft"},
        "update": {"steps_per_epoch": 1, "micro_batch_size": 4}, "optim": {"lr": 1.0e-2},
        "loss": {"clip_range": 0.2}, "eval": {"num_prompts": 0}, "run": {"iterations": 1, "out_dir": str(out)},
        "lora": {"rank": lora, "alpha": 2 * lora, **targets}}, over))
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
def our_samples(run: Path, prompts: list[str], seeds: list[int], guidance_scale: float,
                images: list[tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """The run's final model sampled on the ODE plan of STEPS steps (shift 3), CFG against "" (with the same input
    images) when guidance_scale > 1: latents [N, *latent_shape]."""
    from mixgrpo.models.base import encode_examples

    model = load_run(run)
    uncond = encode_examples(model, [""] * len(prompts), images) if guidance_scale > 1 else None
    return sample(model, ode_plan(STEPS, 3.0), encode_examples(model, prompts, images), seeds, uncond,
                  guidance_scale)


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
