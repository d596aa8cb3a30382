"""What the quality and ablation benchmarks share: training a recipe (or reusing a finished run) and the
held-out evaluation every model of a benchmark gets (25-step ODE, the recipe's guidance, seed 1234: the same
noise for every model)."""

from __future__ import annotations

from pathlib import Path


def train_or_reuse(config: Path, overrides: list[str], run_dir: Path, title: str, quiet: bool) -> Path:
    """Train `config` with `overrides` into run_dir (resuming an interrupted run), or reuse it when finished."""
    from mixgrpo.config import load_config
    from mixgrpo.train import train

    cfg = load_config(config, [*overrides, f"out_dir={run_dir}"])  # bad overrides fail even for a finished run
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
