"""Iteration benchmark: every algorithm preset on the same model, batch and seeds, interleaved in one process.

    python benchmarks/iteration.py                       # tiny model, 4 x 8 images, 4 measured iterations
    python benchmarks/iteration.py --model gaussian      # engine overhead with a near-free model

For each algorithm it reports the median seconds per iteration (after one warm-up iteration), the model
calls of the rollout and of the update counted by hooks on the model, the split of the iteration
(rollout, reward, update, other), the share of the iteration spent inside model calls, and the speed-up
over DanceGRPO next to the paper's and next to the theoretical one implied by the measured cost of one
forward call and one forward+backward call at the batch sizes the trainer uses.

Rounds interleave the algorithms (iteration r of every algorithm, then r + 1, ...) so that a slow
phase of the machine hits every algorithm alike; each round resumes each run from its checkpoint.
Writes JSON (--json) and a markdown table (--markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ALGORITHMS = ["dance_grpo", "flow_grpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
PAPER_SPEEDUP = {"dance_grpo": 1.0, "flow_grpo": None, "mixgrpo": 1.93, "mixgrpo_flash": 2.59,
                 "mixgrpo_flash_star": 3.50}
ROOT = Path(__file__).resolve().parent.parent


def _config(algorithm: str, args: argparse.Namespace, out_dir: Path):
    from mixgrpo.config import load_config

    overrides = [
        f"iterations={args.iterations + 1}", f"prompts_per_iteration={args.prompts}", f"group_size={args.group}",
        f"micro_batch_size={args.micro_batch}", "updates_per_iteration=1", f"guidance_scale={args.guidance}",
        "eval_num_prompts=0", "checkpoint_every=1", "keep_checkpoints=1", "profile=true", f"seed={args.seed}",
        f"out_dir={out_dir / algorithm}", f"sampler.num_steps={args.steps}",
    ]
    if args.model != "tiny":
        overrides += [f"model.name={args.model}", "rewards=[{name: jpeg_compressibility}]"]
    return load_config(ROOT / "configs" / f"{algorithm}.yaml", overrides)


def _call_costs(cfg, repeats: int = 5) -> dict[str, float]:
    """Seconds of one forward call at the rollout batch and at the prefix batch, and of one forward+backward
    call at the update micro-batch (classifier-free guidance included when on)."""
    from mixgrpo.models import cond_to
    from mixgrpo.models.base import build_model, guided_velocity

    model = build_model(cfg.model.name, cfg.model.args)
    P, G, mb = cfg.prompts_per_iteration, cfg.group_size, min(cfg.micro_batch_size, cfg.prompts_per_iteration * cfg.group_size)
    prompts = ["a red circle"] * (P * G)
    cond = cond_to(model.encode_prompts(prompts), "cpu")
    uncond = model.encode_prompts([""] * (P * G)) if cfg.guidance_scale != 1 else None

    def call(n: int, grad: bool) -> float:
        x = torch.randn(n, *model.latent_shape)
        sigma = torch.full((n,), 0.5)
        c = {k: v[:n] for k, v in cond.items()}
        u = None if uncond is None else {k: v[:n] for k, v in uncond.items()}
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            if grad:
                guided_velocity(model, x, sigma, c, u, cfg.guidance_scale).square().mean().backward()
            else:
                with torch.no_grad():
                    guided_velocity(model, x, sigma, c, u, cfg.guidance_scale)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    return {"forward_batch": call(P * G, False), "forward_prefix": call(P, False), "forward_backward": call(mb, True)}


def _theory(plan, costs: dict[str, float], cfg) -> float:
    """Model seconds of one iteration predicted from the per-call costs: shared-noise prefix calls at batch P,
    the other rollout calls at batch P*G, and K trained steps per micro-batch in the update."""
    first_sde = next((i for i, s in enumerate(plan.steps) if s.kind == "sde"), len(plan.steps))
    prefix = first_sde if cfg.shared_noise else 0
    batch = cfg.prompts_per_iteration * cfg.group_size
    micro_batches = -(-batch // cfg.micro_batch_size)
    return (prefix * costs["forward_prefix"] + (plan.nfe - prefix) * costs["forward_batch"]
            + plan.num_trained * micro_batches * costs["forward_backward"])


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny (default) or gaussian (engine overhead)")
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS)
    parser.add_argument("--iterations", type=int, default=4, help="measured iterations (after one warm-up)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/iteration.json")
    parser.add_argument("--markdown", default="benchmarks/results/iteration.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from mixgrpo.plan import build_plan
    from mixgrpo.rundir import read_metrics
    from mixgrpo.train import train

    work = Path(tempfile.mkdtemp(prefix="mixgrpo-bench-"))
    cfgs = {a: _config(a, args, work) for a in args.algorithms}
    for r in range(1, args.iterations + 2):
        for a, cfg in cfgs.items():
            train(_with_iterations(cfg, r), resume=r > 1, progress=False)
        print(f"round {r}/{args.iterations + 1} done", flush=True)

    costs = _call_costs(next(iter(cfgs.values())))
    results = {}
    for a, cfg in cfgs.items():
        metrics = read_metrics(work / a)[1:]  # drop the warm-up iteration
        for m in metrics:  # per-iteration derived values, so that their medians are medians of real iterations
            m["time/other"] = m["time/iteration"] - m["time/rollout"] - m["time/reward"] - m["time/update"]
            m["model_share"] = (m["time/model_rollout"] + m["time/model_update"]) / m["time/iteration"]
        med = lambda k: statistics.median(m[k] for m in metrics)  # noqa: E731
        plan = build_plan(cfg.sampler, 1, cfg.seed)
        it = med("time/iteration")
        results[a] = {
            "seconds_per_iteration": it, "rollout": med("time/rollout"), "reward": med("time/reward"),
            "update": med("time/update"), "other": med("time/other"),
            "model_share": med("model_share"), "rollout_calls": med("model_calls/rollout"),
            "update_calls": med("model_calls/update"), "nfe_rollout": plan.nfe, "nfe_trained": plan.num_trained,
            "theory_seconds": _theory(plan, costs, cfg),
        }
    base = results.get("dance_grpo")
    for a, r in results.items():
        r["speedup"] = base["seconds_per_iteration"] / r["seconds_per_iteration"] if base else None
        r["speedup_theory"] = base["theory_seconds"] / r["theory_seconds"] if base else None
        r["speedup_paper"] = PAPER_SPEEDUP.get(a)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads", "args": vars(args), "call_costs": costs,
            "max_rss_mb": _max_rss_mb()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = _markdown(results, meta)
    Path(args.markdown).write_text(table)
    print(table)


def _with_iterations(cfg, n: int):
    import dataclasses

    return dataclasses.replace(cfg, iterations=n)


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _markdown(results: dict, meta: dict) -> str:
    a = meta["args"]
    lines = [f"Model `{a['model']}`, {a['prompts']} prompts x {a['group']} images, T = {a['steps']}, "
             f"guidance {a['guidance']}, micro-batch {a['micro_batch']}, median of {a['iterations']} iterations "
             f"after 1 warm-up; {meta['machine']}.", "",
             "| algorithm | NFE rollout | NFE trained | calls rollout / update | s / iteration | rollout | reward | "
             "update | other | in model calls | speed-up vs DanceGRPO | theory | paper |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['nfe_rollout']} | {r['nfe_trained']} | {r['rollout_calls']:.0f} / {r['update_calls']:.0f} | "
            f"{r['seconds_per_iteration']:.2f} | {r['rollout']:.2f} | {r['reward']:.3f} | {r['update']:.2f} | "
            f"{r['other']:.3f} | {100 * r['model_share']:.1f}% | {fmt(r['speedup'])}x | {fmt(r['speedup_theory'])}x | "
            f"{fmt(r['speedup_paper'])}{'x' if r['speedup_paper'] else ''} |")
    c = meta["call_costs"]
    lines += ["", f"Per-call costs: forward at the rollout batch {1000 * c['forward_batch']:.1f} ms, at the prefix "
                  f"batch {1000 * c['forward_prefix']:.1f} ms, forward+backward at the micro-batch "
                  f"{1000 * c['forward_backward']:.1f} ms. Peak RSS {meta['max_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
