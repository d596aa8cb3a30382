"""The `mixgrpo` command: train, sample, eval, export, serve-rewards, preprocess, pretrain, config-doc, launch.

    mixgrpo train --config configs/mixgrpo.yaml [key.sub=value ...] [--resume]   (or --config mixgrpo)
    mixgrpo launch --nproc_per_node 8 train --config configs/flux_mixgrpo.yaml   (torchrun, mixgrpo's exit statuses)

Errors in the user's input print one line naming the problem and the fix, and exit with status 2
(`--debug` shows the traceback instead). A run stopped by SIGTERM/SIGINT exits 128 + the signal number after
writing its checkpoint (see docs/reliability.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path

from mixgrpo.errors import ConfigError, UserError

# Nothing is ever fetched from a model hub: models and rewards load from local paths.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_RECIPE = "mixgrpo"
DEFAULT_EVAL_REWARDS = ["verifier:score=strict", "verifier"]  # eval without a run or --reward: the shapes world's


class UsageError(ConfigError):
    """Bad command-line input."""


def _train(args: argparse.Namespace) -> None:
    from mixgrpo.config import load_config, recipe_path
    from mixgrpo.rundir import CONFIG
    from mixgrpo.train import train

    overrides = list(args.overrides)
    if args.out is not None:
        if not args.out.strip():  # else the recipe's out_dir would take the run, or --resume continue another
            raise UsageError("--out is empty (an unset shell variable?): give the run directory")
        overrides.append(f"run.out_dir={args.out}")
    config = args.config
    own = config is None and args.resume and args.out and (Path(args.out) / CONFIG).is_file()
    if own:
        config = str(Path(args.out) / CONFIG)
    cfg = load_config(recipe_path(config or DEFAULT_RECIPE), overrides, saved=bool(own))
    args.run_dir = Path(cfg.run.out_dir)  # for the message of an error that stops the run (`_error_line`)
    if own:  # a run copied from another machine or directory: name the files it lacks here, and the fix
        from mixgrpo.config import to_dict
        from mixgrpo.runfiles import missing

        gone = missing(to_dict(cfg))
        if gone:
            raise UsageError(f"run {args.out} names files that are not here (was it moved?): "
                             f"{', '.join(f'{field} = {path}' for field, path in gone)}; give their place now: "
                             f"mixgrpo train --out {args.out} --resume "
                             + " ".join(f"{field}=PATH" for field, _ in gone))
    if args.dry_run:  # what the run needs and what it would take, without a model or a run directory
        from mixgrpo import memory
        from mixgrpo.preflight import check_run

        check_run(cfg)
        if memory.report(cfg, int(os.environ.get("WORLD_SIZE", "1"))) is None:
            print(f"no memory estimate for model {cfg.model.name!r} (only for a local diffusers pipeline directory)")
        print(f"dry run: the pre-flight found nothing; the run would write {cfg.run.out_dir}")
        return
    from mixgrpo import dist
    from mixgrpo.preflight import PreflightError
    from mixgrpo.train import TrainingStopped

    try:
        train(cfg, resume=args.resume, progress=not args.quiet)
    except (PreflightError, TrainingStopped):
        # Every rank stops here together (rank 0's findings and the stop signal are agreed), so leave the process
        # group cleanly: a gloo group torn down at interpreter exit aborts the worker now and then (status 134,
        # "terminate called without an active exception") instead of exiting 2 / 143. An error of one rank alone
        # skips this: its peers may be inside a collective, and the launcher stops them.
        dist.shutdown()
        raise
    dist.shutdown()


def _run_of(path: str | None) -> Path | None:
    """The run directory a model path belongs to: the run itself, one of its checkpoints, or an export inside it
    (RUN/final); None for a plain model directory."""
    from mixgrpo.export import is_checkpoint_dir, is_run_dir

    if not path or path == "base":
        return None
    p = Path(path)
    if is_run_dir(p):
        return p
    if is_checkpoint_dir(p):
        return p.parent.parent
    if p.is_dir() and is_run_dir(p.parent):
        return p.parent
    return None


class ModelLoader:
    """Loads the models a sample / eval command names: a run directory (its base from config.yaml + final/, or
    the latest checkpoint when the run did not finish), a checkpoint (RUN/checkpoints/iter_N), an export inside a
    run (RUN/final), a model directory of --model, or "base": the base model of the run among the paths (else
    --model's registered default). --device, --dtype and --resolution apply to every model.

    With a run among the paths, what the command does not give follows the run's own held-out evaluation: its
    eval prompts (the first eval.num_prompts), images per prompt, evaluation seed, sampling steps, shift and
    guidance, and (eval) its rewards; so `mixgrpo eval RUN` redraws the images the run evaluated."""

    def __init__(self, args: argparse.Namespace, paths: list[str | None]):
        self.args = args
        self.run = next((r for r in map(_run_of, paths) if r is not None), None)
        self.device = args.device or _default_device()
        self.resolution = _parse_resolution(args.resolution)
        self._text_encoders: dict[Path, object] = {}  # run -> text encoder, shared by its models (hybrid)
        cfg = None
        if self.run is not None:
            from mixgrpo.export import run_config

            cfg = run_config(self.run, args.set or ())
        self.cfg = cfg
        from mixgrpo.seeding import held_out_seed

        self.grid = self._pipeline_grid(paths)
        grid = {} if self.grid else {"steps": cfg.sampler.num_steps if cfg else 25,
                                     "shift": cfg.sampler.shift if cfg else 3.0}
        defaults = {**grid, "guidance": cfg.eval_guidance if cfg else 1.0,
                    "num_images": cfg.eval.images_per_prompt if cfg else 1,
                    "seed": held_out_seed(cfg.run.seed) if cfg else 0}
        taken = [f"{k.replace('_', ' ')} {defaults[k]:g}" for k in defaults if getattr(args, k) is None]
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if self.grid is not None:
            args.steps = self.grid.num_steps
            print(f"sampling: {self.grid.describe()} (--steps N: the same schedule at N steps; --shift S: the static "
                  f"shift-S grid instead)", flush=True)
        self.prompts = self._prompts(taken)
        self.reward_specs = None  # eval: RewardConfigs of the run when --reward is not given
        self.scoring = cfg.scoring if cfg is not None else None  # how the run reached its servers
        if cfg is not None and getattr(args, "reward", "given") is None:
            self.reward_specs = cfg.rewards
            taken.append(f"rewards {', '.join(r.name for r in cfg.rewards)}")
        if cfg is not None and taken:
            print(f"settings of run {self.run}: {'; '.join(taken)} (override with --prompt/--prompts, --num-images, "
                  f"--seed, --steps, --shift, --guidance{', --reward' if hasattr(args, 'reward') else ''})",
                  flush=True)

    def _pipeline_grid(self, paths: list[str | None]):
        """The base model's own pipeline grid (`mixgrpo.pipeline_grid`), unless --shift or a --plan other than
        ode asks for this engine's static grid; None for a model without a pipeline directory (tiny)."""
        args = self.args
        if args.shift is not None or args.plan != "ode":
            return None
        from mixgrpo.pipeline_grid import grid_of

        if self.cfg is not None:
            return grid_of(self.cfg.model.name, self.cfg.model.args, self.resolution, args.steps)
        path = next((p for p in paths if p and p != "base" and Path(p).is_dir()), None)
        return grid_of(args.model, {"path": path} if path else {}, self.resolution, args.steps)

    def _prompts(self, taken: list[str]) -> list[str]:
        """--prompt / --prompts, else the run's held-out prompts (as its evaluation reads them)."""
        args, cfg = self.args, self.cfg
        if args.prompt or args.prompts or cfg is None:
            return _prompts_from(args)
        from mixgrpo.prompts import read_prompts

        try:
            prompts = read_prompts(cfg.eval.prompts)[: cfg.eval.num_prompts or None]
        except ValueError as e:
            raise UsageError(f"the run's eval.prompts: {e}; or give --prompts FILE / --prompt TEXT (a run that moved: "
                             f"--set eval.prompts=PATH)") from None
        taken.insert(0, f"the first {len(prompts)} prompts of {cfg.eval.prompts}")
        return prompts

    def load(self, path: str | None):
        """The model of `path` (see the class docstring)."""
        from mixgrpo.export import final_or_latest
        from mixgrpo.models.base import build_model

        if path in (None, "base"):
            if self.run is not None:
                return self._load_run(self.run, None)
            try:
                return build_model(self.args.model, {}, self.device, self.args.dtype, self.resolution)
            except ValueError as e:
                if "path" not in str(e):
                    raise
                raise UsageError(f"'base' is the base model of a run, and no run directory was given; model "
                                 f"{self.args.model!r} has no built-in base: give its pipeline directory instead of "
                                 f"'base', or a run directory") from None
        p = Path(path)
        run = _run_of(path)
        if run is not None and p != run:
            return self._load_run(run, p)
        if run is not None:
            from mixgrpo.checkpoint import CheckpointRotated

            for attempt in range(3):  # a run still training rotates its old checkpoints away, maybe during the read
                weights = final_or_latest(run)
                try:
                    return self._load_run(run, weights)
                except CheckpointRotated:
                    if attempt == 2:
                        raise
                    print(f"{weights.name} was rotated away by the run training into {run} while it was read: "
                          f"loading the newest checkpoint instead", flush=True)
        if not p.exists():
            raise UsageError(f"model path {path!r} does not exist: give a model directory or a run directory")
        from safetensors import SafetensorError

        try:
            return build_model(self.args.model, {"path": str(p)}, self.device, self.args.dtype, self.resolution)
        except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
            raise UsageError(f"cannot load model {self.args.model!r} from {path!r} ({type(e).__name__}: "
                             f"{str(e).splitlines()[0]}): the files are corrupted or from another model or size; "
                             f"pass the matching --model, or the run directory itself") from e

    def _load_run(self, run: Path, weights: Path | None):
        from mixgrpo.export import load_run, run_config

        if weights is not None and weights.name != "final":
            print(f"{run}: loading the weights of {weights}", flush=True)
        overrides = {}
        cache = run_config(run, self.args.set or ()).model.args.get("embedding_cache")
        if cache and not Path(cache).expanduser().is_dir():  # a run that moved without its cache
            print(f"the run's embedding cache {cache} is not here: loading the text encoders instead (--set "
                  f"model.args.embedding_cache=PATH uses the cache where it is now)", flush=True)
            overrides["embedding_cache"] = None
        elif cache:  # the cache serves the run's prompts; other prompts need the model's own text encoders
            from mixgrpo.models.text import EmbeddingCache

            wanted = set(self.prompts) | ({""} if self.args.guidance != 1.0 else set())
            missing = [p for p in wanted if p not in EmbeddingCache(cache)]
            if missing:
                print(f"{len(missing)} prompts are not in the run's embedding cache {cache}: loading the text "
                      f"encoders instead", flush=True)
                overrides["embedding_cache"] = None
        model = load_run(run, weights, self.device, self.args.dtype, self.resolution,
                         text_encoder=self._text_encoders.get(run), args=overrides, overrides=self.args.set or ())
        self._text_encoders.setdefault(run, model.text_encoder if hasattr(model, "text_encoder") else None)
        return model


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def _sampling_plan(args: argparse.Namespace, loader: ModelLoader):
    """The plan of sample / eval: the base model's pipeline grid (`ModelLoader.grid`), else the preset --plan on
    the static grid of --steps and --shift."""
    from mixgrpo.plan import ALGORITHMS, build_plan

    if loader.grid is not None:
        return loader.grid.plan()
    if args.plan not in ALGORITHMS:
        raise UsageError(f"--plan {args.plan!r} is unknown: use 'ode' or one of {sorted(ALGORITHMS)}")
    import dataclasses

    try:
        cfg = dataclasses.replace(ALGORITHMS[args.plan], num_steps=args.steps, shift=args.shift)
    except ValueError as e:  # the preset's own checks (a window larger than --steps, ...)
        raise UsageError(f"--plan {args.plan} with --steps {args.steps} --shift {args.shift:g}: {e}") from None
    return build_plan(cfg, iteration=args.iteration, seed=args.seed)


def _prompts_from(args: argparse.Namespace) -> list[str]:
    from mixgrpo.prompts import read_prompts

    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompts(args.prompts)
    if not prompts:
        raise UsageError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def _save_images(images, prompts: list[str], out: Path, video: str = ".gif") -> str:
    """images [N, n, 3, H, W] (or videos [N, n, F, 3, H, W]): OUT/NNNN_JJ.png (or `video`: .gif, .mp4) per sample and
    a grid captioned with the prompts; returns the grid's file name."""
    from mixgrpo.images import media_name, save_grid, save_media

    out.mkdir(parents=True, exist_ok=True)
    for i in range(images.shape[0]):
        for j in range(images.shape[1]):
            save_media(images[i, j], out / media_name(f"{i:04d}_{j:02d}", images[i, j], batched=False, video=video))
    n = images.shape[1]
    grid = media_name("grid", images.flatten(0, 1), video=video)
    save_grid(images.flatten(0, 1), out / grid, nrow=n if n > 1 else 8, scale=max(1, 128 // images.shape[-1]),
              captions=[p for p in prompts for _ in range(n)])
    return grid


def _sample(args: argparse.Namespace) -> None:
    from mixgrpo.evaluate import generate

    loader = ModelLoader(args, [args.path, args.base_path])
    prompts = loader.prompts
    plan = _sampling_plan(args, loader)
    model = loader.load(args.path)
    base = loader.load(args.base_path) if args.base_path else None  # hybrid: the base takes the last steps
    switch_at = round(args.p_mix * len(plan.steps)) if base is not None else None
    images = generate(model, prompts, plan, args.num_images, args.seed, args.guidance, batch_size=args.batch_size,
                      switch_model=base, switch_at=switch_at)
    out = Path(args.out)
    grid = _save_images(images, prompts, out, f".{args.video_format}")
    (out / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    what = "videos" if images.dim() == 6 else "images"
    print(f"wrote {images.shape[0] * images.shape[1]} {what} and {grid} to {out}"
          + (f" (hybrid: fine-tuned for steps 0-{switch_at - 1}, base after)" if base is not None else ""))


def _eval(args: argparse.Namespace) -> None:
    from mixgrpo.evaluate import evaluate, write_report
    from mixgrpo.rewards.scoring import build_rewards

    entries = _model_entries(args.models)
    hybrid = _model_entries([args.hybrid])[0] if args.hybrid else None
    loader = ModelLoader(args, [path for _, path in entries] + ([hybrid[1]] if hybrid else []))
    prompts = loader.prompts
    specs = loader.reward_specs or [_reward_spec(r) for r in args.reward or DEFAULT_EVAL_REWARDS]
    rewards = [(r.label, r.fn) for r in build_rewards(specs, servers=loader.scoring)]
    plan = _sampling_plan(args, loader)
    out = Path(args.out)
    results = {}
    base = None
    for label, path in entries:
        model = loader.load(path)
        if label == "base" or path == "base":
            base = model
        results[label] = evaluate(model, prompts, rewards, plan, args.num_images, args.seed, args.guidance,
                                  batch_size=args.batch_size, desc=f"{label}: sampling")
        print(f"{label}: " + ", ".join(f"{k} {v['mean']:.4f} ± {v['ci95']:.4f}"
                                        for k, v in results[label].summary().items()), flush=True)
    if hybrid is not None:  # base is among the entries (`_check_sampling_args`)
        tuned = loader.load(hybrid[1])
        switch_at = round(args.p_mix * len(plan.steps))
        label = f"hybrid p_mix={args.p_mix}"
        results[label] = evaluate(tuned, prompts, rewards, plan, args.num_images, args.seed, args.guidance,
                                  switch_model=base, switch_at=switch_at, batch_size=args.batch_size,
                                  desc="hybrid: sampling")
        print("hybrid: " + ", ".join(f"{k} {v['mean']:.4f}" for k, v in results[label].summary().items()), flush=True)
    report = write_report(results, out)
    if args.save_images:
        for i, (label, res) in enumerate(results.items()):
            _save_images(res.images, res.prompts, out / "images" / f"{i:02d}_{_safe_name(label)}",
                          f".{args.video_format}")
    print(report.read_text())
    print(f"per-image scores: {out / 'scores.jsonl'}"
          + (f"; images and captioned grids: {out / 'images'}" if args.save_images else ""))


def _compare(args: argparse.Namespace) -> int:
    """Each run against its recipe's reference (mixgrpo.reference): one line per run, one PNG; exit 1 when a run
    lies outside a band, 0 when every run lies inside or has no reference."""
    from mixgrpo.reference import describe, plot_comparison, read_run, reference_of, shipped_references

    runs = [read_run(path) for path in args.runs]
    refs = [reference_of(run) for run in runs]
    named = {ref.recipe for ref in refs if ref is not None}
    if len(named) > 1:
        raise UsageError(f"the runs follow different recipes ({', '.join(sorted(named))}): compare one recipe's "
                         f"runs at a time")
    outside = False
    for run, ref in zip(runs, refs):
        if ref is None:
            print(f"{run.path}: no reference: its config follows no shipped recipe up to seed, length, logging and "
                  f"precision (references: {', '.join(sorted(shipped_references()))})")
        elif not ref.seeds:
            print(f"{run.path}: the reference of {ref.recipe} has no figures yet ({ref.note or ref.path})")
        else:
            line = describe(run, ref)
            outside = outside or "OUTSIDE" in line
            print(f"{run.path}: {line}")
    ref = next((r for r in refs if r is not None and r.seeds), None)
    plot_comparison(runs, ref, Path(args.out))
    print(f"plot: {args.out}")
    return 1 if outside else 0


def _reference(args: argparse.Namespace) -> None:
    """Write a recipe's reference file from its runs at several seeds."""
    from mixgrpo.reference import build_reference, references_dir

    ref = build_reference(args.runs, machine=args.machine, note=args.note)
    out = Path(args.out) if args.out else references_dir() / f"{ref.recipe}.json"
    ref.write(out)
    print(f"reference of {ref.recipe} ({len(ref.seeds)} seeds, {ref.precision}): {out}")


def _safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def _no_checkpoint_why(run: Path) -> str:
    from mixgrpo.checkpoint import describe_checkpoints

    state = describe_checkpoints(run)
    return "" if state == "no checkpoint" else f": it holds {state}"


def _export(args: argparse.Namespace) -> None:
    from mixgrpo.checkpoint import CheckpointRotated, latest_checkpoint
    from mixgrpo.export import export_model, load_run, run_config
    from mixgrpo.fileio import remove_dead_temporaries
    from mixgrpo.rundir import FINAL

    run, out = _check_export_args(args)
    out = out or run / FINAL
    overrides = args.set or ()
    # the weights are all that is read: neither the text encoders nor the embedding cache are needed here
    no_cache = {"embedding_cache": None} if run_config(run, overrides).model.args.get("embedding_cache") else None
    for attempt in range(3):  # the latest checkpoint of a run still training may be rotated away while it is read
        checkpoint = run / "checkpoints" / args.checkpoint if args.checkpoint else latest_checkpoint(run)
        if checkpoint is None:
            raise UsageError(f"{run} has no complete checkpoint to export{_no_checkpoint_why(run)}")
        try:
            model = load_run(run, checkpoint, device="cpu", dtype=None, text_encoder=_NoTextEncoder(),
                             ema=not args.no_ema, args=no_cache, overrides=overrides)
            break
        except CheckpointRotated:
            if args.checkpoint or attempt == 2:
                raise
            print(f"{checkpoint.name} was rotated away by the run training into {run} while it was read: exporting "
                  f"the newest checkpoint instead", flush=True)
    if out.exists():  # again: another export may have written it meanwhile
        raise UsageError(f"{out} already exists: pass --out DIR to write the export elsewhere")
    removed = remove_dead_temporaries(out)  # what a killed export of out left (a run sweeps its own likewise)
    if removed:
        print(f"note: removed what an interrupted export left: {', '.join(str(p) for p in removed)}", flush=True)
    export_model(model, out)
    print(f"exported {checkpoint} to {out}")


def _check_export_args(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(run, out) of an export, checked before any model loads: a run directory, a checkpoint of it named
    iter_N and complete, an --out that does not exist yet and can be created."""
    import re

    from mixgrpo.checkpoint import MARKER, complete_checkpoints
    from mixgrpo.export import is_run_dir
    from mixgrpo.rundir import FINAL

    for flag in ("run", "checkpoint", "out"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise UsageError(f"--{flag} is empty (an unset shell variable?): "
                             + {"run": "give the out_dir of a run", "checkpoint": "give iter_N, or leave it out "
                                "to export the newest", "out": "give the directory to write, or leave it out for "
                                "RUN/final"}[flag])
    run = Path(args.run)
    if not is_run_dir(run):
        raise UsageError(f"--run {args.run!r} is not a run directory (no config.yaml): give the out_dir of a run")
    if args.checkpoint:
        names = ", ".join(c.name for c in complete_checkpoints(run)) or "none"
        if not re.fullmatch(r"iter_\d+", args.checkpoint):
            raise UsageError(f"--checkpoint {args.checkpoint!r} is not a checkpoint name: give one of {run}'s "
                             f"complete checkpoints by name ({names})")
        checkpoint = run / "checkpoints" / args.checkpoint
        if not checkpoint.is_dir():
            raise UsageError(f"{run} has no checkpoint {args.checkpoint!r}; its complete checkpoints: {names}")
        if not (checkpoint / MARKER).is_file():
            raise UsageError(f"{checkpoint} is not a complete checkpoint (no {MARKER} marker): its save was "
                             f"interrupted, or its deletion is under way; export a complete one: {names}")
    out = Path(args.out) if args.out else None
    if (out or run / FINAL).exists():
        raise UsageError(f"{out or run / FINAL} already exists: pass --out DIR to write the export elsewhere")
    if out is not None:
        _check_out_dir(out, "--out")
    return run, out


class _NoTextEncoder:
    """Stands in for the text encoders when exporting: the weights are all that is read, so T5 & co. are
    never loaded."""

    def encode(self, prompts):
        raise RuntimeError("export needs no text encoder")


def _reward_spec(text: str):
    """'NAME' or 'NAME:key=value,key=value' -> RewardConfig (values parsed as YAML)."""
    import yaml

    from mixgrpo.config import RewardConfig, from_dict
    from mixgrpo.rewards import REWARDS

    name, rest = text, ""
    head, sep, tail = text.rpartition(":")
    # the arguments start at the first ':' followed by key= (a value may hold ':' too: device=cuda:1, server=URL)
    split = re.match(r"(.+?):([A-Za-z_]\w*=.*)", text, flags=re.S)
    if split is not None:
        name, rest = split.groups()
    elif sep and head in REWARDS.names():
        raise UsageError(f"--reward {text!r}: {tail!r} is not key=value (e.g. {head}:score=strict)")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--reward {text!r}: {item!r} is not key=value")
        kwargs[key.strip()] = yaml.safe_load(value)
    # frames= (videos: how frame scores aggregate) and server= (the reward server that scores it) are the reward's
    # own config fields, not factory arguments
    fields = {key: kwargs.pop(key) for key in ("frames", "server") if key in kwargs}
    return from_dict(RewardConfig, {"name": name, "args": kwargs, **fields}, "reward")


def _serve_rewards(args: argparse.Namespace) -> None:
    from mixgrpo.config import RewardConfig, from_dict, read_yaml
    from mixgrpo.rewards.remote import token_from
    from mixgrpo.rewards.server import require_serving_packages, serve

    require_serving_packages()
    specs = []
    if args.rewards:  # a YAML list of rewards, or a run's config (its rewards:); weight and server do not apply
        path = Path(args.rewards)
        if not path.is_file():
            raise UsageError(f"--rewards {args.rewards!r} does not exist: give a YAML file with a list of rewards "
                             f"(or a run's config)")
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.suffix in (".yaml", ".yml") else None
        entries = data if isinstance(data, list) else read_yaml(path).get("rewards")
        if not isinstance(entries, list):
            raise UsageError(f"--rewards {args.rewards!r} holds no list of rewards: give a list of {{name, args}} "
                             f"or a run's config with rewards:")
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise UsageError(f"--rewards {args.rewards!r}: entry {i} is {entry!r}, not a mapping {{name, args}}")
            entry = {k: v for k, v in entry.items() if k not in ("weight", "server")}
            specs.append(from_dict(RewardConfig, entry, f"rewards[{i}]"))
    specs += [_reward_spec(r) for r in args.reward or []]
    from math import inf

    from mixgrpo.errors import check_values

    check_values([(args.batch_size >= 1, "--batch-size", args.batch_size, "an integer >= 1"),
                  (0 <= args.port < 65536, "--port", args.port, "a port number in 0..65535"),
                  (0 < args.max_request_mb < inf, "--max-request-mb", args.max_request_mb, "a positive finite number")])
    serve(specs, args.host, args.port, args.batch_size, token_from(args.token_env or ""),
          int(args.max_request_mb * 2**20))


def _pretrain(args: argparse.Namespace) -> None:
    from mixgrpo import pretrain

    pretrain.main(args.rest)


def _preprocess(args: argparse.Namespace) -> None:
    from mixgrpo import preprocess

    preprocess.main(args.rest)


def _prompts(args: argparse.Namespace) -> None:
    from mixgrpo import prompt_sets

    prompt_sets.main(args.rest)


def _launch(args: argparse.Namespace) -> int:
    from mixgrpo import launch

    return launch.main(args.rest, [c for c in command_names() if c != "launch"])


def _config_doc(args: argparse.Namespace) -> None:
    from mixgrpo import configdoc

    code = configdoc.main(args.rest)
    if code:
        sys.exit(code)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="registered base-model name for model directories and 'base' "
                                                   "(default: tiny; a run directory knows its own model)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
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
    _add_set_arg(p)
    p.add_argument("--video-format", choices=["gif", "mp4"], default="gif",
                   help="files of a video model's samples: gif (default; Pillow) or mp4 (needs imageio and "
                        "imageio-ffmpeg: mixgrpo's video extra)")


def _add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field of the run's config.yaml for this command, as `train` takes them "
                        "(repeatable); e.g. --set model.args.path=/data/FLUX.1-dev for a run whose base model moved")


def _check_sampling_args(args: argparse.Namespace) -> None:
    """Everything of a sample / eval command that can be checked before any model loads: the values argparse's
    types let through (ranges, NaN and inf), the device, the model paths and entries, the output directory.
    The run's own sampling settings are checked when they are taken (`ModelLoader`)."""
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
    from mixgrpo.images import mp4_problem

    if args.video_format == "mp4" and mp4_problem():  # no sampled video lost to a missing writer
        raise UsageError(f"--video-format mp4: {mp4_problem()}")
    paths = {f"--{flag.replace('_', '-')}": getattr(args, flag, None) for flag in ("path", "base_path", "hybrid")}
    if args.command == "eval":  # before the first model is evaluated
        entries = _model_entries(args.models)
        if args.hybrid:
            _model_entries([args.hybrid])
            if not any(label == "base" or path == "base" for label, path in entries):
                raise UsageError("--hybrid needs the base model among the models, labelled base (e.g. base=base, or "
                                 "base=PATH): the hybrid runs the fine-tuned model's first steps and the base's last")
        paths.update({f"model entry {label}={path}": path for label, path in entries})
    for what, path in paths.items():
        _check_model_path(what, path)
    _check_out_dir(Path(args.out))


def _check_model_path(what: str, path: str | None) -> None:
    """A model path of a sample / eval command, before any model loads: given, existing, and, for a run
    directory, holding a fine-tuned model (final/ or a complete checkpoint)."""
    from mixgrpo.export import final_or_latest

    if path is None or path == "base":
        return
    if not path.strip():
        raise UsageError(f"{what} is empty (an unset shell variable?): give a model directory or a run directory")
    if not Path(path).exists():
        raise UsageError(f"{what}: model path {path!r} does not exist: give a model directory or a run directory")
    run = _run_of(path)
    if run is not None and Path(path) == run:
        final_or_latest(run)  # a run that has no model yet says so now, not after the other models were sampled


def _check_out_dir(out: Path, flag: str = "--out") -> None:
    """An output directory (sample --out, eval --out) that can be created: no file in the way, checked before
    the models load and sample, so that no sampled image is lost."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{flag} {str(out)!r}: {str(p)!r} is a file, not a directory: choose another {flag}")
            return


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

    p = sub.add_parser("train", help="RL fine-tuning: GRPO or a forward-process objective (the main job)",
                       allow_abbrev=False)
    p.add_argument("--config", help="a YAML file, or the name of a shipped recipe (configs/NAME.yaml: mixgrpo, "
                                    "flow_grpo, dance_grpo, ...); default: mixgrpo")
    p.add_argument("--out", help="run directory (same as run.out_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--dry-run", action="store_true", help="run the pre-flight and print the memory estimate, then "
                                                          "stop: no model loads, no run directory is written")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. run.iterations=10 sampler.window.size=2")
    p.set_defaults(func=_train)

    p = sub.add_parser("sample", help="prompts in, images out (any plan, hybrid inference)", allow_abbrev=False)
    _add_sampling_args(p)
    p.add_argument("--path", help="a run directory (its base model + final/), a checkpoint of a run "
                                  "(RUN/checkpoints/iter_N), or a model directory of --model")
    p.add_argument("--base-path", help="hybrid inference: the model for the last (1 - p_mix) of the steps: 'base' "
                                       "(the run's base model; without a run, --model's default) or a path")
    p.add_argument("--out", default="samples")
    p.set_defaults(func=_sample)

    p = sub.add_parser("eval", help="score models on a prompt set with rewards; markdown table with 95%% CIs",
                       allow_abbrev=False)
    _add_sampling_args(p)
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
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write a run's checkpoint as the final model (diffusers' formats)",
                       allow_abbrev=False)
    p.add_argument("--run", required=True, help="the run directory")
    p.add_argument("--checkpoint", help="iter_N under RUN/checkpoints (default: the latest complete one); full "
                                        "or sharded, written under any world size")
    p.add_argument("--out", help="directory to write (default: RUN/final, when it does not exist yet)")
    p.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    _add_set_arg(p)
    p.set_defaults(func=_export)

    p = sub.add_parser("compare", help="runs against their recipe's reference curves: inside the band or not, "
                                       "and one PNG", allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare.png", help="the PNG to write (default: compare.png)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("reference", help="write a recipe's reference curves from its runs at several seeds",
                       allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run directories of one recipe, one per seed")
    p.add_argument("--machine", required=True, help="what ran them, e.g. '1x H100 80GB, CUDA 12.8'")
    p.add_argument("--note", default="", help="anything a reader of the figures should know")
    p.add_argument("--out", help="the JSON file (default: configs/references/RECIPE.json)")
    p.set_defaults(func=_reference)

    p = sub.add_parser("serve-rewards", help="host rewards on their own devices for training runs (HTTP; "
                                             "docs/rewards.md)", allow_abbrev=False)
    p.add_argument("--reward", action="append",
                   help="reward NAME or NAME:key=value,... (repeatable), e.g. hps:device=cuda:1,path=... or "
                        "mypkg.rewards:score; device= says where it runs")
    p.add_argument("--rewards", help="a YAML file: a list of rewards in the form of a run's rewards: (name, args, "
                                     "frames), or a run's config (its rewards are served)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                                                       "0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8601, help="default 8601")
    p.add_argument("--batch-size", type=int, default=64,
                   help="most images scored together: concurrent requests are batched up to it (default 64)")
    p.add_argument("--token-env", help="environment variable holding a bearer token that every request must carry")
    p.add_argument("--max-request-mb", type=float, default=256.0, help="largest request body in MiB (default 256)")
    p.set_defaults(func=_serve_rewards)

    for name, fn, text in (("pretrain", _pretrain, "pre-train the tiny base model on the shapes world"),
                           ("preprocess", _preprocess, "encode prompt files into an embedding cache"),
                           ("prompts", _prompts, "list the prompt sets the recipes name (NAME:SPLIT), or fetch one"),
                           ("config-doc", _config_doc, "print (or --out, --check) the configuration reference"),
                           ("launch", _launch, "torchrun with mixgrpo's exit statuses: mixgrpo launch [torchrun "
                                               "options] train ... (docs/distributed.md)")):
        p = sub.add_parser(name, help=text, add_help=False, allow_abbrev=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=fn)
    return parser


_PASSTHROUGH = ("pretrain", "preprocess", "prompts", "config-doc", "launch")  # subcommands with their own parsers


def command_names() -> list[str]:
    """The subcommands of `mixgrpo`."""
    actions = build_parser()._subparsers._group_actions  # noqa: SLF001  (argparse keeps them nowhere public)
    return list(actions[0].choices)


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
    # options too ("train --config C --out D optim.lr=1e-4"); anything else is still an error.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in _PASSTHROUGH:
        args.rest = rest
    try:
        if args.command in ("sample", "eval"):
            _check_sampling_args(args)
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (user-facing boundary: one line, no traceback)
        from mixgrpo.train import TrainingStopped

        if isinstance(e, TrainingStopped):  # preempted: checkpointed and resumable, but not finished
            if _reports(e):
                print(f"stopped by {e}", file=sys.stderr)
            return 128 + e.signum
        if args.debug or not _is_user_error(e):
            raise
        if _reports(e):
            for line in _error_line(e, args).splitlines() or [type(e).__name__]:  # pre-flight: one line each
                print(f"error: {line}", file=sys.stderr)
        return 2
    return code or 0


def _reports(e: Exception) -> bool:
    """Whether this process prints `e`: every rank stops on the same pre-flight problems (rank 0 found and broadcast
    them) and the same signal (agreed at the same iteration), so rank 0 alone says so; anything else may be one
    rank's own, and each rank prints it."""
    from mixgrpo.preflight import PreflightError
    from mixgrpo.train import TrainingStopped

    return not isinstance(e, (PreflightError, TrainingStopped)) or os.environ.get("RANK", "0") == "0"


def _error_line(e: Exception, args: argparse.Namespace) -> str:
    """The one line printed for a user error."""
    if not isinstance(e, OSError):
        return str(e)
    from mixgrpo.fileio import os_error_message

    line = os_error_message(e)
    run = getattr(args, "run_dir", None)
    if args.command == "train" and run is not None and e.errno in (errno.ENOSPC, errno.EDQUOT):
        from mixgrpo.checkpoint import latest_checkpoint

        latest = latest_checkpoint(run)  # what is on disk now, not what a run usually has
        line += (f", then continue the run with --resume (its last checkpoint, {latest.name}, is intact)" if latest
                 else ", then run it again with --resume (it had written no checkpoint yet: the run starts over)")
    return line


def _is_user_error(e: BaseException) -> bool:
    """Errors of the user's input (`mixgrpo.errors.UserError`) and of the machine (OSError: a full disk, a missing
    file): shown as one line. Anything else is a bug, in mixgrpo or a library: traceback."""
    return isinstance(e, (UserError, OSError))


if __name__ == "__main__":
    sys.exit(main())
