"""The paper's Table 1 in miniature (issue 31, item 5): every method on the main job's reward, the same training
wall-clock each, several seeds, run `--jobs` at a time with one thread each; a driver of benchmarks/quality.py.

    python benchmarks/table1.py                              # train what is missing (resumable), evaluate, report
    python benchmarks/table1.py --minutes 1 --seeds 0 --methods dance_grpo v_grpo --out /tmp/t1   # a smoke run

Methods (`METHODS`): DanceGRPO, Flow-GRPO, MixGRPO, MixGRPO-Flash, MixGRPO-Flash*, DiffusionNFT and V-GRPO, the
last two also on Flash* rollouts; each is its recipe in configs/ (the main job's model, rewards, prompts, batch and
learning rate). The (method, seed) runs are dealt round-robin to `--jobs` chains, each one `quality.py
--train-only` process with OMP_NUM_THREADS=1 (default 2 chains: a 2-core machine runs two runs side by side, so
every run shares the machine with one other); then one `quality.py` invocation evaluates every checkpoint on the
held-out prompts (the same noise for every checkpoint and method) and writes OUT/quality.{json,md} and the plots
of `--metric` against training minutes (equal wall-clock) and iterations (equal iterations), with the first
minute each method's seed mean reaches DanceGRPO's final one. The texture guard (color_purity) and the other
rewards are in quality.json; seconds per iteration and model calls in each run's metrics.jsonl (profile: true).

Stop it at any moment (Ctrl-C) and run the same command again: finished runs are reused, an interrupted one
resumes bit-exactly from its last checkpoint with what is left of its time budget, and the evaluation of a run is
cached beside it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUALITY = ROOT / "benchmarks" / "quality.py"
FLASH_STAR = ["algorithm=mixgrpo_flash_star", "rollout.shared_noise=true"]
METHODS: dict[str, tuple[str, list[str]]] = {
    "dance_grpo": ("dance_grpo", []),
    "flow_grpo": ("flow_grpo", []),
    "mixgrpo": ("mixgrpo", []),
    "mixgrpo_flash": ("mixgrpo_flash", []),
    "mixgrpo_flash_star": ("mixgrpo_flash_star", []),
    "diffusion_nft": ("diffusion_nft", []),
    "diffusion_nft_flash_star": ("diffusion_nft", FLASH_STAR),
    "v_grpo": ("v_grpo", []),
    "v_grpo_flash_star": ("v_grpo", FLASH_STAR),
}
"""method -> (recipe in configs/, overrides)."""


def method_args(methods: list[str]) -> list[str]:
    """quality.py's --algorithms (a recipe as it is) and --variant (a recipe with overrides) for `methods`."""
    plain = [m for m in methods if METHODS[m] == (m, [])]
    out = ["--algorithms", *plain]  # none: only the variants
    for m in methods:
        if m not in plain:
            recipe, extra = METHODS[m]
            out += ["--variant", m, recipe, *extra]
    return out


def main() -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget per run (equal wall-clock)")
    p.add_argument("--checkpoint-every", type=int, default=4, help="evaluation points (and what a stop may lose)")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    p.add_argument("--metric", default="shape_quality", help="the main job's trained reward")
    p.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt (all 106 prompts)")
    p.add_argument("--out", default="runs/table1")
    args = p.parse_args()
    common = ["--minutes", str(args.minutes), "--checkpoint-every", str(args.checkpoint_every), "--metric",
              args.metric, "--eval-images", str(args.eval_images), "--out", args.out, "--threads", "1", "--quiet",
              "--override", "run.profile=true", "run.tensorboard=false"]
    runs = [(m, s) for m in args.methods for s in args.seeds]
    chains = [runs[j::args.jobs] for j in range(args.jobs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    procs = []
    for chain in (c for c in chains if c):
        # one quality.py per (method, seed) in turn, so a chain holds exactly its own runs
        script = " && ".join(subprocess.list2cmdline([sys.executable, str(QUALITY), *method_args([m]), "--seeds",
                                                      str(s), "--train-only", *common]) for m, s in chain)
        procs.append(subprocess.Popen(script, shell=True, cwd=ROOT, env=env))
    codes = [proc.wait() for proc in procs]
    if any(codes):
        raise SystemExit(f"a training chain failed (exit codes {codes}): its output is above; rerun to resume")
    subprocess.run([sys.executable, str(QUALITY), *method_args(args.methods), "--seeds", *map(str, args.seeds),
                    *common], cwd=ROOT, env=env, check=True)


if __name__ == "__main__":
    main()
