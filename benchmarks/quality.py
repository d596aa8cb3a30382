"""Quality per wall-clock: every algorithm trains for the same time budget; held-out rewards along the way.

    python benchmarks/quality.py --minutes 6 --seeds 0 1 2 --algorithms dance_grpo mixgrpo mixgrpo_flash_star
    python benchmarks/quality.py --algorithms mixgrpo diffusion_nft \
        --variant nft_flash_star diffusion_nft algorithm=mixgrpo_flash_star rollout.shared_noise=true

Each (algorithm, seed) run is the algorithm's recipe from configs/ with `time_limit_minutes` set to the
budget (a run also ends at the recipe's iteration count, or --max-iterations) and a checkpoint every
--checkpoint-every iterations (all kept). A --variant LABEL RECIPE KEY=VALUE... is a recipe with overrides of
its own (e.g. another rollout for the same objective), reported under LABEL. Runs go one after the other in
this process, so only one uses the cores at a time. Afterwards every checkpoint (and the shared base model, at time 0) is evaluated on the
held-out prompts (--eval-images per prompt, the recipe's guidance, seed 1234: the same noise for every
checkpoint) with every reward of the recipe (weight 0 included: the verifier's strict accuracy is logged that
way), and its wall-clock is the sum of `time/iteration` up to it in the run's metrics.jsonl (training time
only: evaluation is not charged to the algorithms).

Writes OUT/quality.json (every point), OUT/quality.md (final rewards per algorithm, mean and spread over
seeds, and the first time each algorithm's seed-mean of --metric reaches DanceGRPO's final seed-mean) and the
plots OUT/METRIC_vs_minutes.png, OUT/METRIC_vs_iterations.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import torch

from common import held_out_rewards, recipe_rewards, train_or_reuse  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent


def run(label: str, recipe: str, extra: list[str], seed: int, args: argparse.Namespace, out: Path) -> Path:
    run_dir = out / f"{label}_s{seed}"
    left = args.minutes - trained_minutes(run_dir)  # time_limit_minutes counts per launch: a resumed run gets the rest
    overrides = [f"run.seed={seed}", f"run.time_limit_minutes={max(left, 1e-9)}", f"run.checkpoint_every={args.checkpoint_every}",
                 "run.keep_checkpoints=100000", "eval.num_prompts=0", *args.override, *extra]
    if args.max_iterations:
        overrides.append(f"run.iterations={args.max_iterations}")
    return train_or_reuse(ROOT / "configs" / f"{recipe}.yaml", overrides, run_dir,
                          f"{label} seed {seed}: {args.minutes:g} min ({left:.2f} left)", args.quiet)


def trained_minutes(run_dir: Path) -> float:
    """Training minutes of a run up to its latest checkpoint (where a resume continues), 0 for a new run."""
    from mixgrpo.checkpoint import latest_checkpoint
    from mixgrpo.rundir import read_metrics

    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        return 0.0
    upto = int(ckpt.name.rsplit("_", 1)[1])
    return sum(m["time/iteration"] for m in read_metrics(run_dir) if m["iteration"] <= upto) / 60


def evaluate_run(run_dir: Path, cfg, rewards: list, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Held-out rewards of every checkpoint of a run, with its cumulative training time."""
    from mixgrpo.checkpoint import complete_checkpoints, load_checkpoint
    from mixgrpo.models.tiny import load_tiny
    from mixgrpo.rundir import read_metrics

    cache = run_dir / f"quality_eval_{args.eval_images}.json"  # lets several invocations share the evaluation
    if cache.is_file():
        return json.loads(cache.read_text())
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
        means = held_out_rewards(model.eval(), cfg, rewards, prompts, args.eval_images)
        points.append({"iteration": it, "minutes": seconds[it] / 60, **means})
        print(f"  {run_dir.name} it {it:3d} ({seconds[it] / 60:4.1f} min): "
              + ", ".join(f"{k} {v:.3f}" for k, v in means.items()), flush=True)
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

    metric, names = args.metric, list(base)
    start = {"iteration": 0, "minutes": 0.0, **base}
    curves = {alg: [[start, *pts] for pts in seeds.values()] for alg, seeds in results.items()}
    means = {alg: _mean_curve(c, metric) for alg, c in curves.items()}
    by_iteration = {alg: [(c[0][i]["iteration"], m[i][1]) for i in range(len(m))]
                    for (alg, c), m in zip(curves.items(), means.values())}
    plot_lines(means, out / f"{metric}_vs_minutes.png", title=f"held-out {metric} (seed mean)",
               xlabel="training minutes")
    plot_lines(by_iteration, out / f"{metric}_vs_iterations.png", title=f"held-out {metric} (seed mean)",
               xlabel="iteration")
    target = means["dance_grpo"][-1] if "dance_grpo" in means else None
    lines = [f"Budget {args.minutes:g} min per run, seeds {args.seeds}, held-out prompts x {args.eval_images} "
             "images; base model: " + ", ".join(f"{k} {v:.3f}" for k, v in base.items()) + ".", "",
             "| algorithm | iterations | " + " | ".join(f"final {k} (mean +- sd)" for k in names)
             + f" | minutes to reach DanceGRPO's final {metric} |", "|---|---|" + "---|" * (len(names) + 1)]
    for alg, c in curves.items():
        finals = [seed[-1] for seed in c]
        reach = "-"
        if target is not None and target[1] <= base[metric]:
            reach = "n/a (DanceGRPO ends at or below the base)"
        elif target is not None:
            hit = next((m for m, v in means[alg] if v >= target[1]), None)
            reach = "not reached" if hit is None else f"{hit:.1f}"
        lines.append(f"| {alg} | {statistics.mean(f['iteration'] for f in finals):.0f} | "
                     + " | ".join(f"{statistics.mean(f[k] for f in finals):.3f} +- {_sd([f[k] for f in finals]):.3f}"
                                  for k in names) + f" | {reach} |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    (out / "quality.json").write_text(json.dumps(
        {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
         "args": vars(args), "base": base, "runs": results}, indent=1) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--algorithms", nargs="*", default=["dance_grpo", "mixgrpo", "mixgrpo_flash_star"],
                   help="recipes run as they are (none: only the --variant ones)")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar="LABEL RECIPE KEY=VALUE",
                   help="a recipe with overrides of its own, reported as LABEL (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=6.0, help="training budget per run")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--max-iterations", type=int, default=0,
                   help="iterations per run at most (default: the recipe's own; the time budget ends runs first)")
    p.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt")
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--metric", default="verifier_strict",
                   help="the reward (label as in metrics.jsonl) plotted and compared with DanceGRPO's final value")
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
    from mixgrpo.prompts import read_prompts
    from mixgrpo.rewards.scoring import build_rewards

    # the recipes share the model, rewards, prompts and guidance: the first one's settings evaluate them all
    recipes = [*args.algorithms, *(v[1] for v in args.variant if len(v) >= 2)]
    if not recipes:
        raise SystemExit("nothing to run: name --algorithms or a --variant")
    cfg = load_config(ROOT / "configs" / f"{recipes[0]}.yaml", args.override)
    labels = [r.label for r in build_rewards(cfg.rewards, build=False)]
    if args.metric not in labels:
        raise SystemExit(f"--metric {args.metric!r} is not one of the recipes' rewards {labels}: pick one of those")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = {alg: (alg, []) for alg in args.algorithms}
    for label, recipe, *extra in (v for v in args.variant if len(v) >= 2):
        variants[label] = (recipe, extra)
    if any(len(v) < 2 for v in args.variant):
        raise SystemExit("--variant needs LABEL RECIPE [KEY=VALUE ...]")
    runs = {label: {s: run(label, recipe, extra, s, args, out) for s in args.seeds}
            for label, (recipe, extra) in variants.items()}
    if args.train_only:
        return
    prompts, rewards = read_prompts(cfg.eval.prompts), recipe_rewards(cfg)
    with torch.no_grad():
        base = held_out_rewards(load_tiny().eval(), cfg, rewards, prompts, args.eval_images)
        results = {alg: {s: evaluate_run(d, cfg, rewards, prompts, args) for s, d in seeds.items()}
                   for alg, seeds in runs.items()}
    report(results, base, args, out)


if __name__ == "__main__":
    main()
