"""One GPU check: what the project has never measured on a GPU, in one run well inside 8 minutes on one H100.

    python benchmarks/gpu_check.py --prepare     # here, with the project installed: writes .gpu_check/
    bash benchmarks/gpu_check.sh                  # there (torch 2.11, no diffusers): carried wheels, then the check
    python benchmarks/gpu_check.py --smoke       # the whole script on CPU with tiny shapes (gloo), to test it

`--prepare` writes the folder .gpu_check/ (git-ignored; carry it): wheels/ (diffusers, absent on the GPU
machine) and minilm_cache/ (the MiniLM embeddings of the training prompts: the encoder's weights, 88 MB, are
too large to carry, and its outputs for a fixed prompt set never change; `mixgrpo.preprocess`).

The check writes one JSON (--out; default $OUT/gpu_check.json, else .gpu_check/gpu_check.json), rewritten
after every section so that a run cut short keeps what it measured; `--sections` runs some of them. In order:
- `device`: GPU name, torch version, bf16 and fp32 matrix-product peaks (8192^3, TFLOP/s).
- `adapters`: every model adapter (FLUX.1, SD3.5, FLUX.2, Qwen-Image, Wan, and the editing / image-to-video
  FLUX.1-Kontext, Qwen-Image-Edit, Wan I2V) on its tiny random pipeline
  (tests/tiny_pipelines.py) rebuilt at 2 heads of the real model's head size x MixGRPO, Flash* and
  DiffusionNFT x LoRA and full, one iteration each: ok, s/iteration, peak memory, or the error.
- `determinism`: `deterministic: true` twice (bit-equal?) and the default twice, with the cost in s/iteration.
- `flux_block`: a FLUX-architecture transformer at FLUX.1's width (3072), bf16 autocast: rollout and update
  calls, eager / torch.compile x gradient checkpointing off / on: seconds, TFLOP/s, MFU, peak memory.
- `flux1b_fsdp`: MixGRPO on the ~1B-parameter FLUX transformer of benchmarks/fsdp_flux.py under FSDP2 on a
  real process group of one rank (param_dtype bf16).
- `main_job`: `configs/mixgrpo.yaml` (the embedded tiny model, 8 x 8 images, guidance 3) on CUDA for a few
  iterations (the first a warm-up), held-out evaluation off, under `precision: auto` and `fp32`: s/it, phases,
  the on-policy ratio error of the first step, and whether the batch-layout probe (`layouts_agree`) found
  batch-size-dependent kernels (then the old log-probs were re-scored).
- `flux1b`: DanceGRPO, MixGRPO, Flash and Flash* (windows at l = 0, T = 25, 1 prompt x 8 images, micro-batch
  4, full fine-tuning, `precision: auto` = bf16 autocast) on the 1B transformer at FLUX.1's 512 x 512
  interface: s/it, phases, peak memory, update TFLOP/s and its share of the measured bf16 peak, the per-call
  costs and the speed-ups against DanceGRPO with their theory, as far as the budget allows.
Checkpoints and exports are skipped (they would time the disk), except in `determinism`, which compares the
exported weights, so every other figure is training time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
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
sys.path.insert(0, str(ROOT / "tests"))  # tiny_pipelines: the tiny random pipelines of every model adapter
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


def _train(cfg, device: torch.device, warmup: bool = True, export: bool = False) -> dict:
    """Train `cfg` (no checkpoints; no export unless `export`), return the medians over the iterations (after the
    first when `warmup`: it compiles kernels and fills caches), the peak memory and the first iteration's record
    (the model-call figures need profile: true)."""
    from mixgrpo.rundir import read_metrics
    from mixgrpo.train import train

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with contextlib.nullcontext() if export else _no_saving():
        train(cfg, progress=False)
    metrics = read_metrics(cfg.run.out_dir)
    measured = metrics[1:] if warmup and len(metrics) > 1 else metrics
    med = lambda k: statistics.median(m[k] for m in measured)  # noqa: E731
    first = metrics[0]
    out = {"seconds_per_iteration": med("time/iteration"), "rollout_s": med("time/rollout"),
           "reward_s": med("time/reward"), "update_s": med("time/update"), "grad_norm": first["grad_norm"],
           "nfe_rollout": first["nfe_rollout"], "nfe_trained": first["nfe_trained"],
           "precision": first["precision"], "rescored_old_log_probs": first["rescored_old_log_probs"],
           "onpolicy_ratio_error": first["onpolicy_ratio_error"], "clip_fraction": first.get("clip_fraction"),
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
           "iterations_measured": len(measured)}
    if "time/model_rollout" in first:
        out.update(model_share=statistics.median((m["time/model_rollout"] + m["time/model_update"])
                                                 / m["time/iteration"] for m in measured),
                   rollout_calls=first["model_calls/rollout"], update_calls=first["model_calls/update"])
    return out


def main_job(args, device: torch.device, work: Path) -> dict:
    from mixgrpo.config import load_config

    out = {}
    for precision in ("auto", "fp32"):
        overrides = [f"run.iterations={args.iterations}", "eval.num_prompts=0", "run.profile=true", f"run.precision={precision}",
                     "model.name=gpu_check:tiny_cached", f"model.args={{cache: {args.cache}}}",
                     f"run.out_dir={work / f'main_{precision}'}", "run.checkpoint_every=1000000", "run.tensorboard=false"]
        if args.smoke:
            overrides += ["rollout.prompts_per_iteration=2", "rollout.group_size=4", "sampler.num_steps=6",
                          "sampler.window.size=2", "update.micro_batch_size=4"]
        out[precision] = _train(load_config(ROOT / "configs" / "mixgrpo.yaml", overrides), device)
    return out


def _flux_cfg(algorithm: str, args, out_dir: Path, parallel: dict | None = None):
    from mixgrpo.config import build_config
    from mixgrpo.plan import ALGORITHMS

    sampler = {"num_steps": args.steps}
    if ALGORITHMS[algorithm].uses_window:
        sampler["window"] = {"strategy": "frozen", "start": 0, "size": args.window}
    return build_config({"algorithm": algorithm, "sampler": sampler, "model": {"name": "gpu_check:flux_cached", "args": {"preset": args.preset}}, "rewards": [{"name": "fsdp_flux:brightness"}], "run": {"iterations": args.iterations, "precision": "auto", "out_dir": str(out_dir), "checkpoint_every": 10**6, "profile": True, "tensorboard": False}, "rollout": {"prompts_per_iteration": args.prompts, "group_size": args.group}, "update": {"steps_per_epoch": 1, "micro_batch_size": args.micro_batch}, "parallel": parallel or {}, "eval": {"num_prompts": 0}})


def call_costs(cfg, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Seconds of one forward at the rollout batch B and of one forward+backward at the micro-batch."""
    from mixgrpo.dtypes import model_precision, resolve_precision
    from mixgrpo.models import cond_to

    model = flux_cached(cfg.model.args["preset"]).to(device)
    model.requires_grad_(True)
    precision = resolve_precision(cfg.run.precision, device)[0]
    B, mb = cfg.rollout.prompts_per_iteration * cfg.rollout.group_size, cfg.update.micro_batch_size
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

    costs = {"forward_batch": timed(B, False), "forward_prefix": timed(cfg.rollout.prompts_per_iteration, False),
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
        transitions = cfg.rollout.prompts_per_iteration * cfg.rollout.group_size * run["nfe_trained"]
        run["update_tflops"] = flops * 3 * transitions / run["update_s"] / 1e12
        run["update_share_of_bf16_peak"] = run["update_tflops"] / peak_tflops if peak_tflops else None
        run["theory_seconds"] = theory_seconds(build_plan(cfg.sampler, 1, cfg.run.seed), costs, cfg)
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
    from fsdp_flux import forward_flops

    flops = forward_flops("gpu_check:flux_cached", {"preset": args.preset}, device)
    run["update_tflops"] = flops * 3 * args.prompts * args.group * run["nfe_trained"] / run["update_s"] / 1e12
    run["update_share_of_bf16_peak"] = run["update_tflops"] / peak_tflops if peak_tflops else None
    return run


# --------------------------------------------------------------------------------------------------
# every model adapter x MixGRPO, Flash* and DiffusionNFT, LoRA and full, at the real models' head sizes

# adapter -> (tiny pipeline writer in tests/tiny_pipelines.py, model args, guidance scale, the real model's
# attention head size: FLUX.1, FLUX.2, Qwen-Image and Wan 2.x 128; SD3.5 64)
ADAPTERS = {
    "flux": ("save_tiny_flux", {"height": 32, "width": 32, "max_sequence_length": 24}, 1.0, 128),
    "sd3": ("save_tiny_sd3", {"height": 32, "width": 32, "max_sequence_length": 24}, 4.5, 64),
    "flux2": ("save_tiny_flux2", {"height": 32, "width": 32, "max_sequence_length": 160}, 4.0, 128),
    "qwen_image": ("save_tiny_qwen_image", {"height": 64, "width": 64, "max_sequence_length": 200}, 4.0, 128),
    "wan": ("save_tiny_wan", {"height": 64, "width": 64, "num_frames": 5, "max_sequence_length": 24}, 5.0, 128),
    "flux_kontext": ("save_tiny_flux_kontext", {"height": 32, "width": 32, "max_sequence_length": 24}, 1.0, 128),
    "qwen_image_edit": ("save_tiny_qwen_image_edit", {"height": 64, "width": 64, "max_sequence_length": 512,
                                                      "condition_area": 56 * 56, "reference_area": 64 * 64}, 4.0, 128),
    "wan_i2v": ("save_tiny_wan_i2v", {"height": 64, "width": 64, "num_frames": 5, "max_sequence_length": 24}, 5.0,
                128),
}
# algorithm preset, objective
ADAPTER_ALGORITHMS = {"mixgrpo": ("mixgrpo", "grpo"), "flash_star": ("mixgrpo_flash_star", "grpo"),
                      "diffusion_nft": ("ode", "diffusion_nft")}


def with_head_size(pipeline_dir: Path, head_dim: int, heads: int = 2) -> dict:
    """Replace the tiny pipeline's transformer by a random one of the same class at `heads` x `head_dim` (the
    rotary axes scaled with it, SD3's caption projection kept at the inner width); returns its config."""
    import diffusers

    path = pipeline_dir / "transformer"
    config = json.loads((path / "config.json").read_text())
    scale = head_dim // config["attention_head_dim"]
    config.update(attention_head_dim=head_dim, num_attention_heads=heads)
    if config.get("axes_dims_rope"):
        config["axes_dims_rope"] = [a * scale for a in config["axes_dims_rope"]]
    if "caption_projection_dim" in config:
        config["caption_projection_dim"] = heads * head_dim
    if config.get("added_kv_proj_dim"):  # Wan 2.1 I2V's image cross-attention takes the inner width
        config["added_kv_proj_dim"] = heads * head_dim
    cls = getattr(diffusers, config["_class_name"])
    torch.manual_seed(0)
    cls.from_config({k: v for k, v in config.items() if not k.startswith("_")}).save_pretrained(path)
    return config


def adapter_prompts(work: Path, name: str, model_args: dict) -> Path:
    """The prompt file of an adapter's runs: two prompts, each with a random input image of the model's size for an
    editing / image-to-video model (a JSONL example file)."""
    from PIL import Image

    from mixgrpo.models import MODELS

    prompts = ["a red cube on a table", "two blue spheres"]
    if not MODELS.spec(name).image_inputs:
        (work / "adapter_prompts.txt").write_text("\n".join(prompts) + "\n")
        return work / "adapter_prompts.txt"
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, prompt in enumerate(prompts):
        pixels = torch.randint(0, 256, (model_args["height"], model_args["width"], 3), generator=g, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(work / f"adapter_input_{i}.png")
        lines.append(json.dumps({"prompt": prompt, "images": [f"adapter_input_{i}.png"]}))
    (work / "adapter_examples.jsonl").write_text("\n".join(lines) + "\n")
    return work / "adapter_examples.jsonl"


def adapter_runs(args, device: torch.device, work: Path, result: dict, save) -> None:
    """One iteration of each adapter x algorithm x (LoRA rank 4, full): ok, s/iteration, peak memory, or the
    error. The --smoke run keeps every adapter with MixGRPO in full, and every algorithm with LoRA on FLUX."""
    import tiny_pipelines

    from mixgrpo.config import build_config

    section = result.setdefault("adapters", {})
    for name, (writer, model_args, scale, head_dim) in ADAPTERS.items():
        if _out_of_time(args):
            section.setdefault("skipped", []).append(name)
            continue
        try:
            directory = getattr(tiny_pipelines, writer)(work / f"pipe_{name}")
            section.setdefault("head_dims", {})[name] = with_head_size(directory, head_dim)["attention_head_dim"]
        except Exception as e:  # noqa: BLE001  (one adapter's failure is a finding, not the end of the check)
            section[name] = {"error": f"building the pipeline: {type(e).__name__}: {e}"}
            continue
        prompts = adapter_prompts(work, name, model_args)
        for label, (algorithm, objective) in ADAPTER_ALGORITHMS.items():
            for lora in (4, 0):
                if args.smoke and not ((label == "mixgrpo" and lora == 0) or (name == "flux" and lora)):
                    continue
                key = f"{label}_{'lora' if lora else 'full'}"
                cfg = build_config({"algorithm": algorithm, "objective": objective, "rollout": {"shared_noise": objective == "grpo", "prompts": str(prompts), "guidance_scale": scale, "prompts_per_iteration": 2, "group_size": 2}, "sampler": {"num_steps": 6, **({"window": {"size": 2}} if algorithm == "mixgrpo" else {})}, "model": {"name": name, "args": {"path": str(directory), "dtype": "float32", **model_args}}, "rewards": [{"name": "fsdp_flux:brightness"}], "run": {"iterations": 1, "precision": "auto", "out_dir": str(work / f"adapter_{name}_{key}"), "checkpoint_every": 10**6, "tensorboard": False}, "update": {"steps_per_epoch": 1, "micro_batch_size": 4}, "optim": {"lr": 1e-3}, "eval": {"num_prompts": 0}, "lora": {"rank": lora}})
                try:
                    run = _train(cfg, device, warmup=False)
                    section.setdefault(name, {})[key] = {
                        "ok": run["grad_norm"] > 0 and math.isfinite(run["grad_norm"]), **{
                            k: run[k] for k in ("seconds_per_iteration", "peak_memory_gib", "grad_norm", "precision")}}
                except Exception as e:  # noqa: BLE001
                    section.setdefault(name, {})[key] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                save()


# --------------------------------------------------------------------------------------------------
# deterministic: true (docs/reproducibility.md)


def determinism(args, device: torch.device, work: Path) -> dict:
    """The tiny FLUX pipeline at FLUX.1's head size, 3 iterations of MixGRPO in bf16, twice with
    `deterministic: true` (must be bit-equal) and twice without (equal or not: the finding), with s/iteration
    of each: the cost of deterministic kernels."""
    import tiny_pipelines
    from safetensors.torch import load_file

    from mixgrpo.config import build_config

    directory = tiny_pipelines.save_tiny_flux(work / "pipe_determinism")
    with_head_size(directory, 128)
    prompts = work / "determinism_prompts.txt"
    prompts.write_text("a red cube on a table\ntwo blue spheres\na green cone\n")
    out = {}
    for deterministic in (True, False):
        weights, seconds = [], []
        for i in range(2):
            cfg = build_config({"algorithm": "mixgrpo", "sampler": {"num_steps": 6, "window": {"size": 2}}, "model": {"name": "flux", "args": {"path": str(directory), "dtype": "float32",
                                                   **ADAPTERS["flux"][1]}}, "rewards": [{"name": "fsdp_flux:brightness"}], "rollout": {"prompts": str(prompts), "prompts_per_iteration": 2, "group_size": 4}, "run": {"iterations": 3, "precision": "fp32" if args.smoke else "bf16", "deterministic": deterministic, "out_dir": str(work / f"determinism_{deterministic}_{i}"), "checkpoint_every": 10**6, "tensorboard": False}, "update": {"steps_per_epoch": 2, "micro_batch_size": 4}, "optim": {"lr": 1e-3}, "eval": {"num_prompts": 0}})
            run = _train(cfg, device, export=True)
            seconds.append(run["seconds_per_iteration"])
            weights.append({f"{f.name}/{k}": v for f in sorted((Path(cfg.run.out_dir) / "final").rglob("*.safetensors"))
                            for k, v in load_file(str(f)).items()})
        a, b = weights
        out["deterministic" if deterministic else "default"] = {
            "bit_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
            "max_abs_difference": max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
            "seconds_per_iteration": statistics.median(seconds)}
    out["slowdown"] = out["deterministic"]["seconds_per_iteration"] / out["default"]["seconds_per_iteration"]
    return out


# --------------------------------------------------------------------------------------------------
# a FLUX-like transformer at FLUX.1's width: rollout and update MFU, eager or compiled, with or without
# gradient checkpointing

FLUX_BLOCK = dict(num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
                  joint_attention_dim=4096, pooled_projection_dim=768, text_tokens=512, latent=(16, 64, 64),
                  patch=2, guidance=3.5, axes_dims_rope=(16, 56, 56))  # FLUX.1's width 3072 at 512 x 512 px


def block_mfu(args, device: torch.device, peak_tflops: float | None, result: dict, save) -> None:
    """Seconds, peak memory and model FLOP utilisation (achieved / the measured bf16 peak) of one rollout call
    (no grad, batch 8) and one update call (forward + backward, micro-batch 4) of the FLUX-like transformer in
    bf16 autocast, for eager / torch.compile x gradient checkpointing off / on. The FLOPs are counted once by
    torch.utils.flop_counter (backward = 2 x forward; checkpointing's recomputation is not counted as work)."""
    import fsdp_flux
    from torch.utils.flop_counter import FlopCounterMode

    from mixgrpo.dtypes import model_precision

    fsdp_flux.PRESETS["flux_block"] = fsdp_flux.SMOKE if args.smoke else FLUX_BLOCK
    section = result.setdefault("flux_block", {"preset": "smoke" if args.smoke else FLUX_BLOCK, "variants": {}})
    model = fsdp_flux.random_flux("flux_block").to(device)
    section["parameters"] = sum(p.numel() for p in model.denoiser.parameters())
    rollout_batch, micro_batch = (2, 2) if args.smoke else (8, 4)
    cond_all = {k: v.to(device) for k, v in model.encode_prompts(["a photo of a cat"] * rollout_batch).items()}

    def inputs(n: int):
        return (torch.randn(n, *model.latent_shape, device=device), torch.full((n,), 0.5, device=device),
                {k: v[:n] for k, v in cond_all.items()})

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs(1))
    flops = float(counter.get_total_flops())
    section["forward_gflops_per_sample"] = flops / 1e9
    plain_forward = model.denoiser.forward
    for compiled in (False, True):
        for checkpointing in (False, True):
            key = f"{'compiled' if compiled else 'eager'}{'_checkpointing' if checkpointing else ''}"
            if _out_of_time(args) or (compiled and args.smoke):  # compiling on CPU takes minutes: not in smoke
                continue
            model.denoiser.forward = plain_forward
            if checkpointing:
                model.denoiser.enable_gradient_checkpointing()
            else:
                model.denoiser.disable_gradient_checkpointing()
            if compiled:
                torch._dynamo.reset()
                model.denoiser.forward = torch.compile(plain_forward)
            try:
                row = {}
                for phase, n, grad in (("rollout", rollout_batch, False), ("update", micro_batch, True)):
                    model.train(grad)
                    x, sigma, cond = inputs(n)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    for _ in range(4 if args.smoke else 6):  # the first call warms up (and compiles)
                        _sync(device)
                        t = time.perf_counter()
                        with torch.set_grad_enabled(grad), model_precision(device, "bf16"):
                            v = model(x, sigma, cond).float()
                            if grad:
                                v.square().mean().backward()
                        _sync(device)
                        times.append(time.perf_counter() - t)
                    seconds = statistics.median(times[1:])
                    work_flops = flops * n * (3 if grad else 1)
                    row[phase] = {"seconds": seconds, "first_call_seconds": times[0],
                                  "tflops": work_flops / seconds / 1e12,
                                  "mfu": work_flops / seconds / 1e12 / peak_tflops if peak_tflops else None,
                                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30
                                  if device.type == "cuda" else None}
                    model.zero_grad(set_to_none=True)
                section["variants"][key] = row
            except Exception as e:  # noqa: BLE001  (compile can fail on a new torch: a finding)
                section["variants"][key] = {"error": f"{type(e).__name__}: {e}"[:500]}
            save()
    model.denoiser.forward = plain_forward
    model = None  # frees the weights (inputs' closure holds the name)
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
    parser.add_argument("--sections", nargs="*", help="run only these sections (default: all, in order: adapters, "
                                                      "determinism, flux_block, flux1b_fsdp, main_job, flux1b)")
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
    if not Path(args.cache, "index.json").is_file() and (not args.sections or "main_job" in args.sections):
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
    sections = (("adapters", lambda: adapter_runs(args, device, work, result, save)),
                ("determinism", lambda: determinism(args, device, work)),
                ("flux_block", lambda: block_mfu(args, device, peak, result, save)),
                ("flux1b_fsdp", lambda: flux_fsdp(args, device, work, peak, result)),
                ("main_job", lambda: main_job(args, device, work)),
                ("flux1b", lambda: flux(args, device, work, peak, result, save)))
    for name, fn in sections:
        if args.sections and name not in args.sections:
            continue
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
