"""Dtype names in configs -> torch dtypes (one table for models, rewards and mixed precision)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """"bfloat16" / "bf16" / "float16" / "fp16" / "float32" / "fp32" (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not known; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]
