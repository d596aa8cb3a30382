"""Byte-identical runs: fixed-seed short runs of the embedded recipes, hashed, to prove a refactoring changes nothing.

Every objective (GRPO, DiffusionNFT, AWM) and every sampler preset (MixGRPO, Flash, Flash*, Flow-GRPO, DanceGRPO,
the ODE plan) trains for 2 iterations on a tiny batch through the real command (`python -m mixgrpo train`), plus
variants for the paths the recipes leave off (KL to the base, EMA, LoRA, micro-batches of 1 with the old log-probs
re-scored, a resumed run). Each run directory's files that must not depend on the clock are hashed with sha256:
metrics.jsonl and summary.md without their timings, eval.jsonl, config.yaml, the checkpoints (weights, optimizer,
state), final/, the sample grids and reward_curve.png; not eval_curve.png, whose second panel plots against training
minutes. Python's string hashing is fixed (PYTHONHASHSEED=0): peft writes LoRA target modules from a set into the
LoRA export's metadata, in an order that varies from process to process otherwise; and that export's metadata keys
are hashed in sorted order, since safetensors writes them in an order of its own (`_safetensors_bytes`).

    OMP_NUM_THREADS=1 python benchmarks/identical_runs.py --record   # on the code before the change
    OMP_NUM_THREADS=1 python benchmarks/identical_runs.py            # after: exits 1 and names every file that differs

The hashes live in benchmarks/results/identical_runs.json, with the commit and the machine that recorded them.
They are exact only on the same machine, torch build and thread count (fp32 everywhere; a CPU with other SIMD
units may round differently): record and check on one machine. About 3 minutes on one thread of a 2-core AMD EPYC.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "identical_runs.json"

SMALL = ["run.iterations=2", "rollout.prompts_per_iteration=2", "rollout.group_size=4", "update.micro_batch_size=4", "eval.num_prompts=2",
         "eval.every=1", "run.checkpoint_every=1", "run.keep_checkpoints=2", "run.precision=fp32", "run.tensorboard=false"]
"""A 2-iteration run of 2 prompts x 4 images, evaluated and checkpointed after each iteration, in fp32."""

RUNS: dict[str, tuple[str, list[str]]] = {
    "mixgrpo": ("mixgrpo", []),
    "mixgrpo_flash": ("mixgrpo_flash", []),
    "mixgrpo_flash_star": ("mixgrpo_flash_star", []),
    "flow_grpo": ("flow_grpo", []),
    "dance_grpo": ("dance_grpo", []),
    "diffusion_nft": ("diffusion_nft", []),
    "awm": ("awm", []),
    "awm_flash_star": ("awm", ["algorithm=mixgrpo_flash_star", "rollout.shared_noise=true", "matching.sampler_decay=0.5"]),
    "mixgrpo_kl_ema_lora": ("mixgrpo", ["loss.kl_beta=0.01", "optim.ema_decay=0.9", "lora.rank=4"]),
    "flow_grpo_micro1": ("flow_grpo", ["update.micro_batch_size=1"]),
    "nft_micro1_k2": ("diffusion_nft", ["update.micro_batch_size=1", "matching.sigmas_per_sample=2"]),
}
"""name -> (shipped recipe, overrides on top of SMALL)."""

RESUMED = "mixgrpo_resumed"
"""The mixgrpo run stopped after iteration 1 and resumed to 2: its files must equal the uninterrupted run's."""

TIMING_PREFIXES = ("time/", "memory/")


def _metrics_without_timings(path: Path) -> bytes:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [{k: v for k, v in row.items() if not k.startswith(TIMING_PREFIXES)} for row in rows]
    return "\n".join(json.dumps(row, sort_keys=True) for row in rows).encode()


def _summary_without_timings(path: Path) -> bytes:
    return "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                     if "seconds" not in line and " s/it" not in line).encode()


def _safetensors_bytes(path: Path) -> bytes:
    """A .safetensors file as hashed: as written, unless its header's metadata has several keys, whose order the
    writer (a Rust hash map) varies from process to process: then with the header's keys sorted (the tensor bytes
    and their offsets as written)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    if len(header.get("__metadata__") or {}) <= 1:
        return data
    return json.dumps(header, sort_keys=True).encode() + data[8 + n:]


def hash_run(run_dir: Path) -> dict[str, str]:
    """sha256 of every deterministic file of a run directory, by path relative to it."""
    hashes = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(run_dir).as_posix()
        if rel in (".lock", "eval_curve.png") or rel.startswith("tensorboard/"):
            continue
        if rel == "metrics.jsonl":
            data = _metrics_without_timings(path)
        elif rel == "summary.md":
            data = _summary_without_timings(path)
        elif rel.endswith(".safetensors"):
            data = _safetensors_bytes(path)
        else:
            data = path.read_bytes()
        hashes[rel] = hashlib.sha256(data).hexdigest()
    return hashes


def _train(workdir: Path, recipe: str, overrides: list[str], out: str, resume: bool = False) -> None:
    cmd = [sys.executable, "-m", "mixgrpo", "train", "--config", recipe, "--quiet", *(["--resume"] if resume else []),
           *SMALL, *overrides, f"run.out_dir={out}"]
    # the package of this checkout, whatever is installed: run this file from another checkout to hash its code
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")


def run_all(workdir: Path, only: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Train every run (or those named in `only`) under workdir; name -> {file: sha256}."""
    out = {}
    for name, (recipe, overrides) in RUNS.items():
        if only and name not in only:
            continue
        print(f"{name}: {recipe} {' '.join(overrides)}", flush=True)
        _train(workdir, recipe, overrides, f"runs/{name}")
        out[name] = hash_run(workdir / "runs" / name)
    if not only or RESUMED in only:
        print(f"{RESUMED}: mixgrpo, stopped after iteration 1 and resumed", flush=True)
        # the same out_dir string as the uninterrupted run, so that config.yaml and state.json compare equal
        (workdir / "resumed").mkdir()
        _train(workdir / "resumed", "mixgrpo", ["run.iterations=1"], "runs/mixgrpo")
        _train(workdir / "resumed", "mixgrpo", [], "runs/mixgrpo", resume=True)
        out[RESUMED] = hash_run(workdir / "resumed" / "runs" / "mixgrpo")
    return out


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def compare(expected: dict[str, dict[str, str]], got: dict[str, dict[str, str]]) -> list[str]:
    """One line per run or file whose hash differs, is missing or is new."""
    problems = []
    for name in sorted(set(expected) | set(got)):
        if name not in got or name not in expected:
            problems.append(f"{name}: {'not run' if name not in got else 'not recorded'}")
            continue
        for rel in sorted(set(expected[name]) | set(got[name])):
            a, b = expected[name].get(rel), got[name].get(rel)
            if a != b:
                problems.append(f"{name}/{rel}: " + ("missing" if b is None else "new file" if a is None else "differs"))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help=f"write the hashes to {RESULTS.relative_to(ROOT)}")
    parser.add_argument("--only", nargs="+", metavar="RUN", help=f"these runs only: {', '.join([*RUNS, RESUMED])}")
    parser.add_argument("--keep", metavar="DIR", help="train under DIR and keep the run directories (default: a "
                                                      "temporary directory, deleted)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine

    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=False)
        got = run_all(Path(args.keep), args.only)
    else:
        with tempfile.TemporaryDirectory(prefix="identical_runs_") as tmp:
            got = run_all(Path(tmp), args.only)
    if RESUMED in got and "mixgrpo" in got:
        resumed = compare({"mixgrpo": got["mixgrpo"]}, {"mixgrpo": got[RESUMED]})
        print("resumed run equals the uninterrupted one" if not resumed else
              "resumed run differs from the uninterrupted one: " + "; ".join(resumed))
    if args.record:
        dirty = " (with uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else ""
        RESULTS.write_text(json.dumps({"commit": _git("rev-parse", "HEAD") + dirty, "machine": machine(),
                                       "runs": got}, indent=1) + "\n", encoding="utf-8")
        print(f"recorded {sum(map(len, got.values()))} hashes of {len(got)} runs in {RESULTS}")
        return 0
    recorded = json.loads(RESULTS.read_text(encoding="utf-8"))
    expected = {k: v for k, v in recorded["runs"].items() if not args.only or k in args.only}
    problems = compare(expected, got)
    for line in problems:
        print(line)
    print(f"{'DIFFERENT' if problems else 'identical'}: {sum(map(len, got.values()))} hashes of {len(got)} runs "
          f"against those recorded at {recorded['commit'][:12]}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
