"""The options `mixgrpo sample` and `mixgrpo eval` share: what they sample with and where, their checks, and what
they take from a run when the command does not say (`Settings`).

With a run among the model paths, what the command does not give follows the run's own held-out evaluation: its
eval prompts (the first eval.num_prompts), images per prompt, evaluation seed, sampling steps, shift and guidance,
and (eval) its rewards; so `mixgrpo eval RUN` redraws the images the run evaluated. A real model samples on its
pipeline's own default grid (`mixgrpo.pipeline_grid`) unless --shift or a --plan other than ode asks for the
engine's static grid.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mixgrpo.cli.common import add_set_arg, check_out_dir
from mixgrpo.errors import UsageError

if TYPE_CHECKING:
    from mixgrpo.config import RewardConfig
    from mixgrpo.prompts import Example
    from mixgrpo.loading import ModelLoader
    from mixgrpo.plan import Plan


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="registered base-model name for model directories and 'base' "
                                                   "(default: tiny; a run directory knows its own model)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--image", action="append", help="an input image of every --prompt, for an editing or "
                                                    "image-to-video model (repeatable: several inputs of one example); "
                                                    "an example file (--prompts) names its own")
    p.add_argument("--prompts", help="prompt file (.txt/.jsonl/.csv) or world:train / world:heldout (default: a run's "
                                     "held-out prompts, the first eval.num_prompts of its eval.prompts)")
    p.add_argument("--num-images", type=int, help="images per prompt (default: the run's eval.images_per_prompt, "
                                                  "else 1)")
    p.add_argument("--steps", type=int, help="sampling steps (default: a real model's pipeline default, e.g. 28 for "
                                             "FLUX.1; the tiny model: the run's sampler.num_steps, else 25)")
    p.add_argument("--shift", type=float, help="static sigma-grid shift: replaces a real model's own pipeline grid "
                                               "(default: that grid; the tiny model: the run's sampler.shift, else 3)")
    p.add_argument("--plan", default="ode", help="'ode' (default) or an algorithm preset, e.g. mixgrpo_flash")
    p.add_argument("--iteration", type=int, default=0, help="training iteration that places the plan's window")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale, 1 = off (default: the run's "
                                                  "evaluation guidance, else 1)")
    p.add_argument("--seed", type=int, help="noise seed (default: the run's evaluation seed, seed + 1, so that a "
                                            "run's own evaluation is redrawn; else 0)")
    p.add_argument("--p-mix", type=float, default=0.8,
                   help="hybrid inference: fraction of the steps run by the fine-tuned model (default 0.8)")
    p.add_argument("--device", help="where the models run (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="weights dtype: bfloat16, float16 or float32 (default: the run's model.args.dtype)")
    p.add_argument("--resolution", help="SIZE or HEIGHTxWIDTH in pixels (default: the run's model.args height and "
                                        "width; models that take a size)")
    p.add_argument("--batch-size", type=int, default=16, help="images per sampling batch (memory only; default 16)")
    add_set_arg(p)
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif",
                   help="files of a video model's samples: gif (default; Pillow) or mp4 (needs imageio and "
                        "imageio-ffmpeg: mixgrpo's video extra)")


def check_sampling_args(args: argparse.Namespace, paths: dict[str, str | None]) -> None:
    """Everything of a sample / eval command that can be checked before any model loads: the values argparse's
    types let through (ranges, NaN and inf), the device, the model paths (what -> path), the output directory.
    The run's own sampling settings are checked when they are taken (`settings`)."""
    from math import inf

    from mixgrpo.dtypes import DTYPES
    from mixgrpo.errors import check_values
    from mixgrpo.plan import MAX_STEPS
    from mixgrpo.preflight import device_problems

    unset = {k: getattr(args, k) is None for k in ("steps", "shift", "guidance", "num_images", "seed")}  # the run's
    check_values([
        (unset["num_images"] or args.num_images >= 1, "--num-images", args.num_images, "an integer >= 1"),
        (unset["steps"] or 1 <= args.steps <= MAX_STEPS, "--steps", args.steps,
         f"an integer in [1, {MAX_STEPS}] (flow models sample well in 10 to 100 steps)"),
        (unset["shift"] or 0 < args.shift < inf, "--shift", args.shift, "a finite number > 0 (1 = no shift)"),
        (args.iteration >= 0, "--iteration", args.iteration, "an integer >= 0"),
        (unset["guidance"] or 1 <= args.guidance < inf, "--guidance", args.guidance,
         "a finite number >= 1 (1 = no guidance)"),
        (unset["seed"] or args.seed >= 0, "--seed", args.seed, "an integer >= 0"),
        (args.dtype is None or args.dtype in DTYPES, "--dtype", args.dtype, f"one of {sorted(DTYPES)}"),
        (args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1"),
        (0 <= args.p_mix <= 1, "--p-mix", args.p_mix,
         "a fraction in [0, 1] (the share of the steps the fine-tuned model runs)")])
    for problem in device_problems("--device", args.device):
        raise UsageError(problem)
    for image in args.image or []:
        if not Path(image).expanduser().is_file():
            raise UsageError(f"--image {image!r} does not exist: give the path of an input image (PNG, JPEG, WebP)")
    if args.image and not args.prompt:
        raise UsageError("--image is the input of the --prompt examples: give --prompt TEXT with it (an example file "
                         "given by --prompts names its own images)")
    from mixgrpo.images import mp4_problem

    if args.video_format == "mp4" and mp4_problem():  # no sampled video lost to a missing writer
        raise UsageError(f"--video-format mp4: {mp4_problem()}")
    for what, path in paths.items():
        _check_model_path(what, path)
    check_out_dir(Path(args.out))


def _check_model_path(what: str, path: str | None) -> None:
    """A model path of a sample / eval command, before any model loads: given, existing, and, for a run
    directory, holding a fine-tuned model (final/ or a complete checkpoint)."""
    from mixgrpo.export import final_or_latest, run_of

    if path is None or path == "base":
        return
    if not path.strip():
        raise UsageError(f"{what} is empty (an unset shell variable?): give a model directory or a run directory")
    if not Path(path).exists():
        raise UsageError(f"{what}: model path {path!r} does not exist: give a model directory or a run directory")
    run = run_of(path)
    if run is not None and Path(path).expanduser() == run:
        final_or_latest(run)  # a run that has no model yet says so now, not after the other models were sampled


def model_loader(args: argparse.Namespace, paths: list[str | None]) -> ModelLoader:
    """The `mixgrpo.loading.ModelLoader` of a sample / eval command's model paths and options."""
    from mixgrpo.loading import ModelLoader

    loader = ModelLoader(paths, model=args.model, overrides=args.set or (), device=args.device, dtype=args.dtype,
                         resolution=_parse_resolution(args.resolution))
    if args.set and loader.run is None:
        raise UsageError("--set overrides the config.yaml of a run, and no run directory is among the models: drop "
                         "--set, or give the run directory (or one of its checkpoints) as a model")
    return loader


def _parse_resolution(text: str | None) -> tuple[int, int] | None:
    """'512' -> (512, 512); '720x1280' -> (720, 1280) (height x width)."""
    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        values = [int(v) for v in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or min(values) < 1:
        raise UsageError(f"--resolution {text!r}: give SIZE or HEIGHTxWIDTH in pixels, e.g. 512 or 720x1280")
    return (values[0], values[-1])


@dataclass(frozen=True)
class Settings:
    """What a sample / eval command samples: the command's options, else its run's (module docstring). examples:
    the prompts with their input images (an editing or image-to-video model; `example_inputs` loads them)."""

    prompts: list[str]
    examples: list[Example]
    num_images: int
    seed: int
    guidance: float
    plan: Plan
    rewards: list[RewardConfig] | None  # eval without --reward: the run's; else None


def settings(args: argparse.Namespace, loader: ModelLoader) -> Settings:
    """The command's settings, the run's where the command gives none (named in one printed line)."""
    cfg = loader.cfg
    grid = _pipeline_grid(args, loader)
    from mixgrpo.seeding import held_out_seed

    static = {} if grid else {"steps": cfg.sampler.num_steps if cfg else 25, "shift": cfg.sampler.shift if cfg else 3.0}
    defaults = {**static, "guidance": cfg.eval_guidance if cfg else 1.0,
                "num_images": cfg.eval.images_per_prompt if cfg else 1, "seed": held_out_seed(cfg.run.seed) if cfg else 0}
    taken = [f"{k.replace('_', ' ')} {defaults[k]:g}" for k in defaults if getattr(args, k) is None]
    value = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in defaults}
    if grid is not None:
        print(f"sampling: {grid.describe()} (--steps N: the same schedule at N steps; --shift S: the static "
              f"shift-S grid instead)", flush=True)
    examples = _examples(args, cfg, taken)
    rewards = None
    if cfg is not None and getattr(args, "reward", "given") is None:
        rewards = cfg.rewards
        taken.append(f"rewards {', '.join(r.name for r in cfg.rewards)}")
    if cfg is not None and taken:
        print(f"settings of run {loader.run}: {'; '.join(taken)} (override with --prompt/--prompts, --num-images, "
              f"--seed, --steps, --shift, --guidance{', --reward' if hasattr(args, 'reward') else ''})", flush=True)
    plan = grid.plan() if grid is not None else _static_plan(args, value["steps"], value["shift"], value["seed"])
    return Settings([e.prompt for e in examples], examples, value["num_images"], value["seed"], value["guidance"], plan,
                    rewards)


def _pipeline_grid(args: argparse.Namespace, loader: ModelLoader):
    """The base model's own pipeline grid (`mixgrpo.pipeline_grid`), unless --shift or a --plan other than
    ode asks for this engine's static grid; None for a model without a pipeline directory (tiny)."""
    if args.shift is not None or args.plan != "ode":
        return None
    from mixgrpo.pipeline_grid import grid_of

    if loader.cfg is not None:
        return grid_of(loader.cfg.model.name, loader.cfg.model.args, loader.resolution, args.steps)
    path = next((p for p in loader.paths if p and p != "base" and Path(p).is_dir()), None)
    return grid_of(args.model, {"path": path} if path else {}, loader.resolution, args.steps)


def _examples(args: argparse.Namespace, cfg, taken: list[str]) -> list[Example]:
    """--prompt (with --image) / --prompts, else the run's held-out examples (as its evaluation reads them)."""
    from mixgrpo.prompts import Example, read_examples

    if args.prompt or args.prompts or cfg is None:
        images = tuple(str(Path(i).expanduser().resolve()) for i in args.image or [])
        examples = [Example(p, images) for p in args.prompt or []]
        if args.prompts:
            examples += read_examples(args.prompts)
        if not examples:
            raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
        if len({bool(e.images) for e in examples}) > 1:
            raise UsageError("some prompts have input images and some none (--prompt without --image beside an "
                             "example file, or the reverse): give every prompt its images, or none")
        return examples
    try:
        prompts = read_examples(cfg.eval.prompts)[: cfg.eval.num_prompts or None]
    except ValueError as e:
        raise UsageError(f"the run's eval.prompts: {e}; or give --prompts FILE / --prompt TEXT (a run that moved: "
                         f"--set eval.prompts=PATH)") from None
    taken.insert(0, f"the first {len(prompts)} prompts of {cfg.eval.prompts}")
    return prompts


def _static_plan(args: argparse.Namespace, steps: int, shift: float, seed: int) -> Plan:
    """The preset --plan on the static grid of `steps` and `shift`."""
    import dataclasses

    from mixgrpo.plan import ALGORITHMS, build_plan

    if args.plan not in ALGORITHMS:
        raise UsageError(f"--plan {args.plan!r} is unknown: use 'ode' or one of {sorted(ALGORITHMS)}")
    try:
        cfg = dataclasses.replace(ALGORITHMS[args.plan], num_steps=steps, shift=shift)
    except ValueError as e:  # the preset's own checks (a window larger than --steps, ...)
        raise UsageError(f"--plan {args.plan} with --steps {steps} --shift {shift:g}: {e}") from None
    return build_plan(cfg, iteration=args.iteration, seed=seed)
