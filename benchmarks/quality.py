"""Quality per wall-clock: every algorithm trains for the same time budget; held-out accuracy along the way.

    python benchmarks/quality.py --minutes 6 --seeds 0 1 2 --algorithms dance_grpo mixgrpo mixgrpo_flash_star

Each (algorithm, seed) run is the algorithm's recipe from configs/ with `time_limit_minutes` set to the
budget (a run also ends at the recipe's iteration count, or --max-iterations) and a checkpoint every
--checkpoint-every iterations (all kept). Runs go one after the other in this process, so only one uses the
cores at a time. Afterwards every checkpoint (and the shared base model, at time 0) is evaluated on the
held-out prompts (--eval-images per prompt, the recipe's guidance, seed 1234: the same noise for every
checkpoint), and its wall-clock is the sum of `time/iteration` up to it in the
run's metrics.jsonl (training time only: evaluation is not charged to the algorithms).

Writes OUT/quality.json (every point), OUT/quality.md (final accuracy per algorithm, mean and spread over
seeds, and the first time each algorithm's seed-mean reaches DanceGRPO's final seed-mean) and the plots
OUT/strict_vs_minutes.png, OUT/strict_vs_iterations.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def run(algorithm: str, seed: int, args: argparse.Namespace, out: Path) -> Path:
    from mixgrpo.config import load_config
    from mixgrpo.trainer import train

    run_dir = out / f"{algorithm}_s{seed}"
    overrides = [f"seed={seed}", f"out_dir={run_dir}", f"time_limit_minutes={args.minutes}",
                 f"checkpoint_every={args.checkpoint_every}", "keep_checkpoints=100000", "eval_num_prompts=0",
                 *args.override]
    if args.max_iterations:
        overrides.append(f"iterations={args.max_iterations}")
    cfg = load_config(ROOT / "configs" / f"{algorithm}.yaml", overrides)
    if (run_dir / "final").is_dir():
        print(f"{run_dir}: done already, reusing it", flush=True)
        return run_dir
    print(f"== {algorithm} seed {seed}: {args.minutes:g} min", flush=True)
    train(cfg, resume=True, progress=not args.quiet)
    return run_dir


def evaluate_run(run_dir: Path, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Held-out strict and dense accuracy of every checkpoint of a run, with its cumulative training time."""
    from mixgrpo.checkpoint import complete_checkpoints, load_checkpoint
    from mixgrpo.config import read_yaml
    from mixgrpo.models.tiny import load_tiny
    from mixgrpo.pretrain import heldout_accuracy
    from mixgrpo.trainer import read_metrics

    cache = run_dir / f"quality_eval_{args.eval_images}.json"  # lets several invocations share the evaluation
    if cache.is_file():
        return json.loads(cache.read_text())
    guidance = read_yaml(run_dir / "config.yaml").get("guidance_scale", 1.0)
    seconds = [0.0]
    for row in read_metrics(run_dir):
        seconds.append(seconds[-1] + row["time/iteration"])
    points = []
    for ckpt in complete_checkpoints(run_dir):
        model = load_tiny()
        state = load_checkpoint(ckpt)
        weights = state["ema"] if state["ema"] is not None else state["model"]
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{ckpt}: weights {unexpected[:3]} do not belong to the tiny model")
        it = state["state"]["iteration"]
        acc = heldout_accuracy(model.eval(), prompts, args.eval_images, guidance, seed=1234)
        points.append({"iteration": it, "minutes": seconds[it] / 60, "strict": acc["strict"], "dense": acc["dense"]})
        print(f"  {run_dir.name} it {it:3d} ({seconds[it] / 60:4.1f} min): strict {acc['strict']:.3f} "
              f"dense {acc['dense']:.3f}", flush=True)
    cache.write_text(json.dumps(points) + "\n")
    return points


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _mean_curve(curves: list[list[dict]], key: str) -> list[tuple[float, float]]:
    """Seed-mean of `key` at each checkpoint index present in every seed (x = mean minutes)."""
    n = min(len(c) for c in curves)
    return [(statistics.mean(c[i]["minutes"] for c in curves), statistics.mean(c[i][key] for c in curves))
            for i in range(n)]


def report(results: dict[str, dict[int, list[dict]]], base: dict, args: argparse.Namespace, out: Path) -> None:
    from mixgrpo.images import plot_lines

    start = {"iteration": 0, "minutes": 0.0, "strict": base["strict"], "dense": base["dense"]}
    curves = {alg: [[start, *pts] for pts in seeds.values()] for alg, seeds in results.items()}
    means = {alg: _mean_curve(c, "strict") for alg, c in curves.items()}
    by_iteration = {alg: [(c[0][i]["iteration"], m[i][1]) for i in range(len(m))]
                    for (alg, c), m in zip(curves.items(), means.values())}
    plot_lines(means, out / "strict_vs_minutes.png", title="held-out strict accuracy (seed mean)",
               xlabel="training minutes")
    plot_lines(by_iteration, out / "strict_vs_iterations.png", title="held-out strict accuracy (seed mean)",
               xlabel="iteration")
    target = means["dance_grpo"][-1] if "dance_grpo" in means else None
    lines = [f"Budget {args.minutes:g} min per run, seeds {args.seeds}, held-out prompts x {args.eval_images} "
             f"images; base model: strict {base['strict']:.3f}, dense {base['dense']:.3f}.", "",
             "| algorithm | iterations | final strict (mean +- sd) | final dense (mean +- sd) | "
             "minutes to reach DanceGRPO's final strict |", "|---|---|---|---|---|"]
    for alg, c in curves.items():
        finals = [seed[-1] for seed in c]
        strict = [f["strict"] for f in finals]
        dense = [f["dense"] for f in finals]
        reach = "-"
        if target is not None and target[1] <= base["strict"]:
            reach = "n/a (DanceGRPO ends at or below the base)"
        elif target is not None:
            hit = next((m for m, v in means[alg] if v >= target[1]), None)
            reach = "not reached" if hit is None else f"{hit:.1f}"
        lines.append(f"| {alg} | {statistics.mean(f['iteration'] for f in finals):.0f} | "
                     f"{statistics.mean(strict):.3f} +- {_sd(strict):.3f} | {statistics.mean(dense):.3f} +- "
                     f"{_sd(dense):.3f} | {reach} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    (out / "quality.json").write_text(json.dumps(
        {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
         "args": vars(args), "base": base, "runs": results}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", nargs="+", default=["dance_grpo", "mixgrpo", "mixgrpo_flash_star"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=6.0, help="training budget per run")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--max-iterations", type=int, default=0,
                   help="iterations per run at most (default: the recipe's own; the time budget ends runs first)")
    p.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt")
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--train-only", action="store_true",
                   help="only train (e.g. several invocations side by side); a later invocation evaluates")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from mixgrpo.config import load_config
    from mixgrpo.models.tiny import load_tiny
    from mixgrpo.pretrain import heldout_accuracy
    from mixgrpo.world.scene import load_prompts

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {alg: {s: run(alg, s, args, out) for s in args.seeds} for alg in args.algorithms}
    if args.train_only:
        return
    prompts = load_prompts("heldout")
    guidance = load_config(ROOT / "configs" / f"{args.algorithms[0]}.yaml").guidance_scale  # the recipes share it
    base_acc = heldout_accuracy(load_tiny().eval(), prompts, args.eval_images, guidance, seed=1234)
    base = {"strict": base_acc["strict"], "dense": base_acc["dense"]}
    results = {alg: {s: evaluate_run(d, prompts, args) for s, d in seeds.items()} for alg, seeds in runs.items()}
    report(results, base, args, out)


if __name__ == "__main__":
    main()
