"""Dtype names in configs -> torch dtypes (one table for models, rewards and mixed precision), and the
training precision: what `precision: auto` resolves to on this machine, and the context model calls run in.

`auto` is bf16 autocast (float32 master weights) where the hardware multiplies bf16 matrices natively
(CPUs with AMX, CUDA GPUs of compute capability 8.0 or newer) and float32 elsewhere. On a CPU without AMX,
bf16 is not the default even with avx512_bf16: the tiny model's calls are dominated by element-wise work
that bf16 does not speed up, and without AMX its matrix products gain little (docs/benchmarks.md). Wide
inference is another matter: `mixgrpo preprocess --encode-dtype auto` runs text encoders in bf16 wherever
avx512_bf16 or AMX is present (`cpu_bf16_instructions`; measured in docs/models.md).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixgrpo.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "bf16" / "float16" / "fp16" / "float32" / "fp32" (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not known; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: torch's own probe below decides
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def bf16_matmul_units(device: torch.device | str) -> tuple[bool, str]:
    """(whether `device` multiplies bf16 matrices in hardware, what was found), for `precision: auto`."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        ok = torch.cuda.is_bf16_supported(including_emulation=False)
        return ok, f"CUDA compute capability {major}.{minor}{'' if ok else ' (bf16 needs 8.0 or newer)'}"
    if device.type == "cpu":
        amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or "amx_bf16" in _cpu_flags()
        return bool(amx), "CPU with AMX" if amx else "CPU without AMX"
    return False, f"device type {device.type!r}"


def cpu_bf16_instructions() -> tuple[bool, str]:
    """(whether this CPU has bf16 dot-product instructions: AMX or AVX512-BF16, what was found), for inference in
    bf16 (`mixgrpo preprocess`'s text encoders). Unlike training (`bf16_matmul_units`), a large encoder's forward is
    dominated by matrix products, which AVX512-BF16 alone makes faster; without either, bf16 is emulated and much
    slower (benchmarks/text_encoder_dtype.py: 3.5x faster with AVX512-BF16, 3.1x slower without, on one EPYC)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)() or "amx_bf16" in _cpu_flags()
    if amx:
        return True, "CPU with AMX"
    avx = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or "avx512_bf16" in _cpu_flags()
    return bool(avx), "CPU with AVX512-BF16" if avx else "CPU without bf16 instructions (no AMX, no AVX512-BF16)"


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """"auto" -> "bf16" or "fp32" by `bf16_matmul_units`; "fp32" and "bf16" stay. Returns (precision, why)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not known; use one of {PRECISIONS}")
    if precision != "auto":
        return precision, "set in the config"
    ok, found = bf16_matmul_units(device)
    return ("bf16" if ok else "fp32"), f"auto: {found}"


def model_precision(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The context the model calls of a run enter: bf16 autocast (float32 master weights) for "bf16", nothing
    for "fp32". Training also runs inside `CpuAttentionBackward` unless it checkpoints gradients."""
    if precision == "bf16":
        # Under autocast, RMSNorm's float32 weight meets bf16 activations and torch warns once that it takes its
        # unfused kernel: the result is right and the cost is in the measured bf16 speed (docs/benchmarks.md).
        warnings.filterwarnings("ignore", message=r"Mismatch dtype between input and weight")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


class _FlashForwardMathBackward(torch.autograd.Function):
    """softmax(q k^T * scale) v: the forward is PyTorch's own fused kernel (the rollout's, so the on-policy
    ratio stays 1), the backward the textbook one as bf16 matrix products with float32 softmax terms.
    q: [B, H, L, D]; k, v: [B, H, S, D]."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = q.shape[-1] ** -0.5 if scale is None else scale
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        p = ((q @ k.transpose(-2, -1)).float() * scale).softmax(-1)              # [B, H, L, S] float32
        grad_v = p.to(q.dtype).transpose(-2, -1) @ grad_out                     # [B, H, S, D]
        grad_p = (grad_out @ v.transpose(-2, -1)).float()                       # [B, H, L, S]
        grad_s = (p * (grad_p - (grad_p * p).sum(-1, keepdim=True)) * scale).to(q.dtype)
        return grad_s @ k, grad_s.transpose(-2, -1) @ q, grad_v, None


class CpuAttentionBackward(TorchFunctionMode):
    """Trains bf16 attention on CPU through `_FlashForwardMathBackward`: PyTorch 2.13's fused CPU attention
    backward is ~4x slower in bf16 than in float32 (benchmarks/roofline.py), while the same backward as bf16
    matrix products runs on AMX. Only unmasked, dropout-free, non-causal bf16 CPU calls that need a gradient
    are rerouted (others pass through untouched); the forward values are the fused kernel's in every case.
    Not with gradient checkpointing: its recomputation inside backward runs outside any mode, takes the fused
    kernel and finds other saved tensors than the forward did (CheckpointError)."""

    _names = ("query", "key", "value")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and torch.is_grad_enabled():
            args = tuple(args) + tuple(kwargs.pop(n) for n in self._names[len(args):] if n in kwargs)
            q, k, v = args[:3]
            plain = (len(args) == 3 and set(kwargs) <= {"scale", "attn_mask", "dropout_p", "is_causal", "enable_gqa"}
                     and kwargs.get("attn_mask") is None and not kwargs.get("dropout_p")
                     and not kwargs.get("is_causal") and not kwargs.get("enable_gqa"))
            if (plain and q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu"
                    and q.shape[:-2] == k.shape[:-2] and any(t.requires_grad for t in (q, k, v))):
                return _FlashForwardMathBackward.apply(q, k, v, kwargs.get("scale"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def deterministic_kernels(enabled: bool):
    """Within the block (enabled), every kernel is one that gives the same bits for the same inputs on the same
    GPU and software: `torch.use_deterministic_algorithms(True)` (an op with no deterministic kernel raises,
    naming itself, instead of running one that is not), cuDNN's deterministic algorithms without autotuning,
    and `CUBLAS_WORKSPACE_CONFIG=:4096:8` (cuBLAS otherwise splits reductions by a workspace that depends on
    the stream's history). Deterministic mode also fills uninitialised memory (torch's default), so a read of
    it cannot differ. The previous settings come back on exit. CPU kernels are deterministic already (for a
    given thread count): on CPU this changes nothing. What it costs on a GPU: docs/reproducibility.md."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a user's own ":16:8" (less memory) is kept
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if before[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

