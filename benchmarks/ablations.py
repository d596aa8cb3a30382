"""Ablations of MixGRPO's knobs at small scale: every variant is the main job's recipe plus a few overrides.

    python benchmarks/ablations.py --out runs/ablations --iterations 24 --seeds 0 \
        --override 'rewards=[{name: jpeg_compressibility}]' optim.lr=1.0e-4 [--variants progressive frozen ...]

Each (variant, seed) trains in turn in this process with `configs/mixgrpo.yaml` (or --config), the common
--override list and the variant's own overrides (VARIANTS below); a finished run is reused and an
interrupted one resumed, so the grid can be split over several --train-only invocations (e.g. two processes
with `OMP_NUM_THREADS=1` and disjoint --variants) and reported by a last --report-only one over all of them.
Afterwards the base model, every final model and hybrid inference of the first variant's models (the
fine-tuned model for the first p_mix of the steps, the base after; one row per --p-mix) are evaluated on the
held-out prompts with the recipe's rewards: --eval-images per prompt, 25-step ODE, the recipe's guidance,
seed 1234, so every model starts from the same noise. The report takes every seed found for a variant in OUT.

Writes OUT/ablations.json and OUT/ablations.md: per variant its overrides, seeds, median seconds per
iteration, rollout and trained NFE (counted by the trainer), the first reward's training mean over the first
and last quarter of the iterations, and every reward on held-out (mean over seeds, +- sd when several).
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

# name -> overrides on the recipe (configs/mixgrpo.yaml: window of 4 sliding by 1 every tau = 4 iterations)
VARIANTS: dict[str, list[str]] = {
    "progressive": [],
    "frozen": ["sampler.window.strategy=frozen"],
    "random": ["sampler.window.strategy=random"],
    "exp_decay": ["sampler.window.strategy=exp_decay", "sampler.window.decay=0.5"],
    "w2": ["sampler.window.size=2"],
    "w8": ["sampler.window.size=8"],
    "tau2": ["sampler.window.tau=2"],
    "tau8": ["sampler.window.tau=8"],
    "independent_noise": ["rollout.shared_noise=false"],
    "flash_0.2": ["sampler.flash.enabled=true", "sampler.flash.ratio=0.2"],
    "flash_0.4": ["sampler.flash.enabled=true", "sampler.flash.ratio=0.4"],
    "flash_0.6": ["sampler.flash.enabled=true", "sampler.flash.ratio=0.6"],
}


def train_variant(name: str, seed: int, args: argparse.Namespace) -> Path:
    overrides = [*args.override, *VARIANTS[name], f"run.seed={seed}", f"run.iterations={args.iterations}",
                 "eval.num_prompts=0"]
    return train_or_reuse(args.config, overrides, args.out / f"{name}_s{seed}",
                          f"{name} seed {seed}: {' '.join(VARIANTS[name]) or '(the recipe)'}", args.quiet)


def evaluate_runs(runs: dict[str, list[Path]], args: argparse.Namespace) -> dict:
    """Held-out reward means of the base, every run's final model and the hybrids, each cached in its run."""
    from mixgrpo.config import load_config
    from mixgrpo.models.tiny import load_tiny
    from mixgrpo.prompts import read_prompts

    cfg = load_config(args.config, args.override)
    prompts, rewards = read_prompts(cfg.eval.prompts), recipe_rewards(cfg)
    base = load_tiny(cfg.model.args.get("path")).eval()

    def score(model, cache: Path, **switch) -> dict[str, float]:
        if not cache.is_file():
            means = held_out_rewards(model, cfg, rewards, prompts, args.eval_images, **switch)
            cache.write_text(json.dumps(means) + "\n")
        return json.loads(cache.read_text())

    tag = f"ablation_eval_{args.eval_images}"
    out = {"base": score(base, args.out / f"base_{tag}.json"), "runs": {}, "hybrid": {}}
    first = next(iter(runs))
    for name, dirs in runs.items():
        for run_dir in dirs:
            tuned = load_tiny(run_dir / "final").eval()
            out["runs"].setdefault(name, {})[run_dir.name] = score(tuned, run_dir / f"{tag}.json")
            if name != first:
                continue
            for p in args.p_mix:
                switch = {"switch_model": base, "switch_at": round(p * cfg.sampler.num_steps)}
                out["hybrid"].setdefault(str(p), {})[run_dir.name] = score(tuned, run_dir / f"{tag}_pmix{p}.json",
                                                                          **switch)
    return out


def _mean_sd(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f}" + (f" +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def _training(run_dir: Path) -> dict:
    from mixgrpo.rundir import read_metrics

    rows = read_metrics(run_dir)
    key = next(k for k in rows[0] if k.startswith("reward/"))  # the recipe's first reward, as the progress line
    q = max(1, len(rows) // 4)
    return {"key": key, "first_quarter": statistics.mean(r[key] for r in rows[:q]),
            "last_quarter": statistics.mean(r[key] for r in rows[-q:]),
            "s_per_it": statistics.median(r["time/iteration"] for r in rows),
            "nfe_rollout": statistics.mean(r["nfe_rollout"] for r in rows),
            "nfe_trained": statistics.mean(r["nfe_trained"] for r in rows)}


def report(runs: dict[str, list[Path]], evals: dict, args: argparse.Namespace) -> str:
    names = list(evals["base"])
    lines = [f"{args.iterations} iterations per run; common overrides: `{' '.join(args.override) or '(none)'}`; "
             f"held-out: {args.eval_images} images per prompt, seed 1234.", "",
             "| variant | overrides | seeds | s / it | NFE rollout / trained | "
             "training reward, first -> last quarter | " + " | ".join(f"held-out {n}" for n in names) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(names),
             "| base | - | - | - | - | - | " + " | ".join(f"{evals['base'][n]:.3f}" for n in names) + " |"]
    table = {}
    for name, dirs in runs.items():
        train = [_training(d) for d in dirs]
        held = list(evals["runs"][name].values())
        table[name] = {"training": train, "heldout": held}
        lines.append(
            f"| {name} | `{' '.join(VARIANTS[name]) or '(the recipe)'}` | {len(dirs)} | "
            f"{statistics.median(t['s_per_it'] for t in train):.1f} | "
            f"{train[0]['nfe_rollout']:.1f} / {train[0]['nfe_trained']:.1f} | "
            f"{_mean_sd([t['first_quarter'] for t in train])} -> {_mean_sd([t['last_quarter'] for t in train])} | "
            + " | ".join(_mean_sd([h[n] for h in held]) for n in names) + " |")
    if evals["hybrid"]:
        first = next(iter(runs))
        lines += ["", f"Hybrid inference of the {first} models (fine-tuned for the first p_mix of the steps, "
                  "base after; p_mix 0 = the base, 1 = the fine-tuned model):", "",
                  "| p_mix | " + " | ".join(f"held-out {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
        rows = {0.0: [evals["base"]], **{float(p): list(by_run.values()) for p, by_run in evals["hybrid"].items()},
                1.0: list(evals["runs"][first].values())}
        for p, held in sorted(rows.items()):
            lines.append(f"| {p:g} | " + " | ".join(_mean_sd([h[n] for h in held]) for n in names) + " |")
    (args.out / "ablations.json").write_text(json.dumps(
        {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
         "args": {k: str(v) for k, v in vars(args).items()}, "evals": evals, "table": table}, indent=1) + "\n")
    text = "\n".join(lines) + "\n"
    (args.out / "ablations.md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/ablations"))
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "mixgrpo.yaml")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help="the first one is the reference for the hybrid-inference rows")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds to train (the report uses all found)")
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt")
    p.add_argument("--p-mix", nargs="*", type=float, default=[0.2, 0.5, 0.8])
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--train-only", action="store_true",
                   help="only train (e.g. several invocations side by side); a later --report-only evaluates")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the runs found in --out")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.variants:
            for seed in args.seeds:
                train_variant(name, seed, args)
        if args.train_only:
            return
    runs = {n: sorted(d for d in args.out.glob(f"{n}_s*") if (d / "final").is_dir()) for n in args.variants}
    runs = {n: d for n, d in runs.items() if d}
    if not runs:
        raise SystemExit(f"no finished runs of {args.variants} in {args.out}")
    with torch.no_grad():
        evals = evaluate_runs(runs, args)
    print(report(runs, evals, args))


if __name__ == "__main__":
    main()
