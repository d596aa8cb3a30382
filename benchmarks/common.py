"""What the benchmarks share: training a recipe (or reusing a finished run) and the held-out evaluation every
model of a benchmark gets (25-step ODE, the recipe's guidance, seed 1234: the same noise for every model);
the machine line beside every figure, the CPU-time clock, and the model seconds an iteration's plan predicts."""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def train_or_reuse(config: Path, overrides: list[str], run_dir: Path, title: str, quiet: bool) -> Path:
    """Train `config` with `overrides` into run_dir (resuming an interrupted run), or reuse it when finished."""
    from mixgrpo.config import load_config
    from mixgrpo.train import train

    cfg = load_config(config, [*overrides, f"run.out_dir={run_dir}"])  # bad overrides fail even for a finished run
    if (run_dir / "final").is_dir():
        print(f"{run_dir}: done already, reusing it", flush=True)
        return run_dir
    print(f"== {title}", flush=True)
    train(cfg, resume=True, progress=not quiet)
    return run_dir


def recipe_rewards(cfg) -> list:
    """[(label, fn)] of every reward of the recipe, weight 0 included."""
    from mixgrpo.rewards.scoring import build_rewards

    return [(r.label, r.fn) for r in build_rewards(cfg.rewards)]


def held_out_rewards(model, cfg, rewards: list, prompts: list[str], images_per_prompt: int,
                     **switch) -> dict[str, float]:
    """Mean of each of `rewards` over `prompts` (25-step ODE, the recipe's guidance, seed 1234: the same noise
    for every model); `switch` = switch_model, switch_at for hybrid inference."""
    from mixgrpo.evaluate import evaluate
    from mixgrpo.plan import ode_plan

    res = evaluate(model, prompts, rewards, ode_plan(cfg.sampler.num_steps, cfg.sampler.shift), images_per_prompt,
                   1234, cfg.eval_guidance, **switch)
    return {k: v["mean"] for k, v in res.summary().items()}


def machine() -> str:
    """CPU model, cores, whether it has bf16 matrix units, torch, threads and load: the line beside a figure."""
    import torch

    from mixgrpo.dtypes import bf16_matmul_units

    cpuinfo = Path("/proc/cpuinfo")
    name = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")), platform.processor()) if cpuinfo.exists() else "?"
    return (f"{name}, {platform.machine()}, {os.cpu_count()} cores, {bf16_matmul_units('cpu')[1]}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")


def add_clock_argument(parser: argparse.ArgumentParser, default: str = "wall") -> None:
    parser.add_argument("--clock", choices=["wall", "cpu"], default=default,
                        help="cpu: every timer reads the process's CPU time (with 1 thread: the compute time, robust "
                             "against other jobs on a shared machine)")


def use_clock(clock: str) -> None:
    if clock == "cpu":
        time.perf_counter = time.process_time  # every timer of this process, the trainer's included


def theory_seconds(plan, costs: dict[str, float], cfg) -> float:
    """Model seconds of one iteration predicted from the per-call costs: shared-noise prefix calls at batch P,
    the other rollout calls at batch P*G, and K trained steps per micro-batch in the update."""
    first_sde = next((i for i, s in enumerate(plan.steps) if s.kind == "sde"), len(plan.steps))
    prefix = first_sde if cfg.rollout.shared_noise else 0
    batch = cfg.rollout.prompts_per_iteration * cfg.rollout.group_size
    micro_batches = -(-batch // cfg.update.micro_batch_size)
    return (prefix * costs["forward_prefix"] + (plan.nfe - prefix) * costs["forward_batch"]
            + plan.num_trained * micro_batches * costs["forward_backward"])
