"""Iteration benchmark: every algorithm preset on the same model, batch and seeds, interleaved in one process.

    python benchmarks/iteration.py                       # tiny model, 4 x 8 images, 4 measured iterations
    python benchmarks/iteration.py --path                # also MixGRPO and Flash at every window position
    python benchmarks/iteration.py --model gaussian      # engine overhead with a near-free model

For each algorithm it reports the median seconds per iteration (after one warm-up iteration), the model
calls of the rollout and of the update counted by hooks on the model, the split of the iteration
(rollout, reward, update, other), the share of the iteration spent inside model calls, and the speed-up
over DanceGRPO next to the paper's and next to the theoretical one implied by the measured cost of one
forward call and one forward+backward call at the batch sizes the trainer uses. Windows are frozen: the
first table has every window at l = 0, MixGRPO's slowest position.

`--path` adds the window path of the paper's schedule (300 iterations; MixGRPO tau = 25: l = 0..11,
Flash tau = 20: l = 0..14, every position held equally long), or the positions given by `--positions`:
MixGRPO and Flash frozen at each position, with the shared-noise prefix on (the default: the steps before
the window run once per prompt) and off (`shared_noise=false`: every step at batch P * G), so that the
prefix's contribution is isolated. The path's speed-up is DanceGRPO's s/it over the mean s/it along the
path, as the paper's (291.3 / 150.8 s, averaged over its 300 iterations).

Rounds interleave the runs (iteration r of every run, then r + 1, ...) so that a slow phase of the
machine hits every run alike; each round resumes each run from its checkpoint.
Writes JSON (--json) and a markdown table (--markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import add_clock_argument, machine, theory_seconds, use_clock  # benchmarks/common.py

ALGORITHMS = ["dance_grpo", "flow_grpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]
PAPER_SPEEDUP = {"dance_grpo": 1.0, "flow_grpo": None, "mixgrpo": 1.93, "mixgrpo_flash": 2.59,
                 "mixgrpo_flash_star": 3.50}
PATH_ALGORITHMS = ["mixgrpo", "mixgrpo_flash"]  # the window slides; Flash* keeps it at l = 0
PAPER_ITERATIONS = 300
ROOT = Path(__file__).resolve().parent.parent


def _config(algorithm: str, args: argparse.Namespace, out_dir: Path, precision: str, position: int | None = None,
            shared: bool = True):
    from mixgrpo.config import load_config

    overrides = [
        f"run.iterations={args.iterations + 1}", f"rollout.prompts_per_iteration={args.prompts}", f"rollout.group_size={args.group}",
        f"update.micro_batch_size={args.micro_batch}", "update.steps_per_epoch=1", f"rollout.guidance_scale={args.guidance}",
        "eval.num_prompts=0", "run.checkpoint_every=1", "run.keep_checkpoints=1", "run.profile=true", f"run.seed={args.seed}",
        f"run.out_dir={out_dir}", f"sampler.num_steps={args.steps}", f"run.precision={precision}",
        f"rollout.shared_noise={str(shared).lower()}",
    ]
    if position is not None:
        overrides += ["sampler.window.strategy=frozen", f"sampler.window.start={position}"]
    if args.model != "tiny":
        overrides += [f"model.name={args.model}", "rewards=[{name: jpeg_compressibility}]"]
    return load_config(ROOT / "configs" / f"{algorithm}.yaml", overrides)


def paper_path(algorithm: str, steps: int) -> list[int]:
    """Window positions of the paper's schedule for a preset, one entry per iteration (300)."""
    from mixgrpo.plan import ALGORITHMS as PRESETS
    from mixgrpo.plan import window_start

    return [window_start(it, steps, PRESETS[algorithm].window) for it in range(PAPER_ITERATIONS)]


def _call_costs(cfg, repeats: int = 5) -> dict[str, float]:
    """Seconds of one forward call at the rollout batch and at the prefix batch, and of one forward+backward
    call at the update micro-batch (classifier-free guidance included when on), in the run's precision."""
    from mixgrpo.dtypes import CpuAttentionBackward, model_precision, resolve_precision
    from mixgrpo.models import cond_to
    from mixgrpo.models.base import build_model, guided_velocity

    model = build_model(cfg.model.name, cfg.model.args)
    precision = resolve_precision(cfg.run.precision, "cpu")[0]
    P, G, mb = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size, min(cfg.update.micro_batch_size, cfg.rollout.prompts_per_iteration * cfg.rollout.group_size)
    prompts = ["a red circle"] * (P * G)
    cond = cond_to(model.encode_prompts(prompts), "cpu")
    uncond = model.encode_prompts([""] * (P * G)) if cfg.rollout.guidance_scale != 1 else None

    def call(n: int, grad: bool) -> float:
        x = torch.randn(n, *model.latent_shape)
        sigma = torch.full((n,), 0.5)
        c = {k: v[:n] for k, v in cond.items()}
        u = None if uncond is None else {k: v[:n] for k, v in uncond.items()}
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            with CpuAttentionBackward():
                if grad:
                    with model_precision("cpu", precision):
                        v = guided_velocity(model, x, sigma, c, u, cfg.rollout.guidance_scale)
                    v.square().mean().backward()
                else:
                    with torch.no_grad(), model_precision("cpu", precision):
                        guided_velocity(model, x, sigma, c, u, cfg.rollout.guidance_scale)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    return {"forward_batch": call(P * G, False), "forward_prefix": call(P, False), "forward_backward": call(mb, True)}


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
    parser.add_argument("--precisions", nargs="+", default=["fp32"],
                        help="the config's precision (auto, fp32, bf16); several are interleaved like the algorithms")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    parser.add_argument("--path", action="store_true", help="also the window path (MixGRPO, Flash)")
    parser.add_argument("--positions", type=int, nargs="+", help="measure only these window positions")
    parser.add_argument("--unshared-positions", type=int, nargs="*",
                        help="positions of the prefix-off runs (default: --positions; none: no prefix-off runs)")
    add_clock_argument(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/results/iteration.json")
    parser.add_argument("--markdown", default="benchmarks/results/iteration.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_clock(args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)

    from mixgrpo.train import train

    work = Path(tempfile.mkdtemp(prefix="mixgrpo-bench-"))
    runs = {}  # label -> (algorithm, position, shared, cfg); labels end in /precision
    for precision in args.precisions:
        for a in args.algorithms:
            cfg = _config(a, args, work, precision)
            position = 0 if cfg.sampler.uses_window and cfg.sampler.window.strategy != "frozen" else None
            runs[f"{a}/{precision}"] = (a, position, True, _config(a, args, work / a / precision, precision, position))
        if args.path:
            for a in (x for x in PATH_ALGORITHMS if x in args.algorithms):
                for position in sorted(set(paper_path(a, args.steps))):
                    unshared = args.positions if args.unshared_positions is None else args.unshared_positions
                    for shared in (True, False):
                        sample = args.positions if shared else unshared
                        if (position == 0 and shared) or (sample is not None and position not in sample):
                            continue  # the first table's run, or not in the sample
                        label = f"{a}@{position}{'' if shared else '/unshared'}/{precision}"
                        runs[label] = (a, position, shared,
                                       _config(a, args, work / label.replace("/", "_"), precision, position, shared))
    for r in range(1, args.iterations + 2):
        for _, _, _, cfg in runs.values():
            train(_with_iterations(cfg, r), resume=r > 1, progress=False)
        print(f"round {r}/{args.iterations + 1} done ({len(runs)} runs)", flush=True)

    report = {}
    for precision in args.precisions:
        mine = {k[: -len(precision) - 1]: v for k, v in runs.items() if k.endswith(f"/{precision}")}
        report[precision] = _report(args, mine, _call_costs(next(iter(mine.values()))[3]))
    meta = {"machine": machine() + (", CPU-time clock" if args.clock == "cpu" else ""), "args": vars(args),
            "max_rss_mb": _max_rss_mb()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "precisions": report}, indent=1))
    table = "\n".join(_markdown(r["results"], {**meta, "call_costs": r["call_costs"], "precision": r["precision"]})
                      + (_path_markdown(r["path"]) if r["path"] else "") for r in report.values())
    Path(args.markdown).write_text(table)
    print(table)


def _report(args, runs: dict, costs: dict) -> dict:
    """The tables of one precision: the algorithms at l = 0 and, with --path, the window path."""
    from mixgrpo.plan import build_plan
    from mixgrpo.rundir import read_metrics

    measured = {}
    for label, (a, position, shared, cfg) in runs.items():
        metrics = read_metrics(cfg.run.out_dir)[1:]  # drop the warm-up iteration
        for m in metrics:  # per-iteration derived values, so that their medians are medians of real iterations
            m["time/other"] = m["time/iteration"] - m["time/rollout"] - m["time/reward"] - m["time/update"]
            m["model_share"] = (m["time/model_rollout"] + m["time/model_update"]) / m["time/iteration"]
        med = lambda k: statistics.median(m[k] for m in metrics)  # noqa: E731
        plan = build_plan(cfg.sampler, 1, cfg.run.seed)
        measured[label] = {
            "algorithm": a, "position": position, "shared_noise": shared,
            "seconds_per_iteration": med("time/iteration"), "rollout": med("time/rollout"), "reward": med("time/reward"),
            "update": med("time/update"), "other": med("time/other"),
            "model_share": med("model_share"), "rollout_calls": med("model_calls/rollout"),
            "update_calls": med("model_calls/update"), "nfe_rollout": plan.nfe, "nfe_trained": plan.num_trained,
            "theory_seconds": theory_seconds(plan, costs, cfg), "precision": metrics[0]["precision"],
        }
    results = {a: measured[a] for a in args.algorithms}
    base = results.get("dance_grpo")
    for a, r in results.items():
        r["speedup"] = base["seconds_per_iteration"] / r["seconds_per_iteration"] if base else None
        r["speedup_theory"] = base["theory_seconds"] / r["theory_seconds"] if base else None
        r["speedup_paper"] = PAPER_SPEEDUP.get(a)
    path = _path_summary(args, runs, measured, costs, base) if args.path else {}
    return {"precision": next(iter(measured.values()))["precision"], "call_costs": costs, "results": results,
            "path": path, "runs": measured}


def _path_summary(args, runs, measured, costs, base) -> dict:
    """Per path algorithm: each position's measured and theoretical s/it (prefix on and off) and the
    averages over the path (measured positions; theory also over every position of the schedule)."""
    from mixgrpo.plan import build_plan

    out = {}
    for a in (x for x in PATH_ALGORITHMS if x in args.algorithms):
        schedule = paper_path(a, args.steps)
        rows = []
        for position in sorted(set(schedule)):
            on = measured.get(a if position == 0 else f"{a}@{position}")
            if on is None:
                continue
            off = measured.get(f"{a}@{position}/unshared")
            rows.append({"position": position, "weight": schedule.count(position), "nfe": on["nfe_rollout"],
                         "on": on["seconds_per_iteration"], "off": off and off["seconds_per_iteration"],
                         "theory_on": on["theory_seconds"], "theory_off": off and off["theory_seconds"]})
        cfg = runs[a][3]
        theory_all = []
        for position in schedule:  # theory at every iteration of the schedule, measured or not
            plan = build_plan(_frozen(cfg.sampler, position), 1, cfg.run.seed)
            theory_all.append(theory_seconds(plan, costs, cfg))
        mean = lambda key: sum(r[key] * r["weight"] for r in rows) / sum(r["weight"] for r in rows)  # noqa: E731
        summary = {"rows": rows, "positions_measured": [r["position"] for r in rows],
                   "positions_schedule": sorted(set(schedule)),
                   "mean_on": mean("on"), "mean_theory_on": mean("theory_on"),
                   "mean_theory_all_positions": sum(theory_all) / len(theory_all),
                   "mean_nfe": sum(r["nfe"] * r["weight"] for r in rows) / sum(r["weight"] for r in rows)}
        off = [r for r in rows if r["off"] is not None]
        if off:  # over the positions measured both ways
            both = lambda key: sum(r[key] * r["weight"] for r in off) / sum(r["weight"] for r in off)  # noqa: E731
            summary.update(positions_off=[r["position"] for r in off], mean_on_where_off=both("on"),
                           mean_off=both("off"), mean_theory_off=both("theory_off"),
                           mean_theory_on_where_off=both("theory_on"))
        if base:
            b, bt = base["seconds_per_iteration"], base["theory_seconds"]
            summary.update(speedup_on=b / summary["mean_on"], speedup_theory_on=bt / summary["mean_theory_on"],
                           speedup_theory_all_positions=bt / summary["mean_theory_all_positions"],
                           speedup_mean_of_ratios=statistics.mean(b / r["on"] for r in rows),
                           speedup_paper=PAPER_SPEEDUP[a])
            if "mean_off" in summary:
                summary.update(speedup_off=b / summary["mean_off"], speedup_theory_off=bt / summary["mean_theory_off"],
                               speedup_on_where_off=b / summary["mean_on_where_off"],
                               speedup_theory_on_where_off=bt / summary["mean_theory_on_where_off"])
        out[a] = summary
    return out


def _frozen(sampler, position: int):
    import dataclasses

    return dataclasses.replace(sampler, window=dataclasses.replace(sampler.window, strategy="frozen", start=position))


def _with_iterations(cfg, n: int):
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, iterations=n))


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _markdown(results: dict, meta: dict) -> str:
    a = meta["args"]
    lines = [f"Model `{a['model']}`, {a['prompts']} prompts x {a['group']} images, T = {a['steps']}, "
             f"guidance {a['guidance']}, micro-batch {a['micro_batch']}, precision {meta['precision']}, median of "
             f"{a['iterations']} iterations after 1 warm-up, windows at l = 0; {meta['machine']}.", "",
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
    ratio = c["forward_backward"] / c["forward_batch"] * (a["prompts"] * a["group"]) / min(a["micro_batch"], a["prompts"] * a["group"])
    lines += ["", f"Per-call costs: forward at the rollout batch {1000 * c['forward_batch']:.1f} ms, at the prefix "
                  f"batch {1000 * c['forward_prefix']:.1f} ms, forward+backward at the micro-batch "
                  f"{1000 * c['forward_backward']:.1f} ms (r = forward+backward / forward per image = {ratio:.2f}). "
                  f"Peak RSS {meta['max_rss_mb']:.0f} MB.",
              ]
    d, s = results.get("dance_grpo"), results.get("mixgrpo_flash_star")
    if d and s:  # the call counts alone bound Flash*'s speed-up, whatever a call costs
        bound = lambda r, calls: (d["nfe_rollout"] + d["nfe_trained"] * r) / (calls + s["nfe_trained"] * r)  # noqa: E731
        lines += ["", f"Flash* against DanceGRPO from call counts alone, ({d['nfe_rollout']} + {d['nfe_trained']} r) / "
                      f"({s['nfe_rollout']} + {s['nfe_trained']} r): {bound(ratio, s['nfe_rollout']):.2f}x at the measured "
                      f"r = {ratio:.2f}, {bound(1e9, s['nfe_rollout']):.2f}x as r grows without bound; with one rollout call "
                      f"fewer (the official code's count): {bound(ratio, s['nfe_rollout'] - 1):.2f}x."]
    return "\n".join(lines) + "\n"


def _path_markdown(path: dict) -> str:
    fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = ["", "Window path (paper's schedule: 300 iterations, positions held equally long), s / iteration:", "",
             "| algorithm | l | NFE | prefix on | theory | prefix off | theory |", "|---|---|---|---|---|---|---|"]
    for a, s in path.items():
        for r in s["rows"]:
            lines.append(f"| {a} | {r['position']} | {r['nfe']} | {r['on']:.2f} | {r['theory_on']:.2f} | "
                         f"{fmt(r['off'])} | {fmt(r['theory_off'])} |")
    lines += ["", "| algorithm | positions measured | mean NFE | mean s/it | speed-up vs DanceGRPO | theory "
                  "(measured positions / all) | paper |", "|---|---|---|---|---|---|---|"]
    for a, s in path.items():
        lines.append(
            f"| {a} | {len(s['positions_measured'])} of {len(s['positions_schedule'])} | {s['mean_nfe']:.1f} | "
            f"{s['mean_on']:.2f} | {fmt(s.get('speedup_on'))}x | {fmt(s.get('speedup_theory_on'))}x / "
            f"{fmt(s.get('speedup_theory_all_positions'))}x | {fmt(s.get('speedup_paper'))}x |")
    if any("mean_off" in s for s in path.values()):
        lines += ["", "The shared-noise prefix, over the positions measured both ways:", "",
                  "| algorithm | positions | prefix on: s/it | speed-up | theory | prefix off: s/it | speed-up | theory |",
                  "|---|---|---|---|---|---|---|---|"]
        for a, s in path.items():
            if "mean_off" in s:
                lines.append(f"| {a} | {', '.join(map(str, s['positions_off']))} | {s['mean_on_where_off']:.2f} | "
                             f"{fmt(s.get('speedup_on_where_off'))}x | {fmt(s.get('speedup_theory_on_where_off'))}x | "
                             f"{s['mean_off']:.2f} | {fmt(s.get('speedup_off'))}x | {fmt(s.get('speedup_theory_off'))}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
