"""FSDP2 benchmark: GRPO training of FLUX-architecture transformers sharded over the GPUs of a node.

    torchrun --nproc_per_node 1 benchmarks/fsdp_flux.py --model flux1b            # one H100
    torchrun --nproc_per_node 8 benchmarks/fsdp_flux.py --model flux1b --prompts 2
    torchrun --nproc_per_node 1 benchmarks/fsdp_flux.py --model tiny               # the embedded default
    torchrun --nproc_per_node 2 benchmarks/fsdp_flux.py --model smoke --device-check off   # CPU/gloo smoke run

Models (random weights, built from a config; nothing is downloaded):
- `flux1b`: a FluxTransformer2DModel of about 1B parameters (12 heads x 128 = 1536 wide, 6 double-stream
  + 12 single-stream blocks, guidance embedding) at FLUX.1's interface: 512 x 512 images as 16 x 64 x 64
  latents in 2 x 2 patches (1024 image tokens), 512 text tokens of width 4096 (T5-XXL) and a pooled width
  768 (CLIP-L), from a random text encoder (a fixed random embedding per prompt). No VAE: the "image" the
  reward sees is the first three latent channels, which costs nothing next to the transformer.
- `tiny`: the embedded default architecture (mixgrpo.models.tiny, random weights, MiniLM text encoder).
- `smoke`: a 2-block FLUX transformer small enough for a CPU check of this script.

Each run trains `--iterations` MixGRPO iterations (the first is a warm-up and not reported) through the real
trainer with parallel.strategy=fsdp and param_dtype bf16, and reports the median seconds per iteration and
per phase (rollout, reward, update), the peak GPU memory of rank 0, and the achieved TFLOP/s of the update
phase per GPU: (forward FLOPs of one sample, counted by torch.utils.flop_counter) x 3 (forward + backward;
4 with gradient checkpointing, which recomputes the forward) x the trained transitions of the rank, divided
by the update time. Writes JSON (--json) and one markdown row per run to stdout; record the results in
docs/benchmarks.md together with the GPU's name (printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # "fsdp_flux:..." names resolve to this file

FLUX1B = dict(num_layers=6, num_single_layers=12, attention_head_dim=128, num_attention_heads=12,
              joint_attention_dim=4096, pooled_projection_dim=768, text_tokens=512, latent=(16, 64, 64),
              patch=2, guidance=3.5, axes_dims_rope=(16, 56, 56))
SMOKE = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=16, text_tokens=8, latent=(4, 8, 8),
             patch=2, guidance=3.5, axes_dims_rope=(4, 6, 6))
PRESETS = {"flux1b": FLUX1B, "smoke": SMOKE}


class RandomText:
    """A stand-in text encoder: a fixed random embedding per prompt (seeded by its hash), "" -> zeros.
    Returns {"prompt_embeds": [B, L, D], "pooled": [B, Dp]} like the real FLUX encoders."""

    def __init__(self, tokens: int, width: int, pooled_width: int):
        self.tokens, self.width, self.pooled_width = tokens, width, pooled_width

    def encode(self, prompts):
        embeds, pooled = [], []
        for p in prompts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(p.encode()).hexdigest()[:8], 16))
            scale = 1.0 if p else 0.0
            embeds.append(torch.randn(self.tokens, self.width, generator=g) * scale)
            pooled.append(torch.randn(self.pooled_width, generator=g) * scale)
        return {"prompt_embeds": torch.stack(embeds), "pooled": torch.stack(pooled)}


def _first_channels(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, :3].float() + 1) / 2).clamp(0, 1)


def random_flux(preset: str = "flux1b"):
    """A FluxAdapter around a randomly initialised FluxTransformer2DModel of the given preset."""
    from diffusers import FluxTransformer2DModel

    from mixgrpo.models.flux import FluxAdapter

    c = PRESETS[preset]
    channels, h, w = c["latent"]
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=channels * c["patch"] ** 2, num_layers=c["num_layers"],
        num_single_layers=c["num_single_layers"], attention_head_dim=c["attention_head_dim"],
        num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
        pooled_projection_dim=c["pooled_projection_dim"], guidance_embeds=True, axes_dims_rope=c["axes_dims_rope"])
    text = RandomText(c["text_tokens"], c["joint_attention_dim"], c["pooled_projection_dim"])
    return FluxAdapter(transformer, text, patch_size=c["patch"], latent_shape=(channels, h, w),
                       decoder=_first_channels, guidance=c["guidance"])


def random_tiny():
    """The embedded default architecture with random weights."""
    from mixgrpo.models.tiny import TinyConfig, build_tiny

    torch.manual_seed(0)
    return build_tiny(TinyConfig())


def brightness(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A free reward, so that the benchmark measures the model: closeness of the mean level to white."""
    return -(images.float().mean(dim=(1, 2, 3)) - 1.0).abs()


def _model_name(model: str) -> tuple[str, dict]:
    return ("fsdp_flux:random_tiny", {}) if model == "tiny" else ("fsdp_flux:random_flux", {"preset": model})


def forward_flops(model_name: str, model_args: dict, device: torch.device) -> float:
    """FLOPs of one forward of the denoiser on one sample (counted by torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mixgrpo.models import MODELS

    model = MODELS.get(model_name)(**model_args).to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    x = torch.randn(1, *model.latent_shape, device=device)
    cond = {k: v.to(device) for k, v in model.encode_prompts(["a photo of a cat"]).items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.full((1,), 0.5, device=device), cond)
    flops = float(counter.get_total_flops())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["flux1b", "tiny", "smoke"], default="flux1b")
    parser.add_argument("--iterations", type=int, default=4, help="iterations; the first is a warm-up")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per rank (P)")
    parser.add_argument("--group", type=int, default=8, help="images per prompt (G)")
    parser.add_argument("--steps", type=int, default=16, help="sampling steps")
    parser.add_argument("--window", type=int, default=4, help="MixGRPO SDE window size (trained steps)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--param-dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-reshard", action="store_true", help="reshard_after_forward=false (more memory)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--device-check", choices=["on", "off"], default="on",
                        help="'on' refuses to run without a GPU (so no CPU number is taken for a GPU one)")
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device_check == "on" and not torch.cuda.is_available():
        raise SystemExit("no GPU: this benchmark measures FSDP2 on GPUs; pass --device-check off for a CPU smoke run")
    from mixgrpo import dist
    from mixgrpo.config import build_config
    from mixgrpo.rundir import read_metrics
    from mixgrpo.train import train

    dist.init()
    device = dist.device()
    model_name, model_args = _model_name(args.model)
    flops_fwd = forward_flops(model_name, model_args, device)
    out_dir = Path(tempfile.mkdtemp(prefix="fsdp_flux_")) if dist.is_main() else None
    out_dirs = [str(out_dir)]
    if dist.is_distributed():
        torch.distributed.broadcast_object_list(out_dirs, src=0)
    cfg = build_config({"algorithm": "mixgrpo", "sampler": {"num_steps": args.steps, "window": {"size": args.window}}, "model": {"name": model_name, "args": model_args}, "rewards": [{"name": "fsdp_flux:brightness"}], "run": {"iterations": args.iterations, "out_dir": out_dirs[0], "checkpoint_every": 10**6, "profile": True}, "rollout": {"prompts_per_iteration": args.prompts, "group_size": args.group}, "update": {"steps_per_epoch": 1, "micro_batch_size": args.micro_batch, "grad_checkpointing": args.grad_checkpointing}, "lora": {"rank": args.lora, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}, "parallel": {"strategy": "fsdp", "param_dtype": args.param_dtype,
                     "reshard_after_forward": not args.no_reshard}, "eval": {"num_prompts": 0}})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train(cfg, progress=dist.is_main())
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    if not dist.is_main():
        dist.shutdown()
        return

    metrics = read_metrics(out_dirs[0])[1:]  # drop the warm-up iteration
    med = {k: statistics.median(m[k] for m in metrics)
           for k in ("time/iteration", "time/rollout", "time/reward", "time/update", "nfe_trained")}
    transitions = args.prompts * args.group * med["nfe_trained"]  # trained (sample, step) pairs per rank
    passes = 4 if args.grad_checkpointing else 3
    update_tflops = flops_fwd * passes * transitions / med["time/update"] / 1e12
    from mixgrpo.models import MODELS

    with torch.device("meta"):
        params = sum(p.numel() for p in MODELS.get(model_name)(**model_args).denoiser.parameters())
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "world_size": dist.world_size(), "model": args.model, "parameters": params,
        "param_dtype": args.param_dtype, "reshard_after_forward": not args.no_reshard,
        "grad_checkpointing": args.grad_checkpointing, "lora_rank": args.lora,
        "prompts_per_rank": args.prompts, "group_size": args.group, "steps": args.steps, "window": args.window,
        "seconds_per_iteration": med["time/iteration"], "rollout_s": med["time/rollout"],
        "reward_s": med["time/reward"], "update_s": med["time/update"],
        "forward_gflops_per_sample": flops_fwd / 1e9, "update_tflops_per_gpu": update_tflops,
        "peak_memory_gib_rank0": peak_gib,
    }
    print(json.dumps(result, indent=1))
    print("| device | GPUs | model | params | s/it | rollout s | update s | update TFLOP/s/GPU | peak GiB |")
    print(f"| {result['device']} | {result['world_size']} | {args.model} | {params / 1e9:.2f}B | "
          f"{result['seconds_per_iteration']:.2f} | {result['rollout_s']:.2f} | {result['update_s']:.2f} | "
          f"{update_tflops:.1f} | {peak_gib:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main()
