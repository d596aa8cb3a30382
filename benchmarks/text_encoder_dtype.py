"""float32 or bfloat16 for the text encoders of `mixgrpo preprocess` on a CPU: the forward of a random T5 encoder
(16 prompts x 128 tokens; T5-XXL is d_model 4096 x 24 layers, these are scaled down) in each dtype, alternating,
best of 4.

    OMP_NUM_THREADS=1 python benchmarks/text_encoder_dtype.py
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 OMP_NUM_THREADS=1 python benchmarks/text_encoder_dtype.py

The second line hides AVX512 (and with it AVX512-BF16) from PyTorch: what a CPU without bf16 instructions gets.
`mixgrpo.dtypes.cpu_bf16_instructions` decides from these figures (docs/models.md, the embedding cache).
"""

from __future__ import annotations

import time

import torch
from transformers import T5Config, T5EncoderModel

SIZES = ((64, 128, 2), (1024, 2816, 4), (2048, 5120, 2))  # (d_model, d_ff, layers)


def main() -> None:
    torch.manual_seed(0)
    ids = torch.randint(0, 32000, (16, 128))
    for d_model, d_ff, layers in SIZES:
        model = T5EncoderModel(T5Config(d_model=d_model, d_ff=d_ff, num_layers=layers, num_heads=16,
                                        d_kv=d_model // 16, vocab_size=32128,
                                        feed_forward_proj="gated-gelu")).eval()
        times: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
        with torch.no_grad():
            for rep in range(4):
                for dtype in (torch.bfloat16, torch.float32) if rep % 2 else (torch.float32, torch.bfloat16):
                    model.to(dtype)(ids)  # warm-up
                    start = time.perf_counter()
                    model(ids)
                    times[dtype].append(time.perf_counter() - start)
        fp32, bf16 = min(times[torch.float32]), min(times[torch.bfloat16])
        print(f"d_model {d_model}, {layers} layers: float32 {fp32:.3f} s, bfloat16 {bf16:.3f} s "
              f"(bf16 {fp32 / bf16:.2f}x the speed of fp32)", flush=True)


if __name__ == "__main__":
    main()
