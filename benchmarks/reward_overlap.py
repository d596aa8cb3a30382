"""Reward overlap benchmark: iteration time with a reward that costs 25%, 50% and 100% of the rollout, scored after
the rollout (synchronous: `rollout_chunks: 1`, what every run did before), chunked but scored after the rollout
(`rollout_chunks: C`, `reward_overlap: false`: the cost of the chunking alone) and overlapped (`rollout_chunks: C`,
each chunk scored in the background while the next one rolls out), against the bound max(rollout, reward) + update.

    python benchmarks/reward_overlap.py                      # configs/mixgrpo.yaml, 8 x 8 images, C = 8
    python benchmarks/reward_overlap.py --fractions 0.5 --iterations 3 --chunks 4

The reward is the recipe's real scorer (shape_quality) slowed by a documented delay: after scoring, it sleeps
`seconds_per_image` x B, chosen so that its whole cost (scoring + delay) is the given fraction of the rollout time
measured first (a calibration run without delay). The delay sleeps, as a reward on another GPU, a reward server or
a judge's API keeps the trainer waiting without using its CPU. Each configuration is a fresh run of --iterations
iterations (evaluation off); the first iteration is a warm-up and is dropped; figures are medians of the rest.

Reported per fraction and mode: seconds per iteration, its rollout / exposed reward / update parts, the reward's
total time (`time/reward_total`), the share of it hidden behind the rollout (1 - time/reward_exposed /
time/reward_total), and the bound max(rollout, reward) + update from the synchronous run's rollout and update.
Writes JSON (--json) and a markdown table (--markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
_SCORERS: dict[str, object] = {}


def slowed(images, prompts, seconds_per_image: float = 0.0, reward: str = "shape_quality"):
    """The registered reward `reward`, then a sleep of seconds_per_image x B (the documented delay)."""
    from mixgrpo.rewards import build_reward

    if reward not in _SCORERS:
        _SCORERS[reward] = build_reward(reward)
    scores = _SCORERS[reward](images, prompts)
    time.sleep(seconds_per_image * len(prompts))
    return scores


def run(config: Path, out: Path, iterations: int, chunks: int, overlap: bool, seconds_per_image: float,
        extra: list[str]) -> dict[str, float]:
    """Medians of the timings of iterations 2..N of a fresh run."""
    from mixgrpo.config import load_config
    from mixgrpo.rundir import read_metrics
    from mixgrpo.train import train

    cfg = load_config(config, [f"run.iterations={iterations}", "eval.num_prompts=0", f"run.checkpoint_every={iterations}",
                               "run.tensorboard=false", f"rollout.chunks={chunks}", f"rollout.reward_overlap={str(overlap).lower()}",
                               f"run.out_dir={out}",
                               f"rewards=[{{name: 'reward_overlap:slowed', args: {{seconds_per_image: "
                               f"{seconds_per_image}}}}}]", *extra])
    train(cfg, progress=False)
    metrics = read_metrics(out)[1:]
    keys = ("time/iteration", "time/rollout", "time/reward", "time/update", "time/reward_total", "time/reward_exposed")
    return {k.removeprefix("time/"): statistics.median(m[k] for m in metrics) for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "mixgrpo.yaml"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                        help="reward cost as a fraction of the rollout's")
    parser.add_argument("--chunks", type=int, default=8, help="rollout_chunks of the overlapped runs")
    parser.add_argument("--iterations", type=int, default=4, help="per run; the first is a warm-up")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the reward "reward_overlap:slowed"

    with tempfile.TemporaryDirectory() as tmp:
        base = run(Path(args.config), Path(tmp) / "calibration", args.iterations, 1, False, 0.0, args.overrides)
        from mixgrpo.config import load_config

        cfg = load_config(args.config, args.overrides)
        images = cfg.rollout.prompts_per_iteration * cfg.rollout.group_size
        print(f"calibration: rollout {base['rollout']:.2f} s, scorer {base['reward_total']:.2f} s, update "
              f"{base['update']:.2f} s for {images} images", flush=True)
        rows = []
        for fraction in args.fractions:
            delay = max(fraction * base["rollout"] - base["reward_total"], 0.0) / images
            result = {"fraction": fraction, "seconds_per_image": delay}
            for mode, chunks, overlap in (("synchronous", 1, False), ("chunked", args.chunks, False),
                                          ("overlapped", args.chunks, True)):
                result[mode] = run(Path(args.config), Path(tmp) / f"{fraction}_{mode}", args.iterations, chunks,
                                   overlap, delay, args.overrides)
                print(f"reward {fraction:.0%} of the rollout, {mode}: {result[mode]}", flush=True)
            sync, over = result["synchronous"], result["overlapped"]
            result["bound"] = max(sync["rollout"], sync["reward_total"]) + sync["update"]
            result["hidden"] = 1 - over["reward_exposed"] / over["reward_total"]
            rows.append(result)

    header = ("| reward / rollout | synchronous s/it (rollout + reward + update) | chunked, not overlapped | "
              "overlapped s/it (rollout + exposed reward + update) | bound max(rollout, reward) + update | reward "
              "total (overlapped) | hidden |\n|---|---|---|---|---|---|---|")
    lines = [header]
    parts = lambda m: f"{m['iteration']:.2f} ({m['rollout']:.2f} + {m['reward']:.2f} + {m['update']:.2f})"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['fraction']:.0%} ({r['seconds_per_image'] * 1000:.1f} ms/image delay) | "
                     f"{parts(r['synchronous'])} | {parts(r['chunked'])} | {parts(r['overlapped'])} | "
                     f"{r['bound']:.2f} | {r['overlapped']['reward_total']:.2f} s | {r['hidden']:.0%} |")
    table = "\n".join(lines)
    note = (f"\n\n{machine()}; {args.config}, {images} images per iteration, overlapped with rollout_chunks = "
            f"{args.chunks}; medians of iterations 2..{args.iterations} of fresh runs.\n")
    print(table + note)
    if args.markdown:
        Path(args.markdown).write_text(table + note, encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({"calibration": base, "rows": rows, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
