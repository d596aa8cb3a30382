"""One GPU check: what the project has never measured on a GPU, in one run of under 8 minutes on one H200.

    python benchmarks/gpu_check.py --prepare     # here, with the project installed: writes .gpu_check/
    bash benchmarks/gpu_check.sh                  # there (torch 2.11, no diffusers): carried wheels, then the check
    python benchmarks/gpu_check.py --smoke       # the whole script on CPU with tiny shapes (gloo), to test it

`--prepare` writes the folder .gpu_check/ (git-ignored; carry it): wheels/ (diffusers, absent on the GPU
machine) and minilm_cache/ (the MiniLM embeddings of the training prompts: the encoder's weights, 88 MB, are
too large to carry, and its outputs for a fixed prompt set never change; `mixgrpo.preprocess`).

The check writes one JSON (--out; default $OUT/gpu_check.json, else .gpu_check/gpu_check.json), rewritten
after every section so that a run cut short keeps what it measured:
- `device`: GPU name, torch version, bf16 and fp32 matrix-product peaks (8192^3, TFLOP/s).
- `main_job`: `configs/mixgrpo.yaml` (the embedded tiny model, 8 x 8 images, guidance 3) on CUDA for a few
  iterations (the first a warm-up), held-out evaluation off, under `precision: auto` and `fp32`: s/it, phases,
  the on-policy ratio error of the first step, and whether the batch-layout probe (`mixgrpo.train.trainer.layouts_agree`)
  found batch-size-dependent kernels (then the old log-probs were re-scored).
- `flux1b`: DanceGRPO, MixGRPO, Flash and Flash* (windows at l = 0, T = 25, 1 prompt x 8 images, micro-batch
  4, full fine-tuning, `precision: auto` = bf16 autocast) on the ~1B-parameter FLUX-architecture transformer of
  benchmarks/fsdp_flux.py at FLUX.1's 512 x 512 interface: s/it, phases, peak memory, update TFLOP/s and its
  share of the measured bf16 peak, the per-call costs and the speed-ups against DanceGRPO with their theory.
- `flux1b_fsdp`: MixGRPO the same under FSDP2 on a real process group of one rank (param_dtype bf16).
Checkpoints and the final export are skipped in this process (they would time the disk: ~13 GB of weights
and optimizer state per checkpoint of the 1B model), so every figure is training time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))  # "gpu_check:..." and "fsdp_flux:..." names resolve to these files
PREPARED = ROOT / ".gpu_check"
FLUX_ALGORITHMS = ["dance_grpo", "mixgrpo", "mixgrpo_flash", "mixgrpo_flash_star"]


def tiny_cached(cache: str):
    """The embedded tiny model with its MiniLM prompt embeddings read from a `mixgrpo preprocess` cache."""
    from mixgrpo.models.tiny import load_tiny
    from mixgrpo.models.text import EmbeddingCache

    text = EmbeddingCache(cache)
    text.max_length = 16  # TinyConfig.text_max_length: the cache was written by that encoder
    return load_tiny(text_encoder=text)


@functools.lru_cache(maxsize=None)
def _random_flux(preset: str):
    from fsdp_flux import random_flux

    return random_flux(preset)


def flux_cached(preset: str = "flux1b"):
    """benchmarks/fsdp_flux.py's random FLUX transformer, initialised once per process (~1B parameters take
    seconds to initialise) and copied for every run."""
    return copy.deepcopy(_random_flux(preset))


@contextlib.contextmanager
def _no_saving():
    from mixgrpo.train import state, trainer

    saved = state.TrainState.save, trainer.export_model
    state.TrainState.save = trainer.export_model = lambda *a, **k: None
    try:
        yield
    finally:
        state.TrainState.save, trainer.export_model = saved


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, n: int, device: torch.device, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e12


def _train(cfg, device: torch.device) -> dict:
    """Train `cfg` (no checkpoints), return the medians over the iterations after the first, the peak memory
    and the first iteration's record."""
    from mixgrpo.rundir import read_metrics
    from mixgrpo.train import train

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with _no_saving():
        train(cfg, progress=False)
    metrics = read_metrics(cfg.out_dir)
    med = lambda k: statistics.median(m[k] for m in metrics[1:])  # noqa: E731
    first = metrics[0]
    return {"seconds_per_iteration": med("time/iteration"), "rollout_s": med("time/rollout"),
            "reward_s": med("time/reward"), "update_s": med("time/update"),
            "model_share": statistics.median((m["time/model_rollout"] + m["time/model_update"]) / m["time/iteration"]
                                             for m in metrics[1:]),
            "rollout_calls": first["model_calls/rollout"], "update_calls": first["model_calls/update"],
            "nfe_rollout": first["nfe_rollout"], "nfe_trained": first["nfe_trained"],
            "precision": first["precision"], "rescored_old_log_probs": first["rescored_old_log_probs"],
            "onpolicy_ratio_error": first["onpolicy_ratio_error"], "clip_fraction": first.get("clip_fraction"),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "iterations_measured": len(metrics) - 1}


def main_job(args, device: torch.device, work: Path) -> dict:
    from mixgrpo.config import load_config

    out = {}
    for precision in ("auto", "fp32"):
        overrides = [f"iterations={args.iterations}", "eval_num_prompts=0", "profile=true", f"precision={precision}",
                     "model.name=gpu_check:tiny_cached", f"model.args={{cache: {args.cache}}}",
                     f"out_dir={work / f'main_{precision}'}", "checkpoint_every=1000000", "tensorboard=false"]
        if args.smoke:
            overrides += ["prompts_per_iteration=2", "group_size=4", "sampler.num_steps=6",
                          "sampler.window.size=2", "micro_batch_size=4"]
        out[precision] = _train(load_config(ROOT / "configs" / "mixgrpo.yaml", overrides), device)
    return out


def _flux_cfg(algorithm: str, args, out_dir: Path, parallel: dict | None = None):
    from mixgrpo.config import build_config
    from mixgrpo.plan import ALGORITHMS

    sampler = {"num_steps": args.steps}
    if ALGORITHMS[algorithm].uses_window:
        sampler["window"] = {"strategy": "frozen", "start": 0, "size": args.window}
    return build_config({
        "algorithm": algorithm, "sampler": sampler,
        "model": {"name": "gpu_check:flux_cached", "args": {"preset": args.preset}},
        "rewards": [{"name": "fsdp_flux:brightness"}],
        "iterations": args.iterations, "prompts_per_iteration": args.prompts, "group_size": args.group,
        "updates_per_iteration": 1, "micro_batch_size": args.micro_batch, "precision": "auto",
        "parallel": parallel or {}, "out_dir": str(out_dir), "checkpoint_every": 10**6, "eval_num_prompts": 0,
        "profile": True, "tensorboard": False,
    })


def call_costs(cfg, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Seconds of one forward at the rollout batch B and of one forward+backward at the micro-batch."""
    from mixgrpo.dtypes import model_precision, resolve_precision
    from mixgrpo.models import cond_to

    model = flux_cached(cfg.model.args["preset"]).to(device)
    model.requires_grad_(True)
    precision = resolve_precision(cfg.precision, device)[0]
    B, mb = cfg.prompts_per_iteration * cfg.group_size, cfg.micro_batch_size
    cond = cond_to(model.encode_prompts(["a photo of a cat"] * B), device)

    def timed(n: int, grad: bool) -> float:
        x = torch.randn(n, *model.latent_shape, device=device)
        sigma = torch.full((n,), 0.5, device=device)
        c = {k: v[:n] for k, v in cond.items()}
        times = []
        for _ in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            with torch.set_grad_enabled(grad):
                with model_precision(device, precision):
                    v = model(x, sigma, c).float()
                if grad:
                    v.square().mean().backward()
            _sync(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:])

    costs = {"forward_batch": timed(B, False), "forward_prefix": timed(cfg.prompts_per_iteration, False),
             "forward_backward": timed(mb, True)}
    model = None  # frees the weights (timed's closure holds the name) before the cache is emptied
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return costs


def flux(args, device: torch.device, work: Path, peak_tflops: float | None, result: dict, save) -> None:
    from fsdp_flux import forward_flops

    from common import theory_seconds
    from mixgrpo.plan import build_plan

    flops = forward_flops("gpu_check:flux_cached", {"preset": args.preset}, device)
    with torch.device("meta"):
        params = sum(p.numel() for p in _random_flux(args.preset).denoiser.parameters())
    section = result.setdefault("flux1b", {"preset": args.preset, "parameters": params,
                                           "forward_gflops_per_sample": flops / 1e9, "runs": {}})
    cfgs = {a: _flux_cfg(a, args, work / f"flux_{a}") for a in FLUX_ALGORITHMS}
    section["call_costs"] = costs = call_costs(cfgs["mixgrpo"], device)
    save()
    for a, cfg in cfgs.items():
        if _out_of_time(args):
            section["skipped"] = section.get("skipped", []) + [a]
            continue
        run = _train(cfg, device)
        transitions = cfg.prompts_per_iteration * cfg.group_size * run["nfe_trained"]
        run["update_tflops"] = flops * 3 * transitions / run["update_s"] / 1e12
        run["update_share_of_bf16_peak"] = run["update_tflops"] / peak_tflops if peak_tflops else None
        run["theory_seconds"] = theory_seconds(build_plan(cfg.sampler, 1, cfg.seed), costs, cfg)
        section["runs"][a] = run
        save()
    base = section["runs"].get("dance_grpo")
    for run in section["runs"].values():
        if base:
            run["speedup"] = base["seconds_per_iteration"] / run["seconds_per_iteration"]
            run["speedup_theory"] = base["theory_seconds"] / run["theory_seconds"]
    save()


def flux_fsdp(args, device: torch.device, work: Path, peak_tflops: float | None, result: dict) -> dict:
    """MixGRPO under FSDP2 on a process group of one rank (torchrun with one process would leave FSDP off:
    mixgrpo.dist starts a group only for WORLD_SIZE > 1)."""
    import torch.distributed as torch_dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("LOCAL_RANK", "0")
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                  rank=0, world_size=1)
    try:
        cfg = _flux_cfg("mixgrpo", args, work / "flux_fsdp", parallel={"strategy": "fsdp", "param_dtype": "bf16"})
        run = _train(cfg, device)
    finally:
        torch_dist.destroy_process_group()
    flops = result["flux1b"]["forward_gflops_per_sample"] * 1e9
    run["update_tflops"] = flops * 3 * args.prompts * args.group * run["nfe_trained"] / run["update_s"] / 1e12
    run["update_share_of_bf16_peak"] = run["update_tflops"] / peak_tflops if peak_tflops else None
    return run


def _out_of_time(args) -> bool:
    return time.perf_counter() - args.start > 60 * args.budget_minutes


def prepare() -> None:
    """Write .gpu_check/: the diffusers wheel and the MiniLM embeddings of the training prompts."""
    import subprocess

    import diffusers

    from mixgrpo.models.tiny import shared_minilm
    from mixgrpo.preprocess import preprocess
    from mixgrpo.prompts import read_prompts

    wheels = PREPARED / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d",
                    str(wheels), f"diffusers=={diffusers.__version__}"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "train.txt"
        prompts.write_text("\n".join(read_prompts("world:train")) + "\n", encoding="utf-8")
        preprocess(prompts, shared_minilm(16), PREPARED / "minilm_cache", source={"model": "tiny (MiniLM)"})
    size = sum(f.stat().st_size for f in PREPARED.rglob("*") if f.is_file())
    print(f"{PREPARED}: {size / 2**20:.1f} MiB (carry it: the working tree that travels is limited to 64 MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--prepare", action="store_true", help="write .gpu_check/ here, then stop")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny shapes, gloo")
    parser.add_argument("--out", help="the JSON (default $OUT/gpu_check.json, else .gpu_check/gpu_check.json)")
    parser.add_argument("--cache", default=str(PREPARED / "minilm_cache"))
    parser.add_argument("--iterations", type=int, default=4, help="per run; the first is a warm-up")
    parser.add_argument("--budget-minutes", type=float, default=6.5, help="start no run after this many minutes")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # one model cache for "gpu_check:..." names
    if args.prepare:
        prepare()
        return
    args.start = time.perf_counter()
    args.preset, args.steps, args.window, args.prompts, args.group, args.micro_batch = (
        ("smoke", 6, 2, 1, 4, 2) if args.smoke else ("flux1b", 25, 4, 1, 8, 4))
    if args.smoke:
        args.iterations = min(args.iterations, 2)
    elif not torch.cuda.is_available():
        raise SystemExit("no GPU: this check measures CUDA; --smoke runs it on CPU with tiny shapes")
    if not Path(args.cache, "index.json").is_file():
        raise SystemExit(f"{args.cache} missing: run `python benchmarks/gpu_check.py --prepare` where the project is "
                         f"installed, and carry .gpu_check/")
    out = Path(args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else PREPARED) / "gpu_check.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    result: dict = {"device": {"name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke)",
                               "torch": torch.__version__}, "errors": {}}

    def save() -> None:
        result["seconds"] = time.perf_counter() - args.start
        out.write_text(json.dumps(result, indent=1))

    peak = None
    if device.type == "cuda":
        peak = result["device"]["bf16_tflops_8192"] = matmul_tflops(torch.bfloat16, 8192, device)
        result["device"]["fp32_tflops_8192"] = matmul_tflops(torch.float32, 8192, device)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for name, fn in (("main_job", lambda: main_job(args, device, work)),
                     ("flux1b", lambda: flux(args, device, work, peak, result, save)),
                     ("flux1b_fsdp", lambda: flux_fsdp(args, device, work, peak, result))):
        if _out_of_time(args):
            result["errors"][name] = f"skipped: past the {args.budget_minutes}-minute budget"
            continue
        try:
            value = fn()
            if value is not None:
                result[name] = value
        except Exception as e:  # one failed section must not lose the others' figures
            import traceback

            result["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
        save()
        print(f"{name} done at {time.perf_counter() - args.start:.0f} s", flush=True)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
