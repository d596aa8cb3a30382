"""The main job's minutes in each precision, measured side by side: a recipe (`--recipe`, default the main job's
`diffusion_nft`; `mixgrpo` for the GRPO recipe along its window path) with its held-out evaluation of 106 prompts
x 2 images before and after, fp32 against `auto`.

    python benchmarks/main_job.py                       # fp32 vs auto, 1 thread, CPU-time clock
    python benchmarks/main_job.py --clock wall --threads 2

The precisions are interleaved iteration by iteration in one process (iteration r of every precision, then
r + 1, each resuming from its checkpoint), so that a busy phase of a shared machine hits both alike; the
held-out evaluation is timed the same way, interleaved, on the base model. The job's minutes are the sum of
its iterations' seconds (metrics.jsonl) and two evaluations; start-up (loading the model, the layout probe)
and checkpoint writes come on top and are the same for both (seconds). `--clock cpu` reads the process's CPU
time (time.process_time) for every timer, the trainer's included: with one thread that is the compute time,
which other jobs on the machine inflate far less than the wall time. Also reports what decides whether the
results are the same: the first step's on-policy ratio error, the clip fraction, the training reward and the
final held-out evaluation of each run (one run each: a difference within the evaluation's +-0.025 is noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_clock_argument, machine, recipe_rewards, use_clock  # noqa: E402  benchmarks/common.py


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="diffusion_nft", help="a recipe in configs/ (the main job by default)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "auto"])
    parser.add_argument("--threads", type=int, default=1)
    add_clock_argument(parser, default="cpu")
    parser.add_argument("--override", nargs="*", default=[], help="key=value for both runs (e.g. run.iterations=8)")
    parser.add_argument("--json", default="benchmarks/results/main_job.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    use_clock(args.clock)

    from mixgrpo.config import load_config
    from mixgrpo.rundir import read_metrics
    from mixgrpo.train import train

    work = Path(tempfile.mkdtemp(prefix="mixgrpo-mainjob-"))
    cfgs = {p: load_config(ROOT / "configs" / f"{args.recipe}.yaml",
                           [*args.override, f"run.precision={p}", "eval.num_prompts=0", "run.checkpoint_every=1",
                            "run.keep_checkpoints=1", "run.tensorboard=false", f"run.out_dir={work / p}"]) for p in args.precisions}
    recipe = load_config(ROOT / "configs" / f"{args.recipe}.yaml", args.override)
    evaluation = {p: [] for p in args.precisions}
    held_out = {}
    for p, cfg in cfgs.items():  # the base model's held-out evaluation ("before"), timed
        evaluation[p].append(_evaluate(cfg, recipe, None, held_out, p))
    n = next(iter(cfgs.values())).iterations
    for r in range(1, n + 1):
        for cfg in cfgs.values():
            train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, iterations=r)), resume=r > 1, progress=False)
        print(f"iteration {r}/{n} done ({time.strftime('%H:%M:%S')}, load {os.getloadavg()[0]:.1f})", flush=True)
    for p, cfg in cfgs.items():  # the trained model's ("after")
        evaluation[p].append(_evaluate(cfg, recipe, Path(cfg.run.out_dir) / "final", held_out, p + "/after"))

    results = {}
    for p, cfg in cfgs.items():
        metrics = read_metrics(cfg.run.out_dir)
        iterations = sum(m["time/iteration"] for m in metrics)
        results[p] = {
            "precision": metrics[0]["precision"], "iterations": len(metrics), "iteration_seconds": iterations,
            "evaluation_seconds": evaluation[p], "minutes": (iterations + sum(evaluation[p])) / 60,
            "median_seconds_per_iteration": statistics.median(m["time/iteration"] for m in metrics),
            "onpolicy_ratio_error_max": max(m["onpolicy_ratio_error"] for m in metrics),
            "rescored_old_log_probs": metrics[0]["rescored_old_log_probs"],
            "clip_fraction_mean": statistics.mean(m.get("clip_fraction", 0.0) for m in metrics),
            "clip_fraction_last8": statistics.mean(m.get("clip_fraction", 0.0) for m in metrics[-8:]),
            "reward_first8": statistics.mean(m["reward/verifier"] for m in metrics[:8]) if "reward/verifier" in metrics[0] else None,
            "reward_last8": statistics.mean(m["reward/verifier"] for m in metrics[-8:]) if "reward/verifier" in metrics[0] else None,
            "held_out_before": held_out[p], "held_out_after": held_out[p + "/after"],
        }
    base = results.get("fp32")
    for r in results.values():
        r["speedup_vs_fp32"] = base["minutes"] / r["minutes"] if base else None
    meta = {"machine": machine(), "clock": args.clock, "threads": args.threads, "override": args.override}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(json.dumps({"meta": meta, "results": results}, indent=1))


def _evaluate(cfg, recipe, path: Path | None, held_out: dict, key: str) -> float:
    """Seconds of the recipe's held-out evaluation in the run's precision (base model, or the one at `path`);
    its figures go to held_out[key]."""
    from mixgrpo.dtypes import model_precision, resolve_precision
    from mixgrpo.evaluate import evaluate
    from mixgrpo.models.base import build_model
    from mixgrpo.plan import ode_plan
    from mixgrpo.prompts import read_prompts

    model = build_model(cfg.model.name, cfg.model.args if path is None else {**cfg.model.args, "path": str(path)})
    rewards = recipe_rewards(recipe)
    prompts = read_prompts(recipe.eval.prompts)[: recipe.eval.num_prompts]
    guidance = recipe.eval_guidance
    start = time.perf_counter()
    with model_precision("cpu", resolve_precision(cfg.run.precision, "cpu")[0]):
        res = evaluate(model, prompts, rewards, ode_plan(recipe.sampler.num_steps, recipe.sampler.shift),
                       recipe.eval.images_per_prompt, seed=recipe.run.seed + 1, guidance_scale=guidance)
    seconds = time.perf_counter() - start
    held_out[key] = {k: v["mean"] for k, v in res.summary().items()}
    return seconds


if __name__ == "__main__":
    main()
