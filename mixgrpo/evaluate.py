"""Evaluation: sample N images per prompt with a deterministic ODE plan and score them with rewards.

Used by `mixgrpo eval` and by the trainer's before/after evaluation. Seeds depend only on (seed, prompt
index, image index), so base, fine-tuned and hybrid models are compared on the same initial noise.

An image-conditioned model is evaluated on examples: `inputs` gives each prompt's input images (as
`FlowModel.encode_prompts` takes them); its unconditional rows are the empty prompt with the same images, and
the rewards that compare a result with its input (`takes_inputs`) get the first input image of each.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from mixgrpo.errors import UserError
from mixgrpo.fileio import writing
from mixgrpo.errors import ConfigError
from mixgrpo.images import first_inputs, load_inputs
from mixgrpo.models.base import FlowModel, Images, cond_to, encode_examples, uncond_rows
from mixgrpo.plan import Plan
from mixgrpo.progress import bar
from mixgrpo.rollout import sample
from mixgrpo.seeding import image_seeds

RewardFns = Sequence[tuple[str, Callable]]


class NonFiniteImages(UserError):
    """A model sampled images with NaN or inf values: nothing is written or scored (they would be black)."""


@dataclass
class EvalResult:
    prompts: list[str]  # N prompts
    images: torch.Tensor  # [N, n, 3, H, W]
    scores: dict[str, torch.Tensor]  # reward name -> [N, n]
    inputs: torch.Tensor | None = None  # [N, 3, H, W]: each prompt's first input image (image-conditioned models)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per reward: mean, 95% confidence half-width over images, mean of per-prompt best (best-of-n)."""
        out = {}
        for name, s in self.scores.items():
            flat = s.flatten().double()
            n = flat.numel()
            half = 1.96 * flat.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
            out[name] = {"mean": flat.mean().item(), "ci95": half, "best_of_n": s.max(1).values.double().mean().item(),
                         "n": n}
        return out


@torch.no_grad()
def generate(model: FlowModel, prompts: Sequence[str], plan: Plan, images_per_prompt: int = 1, seed: int = 0,
             guidance_scale: float = 1.0, batch_size: int = 64, switch_model: FlowModel | None = None,
             switch_at: int | None = None, desc: str = "sampling",
             stop: Callable[[], bool] | None = None, inputs: Images | None = None) -> torch.Tensor | None:
    """[N, n, 3, H, W] images in [0, 1]: image j of prompt i starts from the noise of `image_seeds(seed, [(i, j)])`.
    Batches of `batch_size` images (memory only: an image does not depend on its batch); a progress bar `desc`.
    A batch with a NaN or inf latent or pixel raises NonFiniteImages at once, as the trainer's rollout check does
    (`mixgrpo.train.control.require_finite_images`): saved, such an image is black; scored, a wrong number.
    stop: checked before every batch; None is returned as soon as it is true (a training run told to stop).
    inputs: each prompt's input images (an image-conditioned model), else None."""
    device = next(model.parameters()).device
    jobs = [(i, j) for i in range(len(prompts)) for j in range(images_per_prompt)]
    guided = guidance_scale != 1.0
    uncond_row = cond_to(model.encode_prompts([""]), device) if guided and inputs is None else None
    out = []
    with bar(total=len(jobs), desc=desc, unit="image") as progress:
        for start in range(0, len(jobs), batch_size):
            if stop is not None and stop():
                return None
            chunk = jobs[start:start + batch_size]
            images_in = None if inputs is None else [inputs[i] for i, _ in chunk]
            cond = cond_to(encode_examples(model, [prompts[i] for i, _ in chunk], images_in), device)
            uncond = cond_to(uncond_rows(model, len(chunk), images_in, uncond_row), device) if guided else None
            seeds = image_seeds(seed, chunk)
            latents = sample(model, plan, cond, seeds, uncond, guidance_scale, switch_model, switch_at)
            images = model.decode(latents).float().cpu()
            bad = int(((~torch.isfinite(latents)).flatten(1).any(1).cpu() | (~torch.isfinite(images)).flatten(1).any(1))
                      .sum())
            if bad:
                raise NonFiniteImages(
                    f"{desc}: {bad} of the {len(chunk)} images of a batch came out NaN or inf (the model's outputs "
                    f"overflowed: weights that diverged in training, or sampling settings beyond the model's range); "
                    f"nothing was written: sample an earlier checkpoint of the run (RUN/checkpoints/iter_N), or "
                    f"change --guidance / --shift")
            out.append(images)
            progress.update(len(chunk))
    images = torch.cat(out)
    return images.view(len(prompts), images_per_prompt, *images.shape[1:])


def example_inputs(model: FlowModel, examples: Sequence) -> Images | None:
    """The input images of `examples` (`mixgrpo.prompts.Example`) at the model's size (`load_inputs`), or None for
    examples without; ConfigError when they do not fit the model (`image_inputs`): an image-conditioned model given
    none, or a text-to-image model given some."""
    wanted, given = getattr(model, "image_inputs", 0), any(e.images for e in examples)
    if wanted and not given:
        raise ConfigError(f"this model edits an input image ({wanted} per example at most) but the prompts have none: "
                          f"give --image PATH with --prompt, or an example file with images (--prompts, "
                          f"docs/prompts.md)")
    if given and not wanted:
        raise ConfigError("the prompts have input images but this model is text-to-image: drop --image (or use a "
                          "prompt file without images), or sample an editing model (e.g. --model tiny_edit)")
    return load_inputs(examples, model.image_size()) if given else None


def score_images(rewards: RewardFns, images: torch.Tensor, prompts: Sequence[str],
                 inputs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """images [N, n, 3, H, W] -> reward name -> [N, n] scores; inputs [N, 3, H, W]: each prompt's first input image,
    for the rewards that take them."""
    n_prompts, n = images.shape[:2]
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat = images.flatten(0, 1)
    flat_inputs = None if inputs is None else inputs.repeat_interleave(n, dim=0)

    def score(fn: Callable) -> torch.Tensor:  # a reward that compares with the inputs gets them (rewards.base)
        takes = flat_inputs is not None and getattr(fn, "takes_inputs", False)
        return torch.as_tensor(fn(flat, flat_prompts, inputs=flat_inputs) if takes else fn(flat, flat_prompts))

    return {name: score(fn).float().view(n_prompts, n) for name, fn in bar(iterable=rewards, desc="scoring",
                                                                            unit="reward")}


def evaluate(model: FlowModel, prompts: Sequence[str], rewards: RewardFns, plan: Plan, images_per_prompt: int = 1,
             seed: int = 0, guidance_scale: float = 1.0, switch_model: FlowModel | None = None,
             switch_at: int | None = None, batch_size: int = 64, desc: str = "evaluation",
             stop: Callable[[], bool] | None = None, inputs: Images | None = None) -> EvalResult | None:
    """Images of `generate` and their scores; None when `stop` became true (checked before every batch and
    before the scoring). inputs: each prompt's input images (an image-conditioned model)."""
    images = generate(model, prompts, plan, images_per_prompt, seed, guidance_scale, batch_size=batch_size,
                      switch_model=switch_model, switch_at=switch_at, desc=desc, stop=stop, inputs=inputs)
    if images is None or (stop is not None and stop()):
        return None
    first = None if inputs is None else first_inputs(inputs, tuple(images.shape[-2:]))
    return EvalResult(list(prompts), images, score_images(rewards, images, prompts, first), first)


def save_sample_grid(res: EvalResult, path: str | Path, count: int = 64) -> None:
    """The grid of the first image of each of the first `count` prompts, captioned with its prompt; for an
    image-conditioned model each result follows its input image (captioned "input"), so the grid reads input,
    instruction, result."""
    from mixgrpo.images import is_video, save_grid

    samples, captions = res.images[:count, 0], list(res.prompts[:count])
    if res.inputs is not None and not is_video(samples):
        pairs = torch.stack([res.inputs[: len(samples)].to(samples.dtype), samples], dim=1)  # [n, 2, 3, H, W]
        samples, captions = pairs.flatten(0, 1), [c for p in captions for c in ("input", p)]
    save_grid(samples, path, nrow=8, scale=2, captions=captions)


def write_report(results: dict[str, EvalResult], out_dir: str | Path) -> Path:
    """Per-image JSON lines and a markdown table of means with 95% confidence intervals, one row per model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with writing(out_dir / "scores.jsonl"), open(out_dir / "scores.jsonl", "w", encoding="utf-8") as f:
        for label, res in results.items():
            for i, prompt in enumerate(res.prompts):
                for j in range(res.images.shape[1]):
                    row = {"model": label, "prompt": prompt, "image": j,
                           **{k: float(v[i, j]) for k, v in res.scores.items()}}
                    f.write(json.dumps(row) + "\n")
    names = list(next(iter(results.values())).scores)
    lines = ["| model | " + " | ".join(f"{n} (mean ± 95% CI)" for n in names) + " | " +
             " | ".join(f"{n} best-of-n" for n in names) + " |",
             "|---|" + "---|" * (2 * len(names))]
    for label, res in results.items():
        s = res.summary()
        lines.append(f"| {label} | " + " | ".join(f"{s[n]['mean']:.4f} ± {s[n]['ci95']:.4f}" for n in names) + " | " +
                     " | ".join(f"{s[n]['best_of_n']:.4f}" for n in names) + " |")
    n_img = next(iter(results.values())).images.shape[:2]
    table = "\n".join(lines) + f"\n\n{n_img[0]} prompts x {n_img[1]} images per model.\n"
    with writing(out_dir / "report.md"):  # a full disk names the file, as sample and export do
        (out_dir / "report.md").write_text(table, encoding="utf-8")
    return out_dir / "report.md"
