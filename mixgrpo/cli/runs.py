"""The commands over finished or running runs: `mixgrpo export` (a checkpoint as the final model), `mixgrpo compare`
(runs against their recipe's reference curves) and `mixgrpo reference` (those curves from runs at several seeds)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mixgrpo.cli.common import add_set_arg, check_given, check_out_dir
from mixgrpo.errors import UsageError


def add_parsers(sub) -> None:
    p = sub.add_parser("export", help="write a run's checkpoint as the final model (diffusers' formats)",
                       allow_abbrev=False)
    p.add_argument("--run", required=True, help="the run directory")
    p.add_argument("--checkpoint", help="iter_N under RUN/checkpoints (default: the latest complete one); full "
                                        "or sharded, written under any world size")
    p.add_argument("--out", help="directory to write (default: RUN/final, when it does not exist yet)")
    p.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    add_set_arg(p)
    p.set_defaults(func=run_export)

    p = sub.add_parser("compare", help="runs against their recipe's reference curves: inside the band or not, "
                                       "and one PNG", allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="compare.png", help="the PNG to write (default: compare.png)")
    p.set_defaults(func=run_compare)

    p = sub.add_parser("reference", help="write a recipe's reference curves from its runs at several seeds",
                       allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run directories of one recipe, one per seed")
    p.add_argument("--machine", required=True, help="what ran them, e.g. '1x H100 80GB, CUDA 12.8'")
    p.add_argument("--note", default="", help="anything a reader of the figures should know")
    p.add_argument("--out", help="the JSON file (default: configs/references/RECIPE.json)")
    p.set_defaults(func=run_reference)


def run_export(args: argparse.Namespace) -> None:
    from mixgrpo.checkpoint import latest_checkpoint
    from mixgrpo.export import export_model
    from mixgrpo.fileio import remove_dead_temporaries
    from mixgrpo.loading import ModelLoader
    from mixgrpo.rundir import FINAL

    run, out = _check_export_args(args)
    out = out or run / FINAL

    def pick(run: Path) -> Path:
        checkpoint = run / "checkpoints" / args.checkpoint if args.checkpoint else latest_checkpoint(run)
        if checkpoint is None:
            raise UsageError(f"{run} has no complete checkpoint to export{_no_checkpoint_why(run)}")
        return checkpoint

    # the weights are all that is read, on the CPU: neither the text encoders nor the embedding cache are needed
    loader = ModelLoader([str(run)], overrides=args.set or (), device="cpu", ema=not args.no_ema, text_encoders=False)
    model, checkpoint = loader.load_newest(run, pick, retry=not args.checkpoint)
    if out.exists():  # again: another export may have written it meanwhile
        raise UsageError(f"{out} already exists: pass --out DIR to write the export elsewhere")
    removed = remove_dead_temporaries(out)  # what a killed export of out left (a run sweeps its own likewise)
    if removed:
        print(f"note: removed what an interrupted export left: {', '.join(str(p) for p in removed)}", flush=True)
    export_model(model, out)
    print(f"exported {checkpoint} to {out}")


def _no_checkpoint_why(run: Path) -> str:
    from mixgrpo.checkpoint import describe_checkpoints

    state = describe_checkpoints(run)
    return "" if state == "no checkpoint" else f": it holds {state}"


def _check_export_args(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """(run, out) of an export, checked before any model loads: a run directory, a checkpoint of it named
    iter_N and complete, an --out that does not exist yet and can be created."""
    from mixgrpo.checkpoint import MARKER, complete_checkpoints
    from mixgrpo.export import is_run_dir
    from mixgrpo.rundir import FINAL

    check_given("--run", args.run, "give the out_dir of a run")
    check_given("--checkpoint", args.checkpoint, "give iter_N, or leave it out to export the newest")
    check_given("--out", args.out, "give the directory to write, or leave it out for RUN/final")
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
        check_out_dir(out, "--out")
    return run, out


def run_compare(args: argparse.Namespace) -> int:
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


def run_reference(args: argparse.Namespace) -> None:
    """Write a recipe's reference file from its runs at several seeds."""
    from mixgrpo.reference import build_reference, references_dir

    ref = build_reference(args.runs, machine=args.machine, note=args.note)
    out = Path(args.out) if args.out else references_dir() / f"{ref.recipe}.json"
    ref.write(out)
    print(f"reference of {ref.recipe} ({len(ref.seeds)} seeds, {ref.precision}): {out}")
