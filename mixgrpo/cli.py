"""The `mixgrpo` command: train, pretrain, sample, eval, preprocess, bench.

    mixgrpo train --config configs/mixgrpo.yaml [key.sub=value ...] [--resume]
    torchrun --nproc_per_node 8 -m mixgrpo train --config configs/flux_mixgrpo.yaml

Errors in the user's input print one line naming the problem and the fix, and exit with status 2
(`--debug` shows the traceback instead). A run stopped by SIGTERM/SIGINT exits 128 + the signal number after
writing its checkpoint (see docs/reliability.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

# Nothing is ever fetched from a model hub: models and rewards load from local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mixgrpo.yaml"


class UsageError(ValueError):
    """Bad command-line input."""


def _train(args: argparse.Namespace) -> None:
    from mixgrpo.config import load_config
    from mixgrpo.trainer import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out_dir={args.out}")
    config = args.config
    if config is None and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        config = str(Path(args.out) / "config.yaml")
    cfg = load_config(config or _default_config(), overrides)
    train(cfg, resume=args.resume, progress=not args.quiet)
    from mixgrpo import dist

    dist.shutdown()


def _default_config() -> str:
    if DEFAULT_CONFIG.is_file():
        return str(DEFAULT_CONFIG)
    from importlib.resources import files

    return str(files("mixgrpo") / "configs" / "mixgrpo.yaml")


def _resolve_model(name: str, path: str | None):
    """A model from a registered name and optional path; a run directory resolves to its final model."""
    from mixgrpo.config import read_yaml
    from mixgrpo.models import MODELS

    args = {}
    if path:
        p = Path(path)
        if (p / "config.yaml").is_file() and (p / "final").is_dir():  # a run directory
            run_cfg = read_yaml(p / "config.yaml")
            name = run_cfg.get("model", {}).get("name", name)
            args = dict(run_cfg.get("model", {}).get("args", {}))
            p = p / "final"
        elif not p.exists():
            raise UsageError(f"model path {path!r} does not exist: give a model directory or a run directory")
        args["path"] = str(p)
    from safetensors import SafetensorError

    factory = MODELS.get(name)
    try:
        return factory(**args).eval()
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
        if not path:
            raise
        raise UsageError(f"cannot load model {name!r} from {path!r} ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         f"the files are corrupted or from another model or size; pass the matching --model, "
                         f"or the run directory itself") from e


def _sampling_plan(args: argparse.Namespace):
    from mixgrpo.evaluate import ode_plan
    from mixgrpo.plan import ALGORITHMS, build_plan

    if args.plan == "ode":
        return ode_plan(args.steps, args.shift)
    if args.plan not in ALGORITHMS:
        raise UsageError(f"--plan {args.plan!r} is unknown: use 'ode' or one of {sorted(ALGORITHMS)}")
    import dataclasses

    cfg = dataclasses.replace(ALGORITHMS[args.plan], num_steps=args.steps, shift=args.shift)
    return build_plan(cfg, iteration=args.iteration, seed=args.seed)


def _prompts_from(args: argparse.Namespace) -> list[str]:
    from mixgrpo.prompts import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _sample(args: argparse.Namespace) -> None:
    from mixgrpo.evaluate import generate
    from mixgrpo.images import save_grid, to_pil

    model = _resolve_model(args.model, args.path)
    base = None
    if args.base_path:  # "base" = the registered default model (e.g. the shipped tiny base)
        base = _resolve_model(args.model, None if args.base_path == "base" else args.base_path)
    plan = _sampling_plan(args)
    switch_at = round(args.p_mix * len(plan.steps)) if base is not None else None
    prompts = _prompts_from(args)
    images = generate(model, prompts, plan, args.num_images, args.seed, args.guidance,
                      switch_model=base, switch_at=switch_at)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, prompt in enumerate(prompts):
        for j in range(images.shape[1]):
            to_pil(images[i, j]).save(out / f"{i:04d}_{j:02d}.png")
    save_grid(images.flatten(0, 1), out / "grid.png", nrow=args.num_images if args.num_images > 1 else 8,
              scale=max(1, 128 // images.shape[-1]))
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    print(f"wrote {images.shape[0] * images.shape[1]} images and grid.png to {out}"
          + (f" (hybrid: fine-tuned for steps 0-{switch_at - 1}, base after)" if base is not None else ""))


def _eval(args: argparse.Namespace) -> None:
    from mixgrpo.evaluate import evaluate, write_report
    from mixgrpo.trainer import build_rewards

    import mixgrpo.rewards  # noqa: F401

    specs = [_reward_spec(r) for r in args.reward or ["verifier:score=strict", "verifier"]]
    rewards = [(label, fn) for label, _, fn in build_rewards(specs)]
    prompts = _prompts_from(args)
    plan = _sampling_plan(args)
    results = {}
    base = None
    for label, path in _model_entries(args.models):
        model = _resolve_model(args.model, None if path == "base" else path)
        if label == "base" or path == "base":
            base = model
        results[label] = evaluate(model, prompts, rewards, plan, args.num_images, args.seed, args.guidance)
        print(f"{label}: " + ", ".join(f"{k} {v['mean']:.4f} ± {v['ci95']:.4f}"
                                        for k, v in results[label].summary().items()), flush=True)
    if args.hybrid:
        if base is None:
            raise UsageError("--hybrid needs a model labelled base (e.g. base=base) among the models")
        path = _model_entries([args.hybrid])[0][1]
        tuned = _resolve_model(args.model, path)
        switch_at = round(args.p_mix * len(plan.steps))
        results[f"hybrid p_mix={args.p_mix}"] = evaluate(tuned, prompts, rewards, plan, args.num_images, args.seed,
                                                          args.guidance, switch_model=base, switch_at=switch_at)
        print("hybrid: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in
                                      results[f"hybrid p_mix={args.p_mix}"].summary().items()), flush=True)
    report = write_report(results, args.out)
    print(report.read_text())
    print(f"per-image scores: {Path(args.out) / 'scores.jsonl'}")


def _reward_spec(text: str):
    """'NAME' or 'NAME:key=value,key=value' -> RewardConfig (values parsed as YAML)."""
    import yaml

    from mixgrpo.config import RewardConfig, from_dict
    from mixgrpo.rewards import REWARDS

    name, rest = text, ""
    head, sep, tail = text.rpartition(":")
    if sep and "=" in tail and "=" not in head:
        name, rest = head, tail
    elif sep and head in REWARDS.names():
        raise UsageError(f"--reward {text!r}: {tail!r} is not key=value (e.g. {head}:score=strict)")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--reward {text!r}: {item!r} is not key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    return from_dict(RewardConfig, {"name": name, "args": kwargs}, "reward")


def _pretrain(args: argparse.Namespace) -> None:
    from mixgrpo import pretrain

    pretrain.main(args.rest)


def _preprocess(args: argparse.Namespace) -> None:
    from mixgrpo import preprocess

    preprocess.main(args.rest)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="registered base-model name (default: tiny)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file (.txt/.jsonl/.csv) or world:train / world:heldout")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--plan", default="ode", help="'ode' (default) or an algorithm preset, e.g. mixgrpo_flash")
    p.add_argument("--iteration", type=int, default=0, help="training iteration that places the plan's window")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--p-mix", type=float, default=0.8,
                   help="hybrid inference: fraction of the steps run by the fine-tuned model (default 0.8)")


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Values argparse's types let through but sampling cannot use; checked before any model loads."""
    checks = [(args.num_images >= 1, "--num-images", args.num_images, "an integer >= 1"),
              (args.steps >= 1, "--steps", args.steps, "an integer >= 1"),
              (args.shift > 0, "--shift", args.shift, "a positive number"),
              (args.iteration >= 0, "--iteration", args.iteration, "an integer >= 0"),
              (args.guidance >= 1, "--guidance", args.guidance, "a number >= 1 (1 = no guidance)"),
              (0 <= args.p_mix <= 1, "--p-mix", args.p_mix,
               "a fraction in [0, 1] (the share of the steps the fine-tuned model runs)")]
    for ok, flag, value, want in checks:
        if not ok:  # `not`: NaN fails every comparison
            raise UsageError(f"{flag} = {value} is invalid: use {want}")
    for flag in ("path", "base_path", "hybrid"):
        if getattr(args, flag, None) == "":
            raise UsageError(f"--{flag.replace('_', '-')} is empty (an unset shell variable?): give a model "
                             f"directory or a run directory")
    if args.command == "eval":  # before the first model is evaluated
        _model_entries(args.models)
        if args.hybrid:
            _model_entries([args.hybrid])


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixgrpo", description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="GRPO fine-tuning (the main job)", allow_abbrev=False)
    p.add_argument("--config", help="YAML recipe (default: configs/mixgrpo.yaml)")
    p.add_argument("--out", help="run directory (same as out_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. iterations=10 sampler.window.size=2")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="prompts in, images out (any plan, hybrid inference)", allow_abbrev=False)
    _add_sampling_args(p)
    p.add_argument("--path", help="model directory, or a run directory (uses its final model)")
    p.add_argument("--base-path", help="hybrid inference: the base model for the last (1 - p_mix) of the steps: "
                                       "a model directory, or 'base' for the registered default (the shipped base)")
    p.add_argument("--out", default="samples")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="score models on a prompt set with rewards; markdown table with 95%% CIs",
                       allow_abbrev=False)
    _add_sampling_args(p)
    p.add_argument("models", nargs="+", help="LABEL=PATH entries (PATH = model or run directory; 'base' = the "
                                             "registered default), e.g. base=base tuned=runs/mixgrpo")
    p.add_argument("--reward", action="append",
                   help="reward NAME or NAME:key=value,key=value (repeatable; default: verifier strict + dense)")
    p.add_argument("--hybrid", help="also evaluate hybrid inference of this fine-tuned model with the base")
    p.add_argument("--out", default="eval")
    p.set_defaults(func=_eval)

    for name, fn, text in (("pretrain", _pretrain, "pre-train the tiny base model on the shapes world"),
                           ("preprocess", _preprocess, "encode a prompt file into an embedding cache")):
        p = sub.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=fn)
    return parser


_PASSTHROUGH = ("pretrain", "preprocess")  # subcommands with their own argument parsers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # argparse.REMAINDER does not capture "--option" arguments of a subcommand: hand them over explicitly.
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    rest: list[str] = []
    if command is not None and argv[command] in _PASSTHROUGH:
        argv, rest = argv[:command + 1], argv[command + 1:]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting positionals at the first option: take key=value overrides placed after
    # options too ("train --config C --out D lr=1e-4"); anything else is still an error.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in _PASSTHROUGH:
        args.rest = rest
    try:
        if args.command in ("sample", "eval"):
            _check_sampling_args(args)
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (user-facing boundary: one line, no traceback)
        from mixgrpo.trainer import TrainingStopped

        if isinstance(e, TrainingStopped):  # preempted: checkpointed and resumable, but not finished
            print(f"stopped by {e}", file=sys.stderr)
            return 128 + e.signum
        if args.debug or not _is_user_error(e):
            raise
        print(f"error: {_error_line(e, args.command)}", file=sys.stderr)
        return 2
    return 0


def _error_line(e: Exception, command: str) -> str:
    """The one line printed for a user error."""
    if not isinstance(e, OSError):
        return str(e)
    from mixgrpo.fileio import os_error_message

    line = os_error_message(e)
    if command == "train" and e.errno in (errno.ENOSPC, errno.EDQUOT):  # the run is resumable
        line += ", then continue the run with --resume (its last checkpoint is intact)"
    return line


def _is_user_error(e: BaseException) -> bool:
    """Errors caused by input the user can fix: shown as one line. Anything else is a bug: traceback."""
    from mixgrpo.checkpoint import CheckpointError
    from mixgrpo.rewards import RewardError
    from mixgrpo.tracking import TrackingError
    from mixgrpo.trainer import TrainingError

    return isinstance(e, (ValueError, OSError, CheckpointError, RewardError, TrainingError, TrackingError))


if __name__ == "__main__":
    sys.exit(main())
