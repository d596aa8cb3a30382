"""`mixgrpo train`: a run from a recipe and `key.sub=value` overrides, fresh or resumed; `--dry-run` checks it only."""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

from mixgrpo.errors import UsageError, UserError

DEFAULT_RECIPE = "mixgrpo"


class DiskFull(UserError):
    """The disk filled up during a run: the line says what to free and how the run continues."""


def add_parser(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    cfg = _config(args)
    if args.dry_run:
        _dry_run(cfg)
        return
    from mixgrpo import dist
    from mixgrpo.preflight import PreflightError
    from mixgrpo.train import TrainingStopped, train

    try:
        train(cfg, resume=args.resume, progress=not args.quiet)
    except (PreflightError, TrainingStopped):
        # Every rank stops here together (rank 0's findings and the stop signal are agreed), so leave the process
        # group cleanly: a gloo group torn down at interpreter exit aborts the worker now and then (status 134,
        # "terminate called without an active exception") instead of exiting 2 / 143. An error of one rank alone
        # skips this: its peers may be inside a collective, and the launcher stops them.
        dist.shutdown()
        raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(_disk_full_line(e, Path(cfg.run.out_dir))) from e
        raise
    dist.shutdown()


def _config(args: argparse.Namespace):
    """The run's TrainConfig: --config (default: the run's own config.yaml when --resume --out names a run, else
    the mixgrpo recipe) with the overrides and --out; a run copied from elsewhere names the files it lacks here."""
    from mixgrpo.config import load_config, recipe_path
    from mixgrpo.rundir import CONFIG

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
    if own:  # a run copied from another machine or directory: name the files it lacks here, and the fix
        from mixgrpo.config import to_dict
        from mixgrpo.runfiles import missing

        gone = missing(to_dict(cfg))
        if gone:
            raise UsageError(f"run {args.out} names files that are not here (was it moved?): "
                             f"{', '.join(f'{field} = {path}' for field, path in gone)}; give their place now: "
                             f"mixgrpo train --out {args.out} --resume "
                             + " ".join(f"{field}=PATH" for field, _ in gone))
    return cfg


def _dry_run(cfg) -> None:
    """What the run needs and what it would take, without a model or a run directory."""
    from mixgrpo import memory
    from mixgrpo.preflight import check_run

    check_run(cfg)
    if memory.report(cfg, int(os.environ.get("WORLD_SIZE", "1"))) is None:
        print(f"no memory estimate for model {cfg.model.name!r} (only for a local diffusers pipeline directory)")
    print(f"dry run: the pre-flight found nothing; the run would write {cfg.run.out_dir}")


def _disk_full_line(e: OSError, run: Path) -> str:
    """The one line of a full disk: the file, and how the run continues once space is freed."""
    from mixgrpo.checkpoint import latest_checkpoint
    from mixgrpo.fileio import os_error_message

    latest = latest_checkpoint(run)  # what is on disk now, not what a run usually has
    return os_error_message(e) + (
        f", then continue the run with --resume (its last checkpoint, {latest.name}, is intact)" if latest
        else ", then run it again with --resume (it had written no checkpoint yet: the run starts over)")
