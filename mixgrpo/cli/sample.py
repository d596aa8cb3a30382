"""`mixgrpo sample` (prompts in, images out; hybrid inference) and `mixgrpo eval` (models scored on a prompt set with
rewards, a markdown table with 95% confidence intervals). Their shared options: `mixgrpo.cli.sampling`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixgrpo.cli.sampling import add_sampling_args, check_sampling_args, model_loader, settings
from mixgrpo.errors import UsageError

DEFAULT_EVAL_REWARDS = ["verifier:score=strict", "verifier"]  # eval without a run or --reward: the shapes world's


def add_parsers(sub) -> None:
    p = sub.add_parser("sample", help="prompts in, images out (any plan, hybrid inference)", allow_abbrev=False)
    add_sampling_args(p)
    p.add_argument("--path", help="a run directory (its base model + final/), a checkpoint of a run "
                                  "(RUN/checkpoints/iter_N), or a model directory of --model")
    p.add_argument("--base-path", help="hybrid inference: the model for the last (1 - p_mix) of the steps: 'base' "
                                       "(the run's base model; without a run, --model's default) or a path")
    p.add_argument("--out", default="samples")
    p.set_defaults(func=run_sample)

    p = sub.add_parser("eval", help="score models on a prompt set with rewards; markdown table with 95%% CIs",
                       allow_abbrev=False)
    add_sampling_args(p)
    p.add_argument("models", nargs="+", help="LABEL=PATH entries (PATH: a run directory, a checkpoint, a model "
                                             "directory, or 'base': the run's base model), e.g. base=base "
                                             "tuned=runs/mixgrpo")
    p.add_argument("--reward", action="append",
                   help="reward NAME or NAME:key=value,key=value (repeatable; default: the run's rewards, else the "
                        "shapes world's verifier strict + dense); "
                        "for videos, frames=mean|min|max|median aggregates an image reward's frame scores; "
                        "server=URL scores it on a reward server (mixgrpo serve-rewards)")
    p.add_argument("--hybrid", help="also evaluate hybrid inference of this fine-tuned model with the base")
    p.add_argument("--save-images", action="store_true",
                   help="also write every image and a captioned grid per model to OUT/images/")
    p.add_argument("--out", default="eval")
    p.set_defaults(func=run_eval)


def run_sample(args: argparse.Namespace) -> None:
    from mixgrpo.evaluate import example_inputs, generate
    from mixgrpo.images import first_inputs

    check_sampling_args(args, {"--path": args.path, "--base-path": args.base_path})
    loader = model_loader(args, [args.path, args.base_path])
    s = settings(args, loader)
    model = loader.load(args.path, s.prompts, s.guidance)
    base = loader.load(args.base_path, s.prompts, s.guidance) if args.base_path else None  # hybrid: the last steps
    switch_at = round(args.p_mix * len(s.plan.steps)) if base is not None else None
    inputs = example_inputs(model, s.examples)
    images = generate(model, s.prompts, s.plan, s.num_images, s.seed, s.guidance, batch_size=args.batch_size,
                      switch_model=base, switch_at=switch_at, inputs=inputs)
    out = Path(args.out)
    grid = save_images(images, s.prompts, out, f".{args.video_format}",
                       None if inputs is None else first_inputs(inputs, tuple(images.shape[-2:])))
    (out / "prompts.txt").write_text("\n".join(s.prompts) + "\n", encoding="utf-8")
    what = "videos" if images.dim() == 6 else "images"
    print(f"wrote {images.shape[0] * images.shape[1]} {what} and {grid} to {out}"
          + (f" (hybrid: fine-tuned for steps 0-{switch_at - 1}, base after)" if base is not None else ""))


def run_eval(args: argparse.Namespace) -> None:
    from mixgrpo.cli.rewards import reward_spec
    from mixgrpo.evaluate import evaluate, example_inputs, write_report
    from mixgrpo.rewards.scoring import build_rewards

    entries, hybrid = _check_eval_args(args)
    loader = model_loader(args, [path for _, path in entries] + ([hybrid[1]] if hybrid else []))
    s = settings(args, loader)
    specs = s.rewards or [reward_spec(r) for r in args.reward or DEFAULT_EVAL_REWARDS]
    rewards = [(r.label, r.fn) for r in build_rewards(specs, servers=loader.cfg.scoring if loader.cfg else None)]
    out = Path(args.out)
    results = {}
    base = None
    for label, path in entries:
        model = loader.load(path, s.prompts, s.guidance)
        if label == "base" or path == "base":
            base = model
        results[label] = evaluate(model, s.prompts, rewards, s.plan, s.num_images, s.seed, s.guidance,
                                  batch_size=args.batch_size, desc=f"{label}: sampling",
                                  inputs=example_inputs(model, s.examples))
        print(f"{label}: " + ", ".join(f"{k} {v['mean']:.4f} ± {v['ci95']:.4f}"
                                        for k, v in results[label].summary().items()), flush=True)
    if hybrid is not None:  # base is among the entries (`_check_eval_args`)
        tuned = loader.load(hybrid[1], s.prompts, s.guidance)
        switch_at = round(args.p_mix * len(s.plan.steps))
        label = f"hybrid p_mix={args.p_mix}"
        results[label] = evaluate(tuned, s.prompts, rewards, s.plan, s.num_images, s.seed, s.guidance,
                                  switch_model=base, switch_at=switch_at, batch_size=args.batch_size,
                                  desc="hybrid: sampling", inputs=example_inputs(tuned, s.examples))
        print("hybrid: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in results[label].summary().items()), flush=True)
    report = write_report(results, out)
    if args.save_images:
        for i, (label, res) in enumerate(results.items()):
            save_images(res.images, res.prompts, out / "images" / f"{i:02d}_{_safe_name(label)}",
                        f".{args.video_format}", res.inputs)
    print(report.read_text())
    print(f"per-image scores: {out / 'scores.jsonl'}"
          + (f"; images and captioned grids: {out / 'images'}" if args.save_images else ""))


def _check_eval_args(args: argparse.Namespace) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    """(model entries, the --hybrid entry or None), checked with the sampling options before any model loads."""
    entries = _model_entries(args.models)
    hybrid = _model_entries([args.hybrid])[0] if args.hybrid else None
    if hybrid is not None and not any(label == "base" or path == "base" for label, path in entries):
        raise UsageError("--hybrid needs the base model among the models, labelled base (e.g. base=base, or "
                         "base=PATH): the hybrid runs the fine-tuned model's first steps and the base's last")
    paths = {"--hybrid": args.hybrid, **{f"model entry {label}={path}": path for label, path in entries}}
    check_sampling_args(args, paths)
    return entries, hybrid


def _model_entries(specs: list[str]) -> list[tuple[str, str]]:
    """`mixgrpo eval` LABEL=PATH entries -> [(label, path)] (a bare PATH is its own label); every label once."""
    entries: dict[str, str] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label = path = spec
        if not label or not path:
            raise UsageError(f"model entry {spec!r} has an empty {'path' if label else 'label'} (an unset shell "
                             f"variable?): give LABEL=PATH, e.g. tuned=runs/mixgrpo or base=base")
        if label in entries:
            raise UsageError(f"model label {label!r} is given twice ({entries[label]!r} and {path!r}): give each "
                             f"model its own label")
        entries[label] = path
    return list(entries.items())


def save_images(images, prompts: list[str], out: Path, video: str = ".gif", inputs=None) -> str:
    """images [N, n, 3, H, W] (or videos [N, n, F, 3, H, W]): OUT/NNNN_JJ.png (or `video`: .gif, .mp4) per sample and
    a grid captioned with the prompts; returns the grid's file name. inputs [N, 3, H, W] (an editing model's): each
    prompt's row of the grid starts with its input image, captioned "input"."""
    import torch

    from mixgrpo.images import is_video, media_name, save_grid, save_media

    out.mkdir(parents=True, exist_ok=True)
    for i in range(images.shape[0]):
        for j in range(images.shape[1]):
            save_media(images[i, j], out / media_name(f"{i:04d}_{j:02d}", images[i, j], batched=False, video=video))
    n = images.shape[1]
    grid = media_name("grid", images.flatten(0, 1), video=video)
    cells, captions = images, [[p] * n for p in prompts]
    if inputs is not None and not is_video(images.flatten(0, 1)):
        cells = torch.cat([inputs[:, None].to(images.dtype), images], dim=1)  # [N, 1 + n, 3, H, W]
        captions = [["input", *c] for c in captions]
    per_row = cells.shape[1]
    save_grid(cells.flatten(0, 1), out / grid, nrow=per_row if n > 1 else 8,
              scale=max(1, 128 // images.shape[-1]), captions=[c for row in captions for c in row])
    return grid


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
