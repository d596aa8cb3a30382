"""CPU roofline and levers: how well the model calls of the main job use the machine, and what speeds them up.

    python benchmarks/roofline.py                          # main job's shapes, 1 thread, 5 rounds
    python benchmarks/roofline.py --shapes --threads 1 2   # also smaller calls and 2 threads
    python benchmarks/roofline.py --compile                # also torch.compile (minutes to compile)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python benchmarks/roofline.py   # the same CPU without AMX (oneDNN's cap)

1. Peaks: matrix products per dtype (fp32, bf16) at 2048^3 and at the model's widest shape, GFLOP/s.
2. The main job's three kinds of model call (embedded tiny model, `configs/mixgrpo.yaml` shapes: B = P * G
   images with classifier-free guidance in one call, the shared-noise prefix at batch P, the update's
   forward+backward at the micro-batch): FLOPs counted by torch.utils.flop_counter (attention counted through
   its math form, which the CPU's fused kernel does not report), seconds per call, achieved GFLOP/s and the
   share of the dtype's peak.
3. Levers, side by side in one process and interleaved round by round (every variant once per round, median
   over rounds after the first): precision (fp32; bf16 autocast with PyTorch's fused attention backward; bf16
   with `mixgrpo.dtypes.CpuAttentionBackward`, what `precision: auto` runs on a CPU with AMX), torch.compile,
   thread counts, batch shapes (the rollout's batch split into smaller calls, smaller micro-batches). Each
   variant also says whether a row's velocity is the same bit for bit in the rollout's layout (batch B, eval,
   no grad) and in the update's (micro-batch, train, grad): if not, the on-policy ratio is 1 only with the
   old log-probs re-scored (`mixgrpo.train.trainer.layouts_agree` does that) at one extra forward per trained
   transition.
4. The model seconds of the main job predicted from the per-call costs (48 iterations along its window path,
   the held-out evaluations before and after), per variant.

Writes JSON (--json) and markdown (--markdown).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_clock_argument, machine, use_clock  # noqa: E402  benchmarks/common.py


def matmul_peak(dtype: torch.dtype, m: int, k: int, n: int, repeats: int = 5) -> float:
    """GFLOP/s of [m, k] @ [k, n] in `dtype` (median of `repeats` after a warm-up)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / statistics.median(times[1:]) / 1e9


class Calls:
    """The main job's model calls on the embedded tiny model, in a given precision / attention path."""

    def __init__(self, P: int, G: int, micro_batch: int, guidance: float):
        from mixgrpo.models.tiny import tiny

        self.model = tiny()
        self.model.requires_grad_(True)
        self.P, self.G, self.mb, self.guidance = P, G, micro_batch, guidance
        B = P * G
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(B, *self.model.latent_shape, generator=g)
        self.sigma = torch.full((B,), 0.5)
        prompts = ["a red circle above a blue square", "a green triangle"] * (B // 2) + ["a red circle"] * (B % 2)
        self.cond = self.model.encode_prompts(prompts)
        self.uncond = self.model.encode_prompts([""] * B) if guidance != 1 else None
        self.rows = torch.randperm(B, generator=g)[:micro_batch]

    def _v(self, rows, grad: bool, precision: str, attention: bool):
        from mixgrpo.dtypes import CpuAttentionBackward, model_precision
        from mixgrpo.models.base import guided_velocity

        c = {k: v[rows] for k, v in self.cond.items()}
        u = None if self.uncond is None else {k: v[rows] for k, v in self.uncond.items()}
        self.model.train(grad)
        with (CpuAttentionBackward() if attention else contextlib.nullcontext()), torch.set_grad_enabled(grad):
            with model_precision("cpu", precision):
                v = guided_velocity(self.model, self.x[rows], self.sigma[rows], c, u, self.guidance)
            if grad:
                v.square().mean().backward()
        return v.detach()

    def forward(self, n: int, precision: str, attention: bool = True, chunk: int = 0):
        """The rollout's forward over the first n images, in calls of `chunk` images (0 = one call)."""
        chunk = chunk or n
        return torch.cat([self._v(torch.arange(i, min(i + chunk, n)), False, precision, attention)
                          for i in range(0, n, chunk)])

    def forward_backward(self, precision: str, attention: bool = True, micro_batch: int = 0):
        """The update's forward+backward over one micro-batch of mb images, in calls of `micro_batch`."""
        micro_batch = micro_batch or self.mb
        for i in range(0, self.mb, micro_batch):
            self._v(self.rows[i:i + micro_batch], True, precision, attention)

    def layouts_agree(self, precision: str, attention: bool) -> float:
        """max |v| difference of the micro-batch's rows between the rollout's layout and the update's."""
        B = self.P * self.G
        full = self._v(torch.arange(B), False, precision, attention)[self.rows]
        mine = self._v(self.rows, True, precision, attention)
        self.model.zero_grad(set_to_none=True)
        return float((full - mine).abs().max())

    def flops(self) -> dict[str, float]:
        """FLOPs of the rollout forward (batch B), the prefix forward (batch P) and the update forward+backward."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        out = {}
        for key, fn in (("forward_batch", lambda: self.forward(self.P * self.G, "fp32")),
                        ("forward_prefix", lambda: self.forward(self.P, "fp32")),
                        ("forward_backward", lambda: self.forward_backward("fp32"))):
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                fn()
            out[key] = float(counter.get_total_flops())
        self.model.zero_grad(set_to_none=True)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="P (the main job's)")
    parser.add_argument("--group", type=int, default=8, help="G")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the first is a warm-up")
    parser.add_argument("--shapes", action="store_true", help="also smaller calls (rollout batch and micro-batch / 2, / 4)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (fp32, bf16)")
    add_clock_argument(parser)
    parser.add_argument("--json", default="benchmarks/results/roofline.json")
    parser.add_argument("--markdown", default="benchmarks/results/roofline.md")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    use_clock(args.clock)
    from mixgrpo.dtypes import bf16_matmul_units

    calls = Calls(args.prompts, args.group, args.micro_batch, args.guidance)
    B, P, mb = args.prompts * args.group, args.prompts, args.micro_batch
    tokens = 80  # the tiny model's 64 image + 16 text tokens
    rows = B * (2 if args.guidance != 1 else 1) * tokens

    peaks = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[f"{name}/{threads}"] = {"square_2048": matmul_peak(dtype, 2048, 2048, 2048),
                                          "model_shape": matmul_peak(dtype, rows, 128, 512)}
    flops = calls.flops()

    # (label, precision, CpuAttentionBackward, compiled, forward chunk, micro-batch split)
    variants = [("fp32", "fp32", False, False, 0, 0), ("bf16, fused attention backward", "bf16", False, False, 0, 0),
                ("bf16 + CpuAttentionBackward (auto)", "bf16", True, False, 0, 0)]
    if args.shapes:
        for d in (2, 4):
            variants += [(f"fp32, rollout in calls of B/{d}, micro-batch mb/{d}", "fp32", False, False, B // d, mb // d),
                         (f"bf16 auto, rollout in calls of B/{d}, micro-batch mb/{d}", "bf16", True, False, B // d, mb // d)]
    compile_seconds = {}
    eager = compiled = calls.model.transformer.forward
    if args.compile:
        compiled = torch.compile(eager, dynamic=False)
        variants += [("fp32, torch.compile", "fp32", False, True, 0, 0),
                     ("bf16 auto, torch.compile", "bf16", True, True, 0, 0)]
        calls.model.transformer.forward = compiled
        for label, precision, attention, _, _, _ in variants[-2:]:
            t = time.perf_counter()
            calls.forward(B, precision, attention)
            calls.forward(P, precision, attention)
            calls.forward_backward(precision, attention)
            compile_seconds[label] = time.perf_counter() - t
        calls.model.transformer.forward = eager

    times: dict[tuple[str, int], dict[str, list[float]]] = {}
    for r in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for label, precision, attention, comp, chunk, split in variants:
                calls.model.transformer.forward = compiled if comp else eager
                t = times.setdefault((label, threads), {"forward_batch": [], "forward_prefix": [],
                                                        "forward_backward": []})
                for key, fn in (("forward_batch", lambda: calls.forward(B, precision, attention, chunk)),
                                ("forward_prefix", lambda: calls.forward(P, precision, attention)),
                                ("forward_backward", lambda: calls.forward_backward(precision, attention, split))):
                    start = time.perf_counter()
                    fn()
                    t[key].append(time.perf_counter() - start)
                calls.model.zero_grad(set_to_none=True)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    results = []
    for (label, threads), t in times.items():
        precision, attention, comp = next((v[1], v[2], v[3]) for v in variants if v[0] == label)
        calls.model.transformer.forward = compiled if comp else eager
        torch.set_num_threads(threads)
        med = {k: statistics.median(v[1:]) for k, v in t.items()}
        peak = peaks[f"{precision}/{threads}"]["square_2048"]
        achieved = {k: flops[k] / med[k] / 1e9 for k in med}
        results.append({"variant": label, "threads": threads, "precision": precision, "seconds": med,
                        "gflops": achieved, "share_of_peak": {k: v / peak for k, v in achieved.items()},
                        "layout_difference": calls.layouts_agree(precision, attention),
                        "main_job_model_minutes": _main_job_minutes(med, args)})
    calls.model.transformer.forward = eager
    meta = {"machine": machine() + (", CPU-time clock" if args.clock == "cpu" else ""), "bf16_units": bf16_matmul_units("cpu"), "args": vars(args),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "flops": flops, "peaks": peaks,
            "compile_seconds": compile_seconds}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    table = _markdown(meta, results)
    Path(args.markdown).write_text(table)
    print(table)


def _main_job_minutes(seconds: dict[str, float], args) -> float:
    """Model minutes of `configs/mixgrpo.yaml` predicted from per-call seconds: 48 iterations with the window
    at l = iteration // 4 (l prefix calls at batch P, 25 - l at batch B, K = 4 trained steps x 2 micro-batches),
    and two held-out evaluations of 106 prompts x 2 images (25 calls per batch of 64 images, scaled per image)."""
    B = args.prompts * args.group
    iterations = sum(l * seconds["forward_prefix"] + (25 - l) * seconds["forward_batch"]
                     + 4 * (B // args.micro_batch) * seconds["forward_backward"]
                     for l in (it // 4 for it in range(48)))
    evaluation = 2 * 25 * seconds["forward_batch"] * 212 / B
    return (iterations + evaluation) / 60


def _markdown(meta: dict, results: list[dict]) -> str:
    f = meta["flops"]
    isa = "".join(f", {k.upper()}={meta[k]}" for k in ("onednn_max_cpu_isa", "omp_wait_policy") if meta[k])
    lines = [f"{meta['machine']}{isa}.", "", "Matrix-product peaks, GFLOP/s:", "",
             "| dtype / threads | 2048 x 2048 x 2048 | model shape |", "|---|---|---|"]
    for key, p in meta["peaks"].items():
        lines.append(f"| {key} | {p['square_2048']:.0f} | {p['model_shape']:.0f} |")
    lines += ["", f"FLOPs per call: rollout forward {f['forward_batch'] / 1e9:.1f} G, prefix forward "
                  f"{f['forward_prefix'] / 1e9:.2f} G, update forward+backward {f['forward_backward'] / 1e9:.1f} G.", "",
              "| variant | threads | rollout forward ms | GFLOP/s | % of peak | prefix ms | update fwd+bwd ms | GFLOP/s | "
              "% of peak | rollout = update layout | main job model minutes |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, g, p = r["seconds"], r["gflops"], r["share_of_peak"]
        same = "yes" if r["layout_difference"] == 0 else f"no ({r['layout_difference']:.1e})"
        lines.append(f"| {r['variant']} | {r['threads']} | {1000 * s['forward_batch']:.0f} | {g['forward_batch']:.0f} | "
                     f"{100 * p['forward_batch']:.1f}% | {1000 * s['forward_prefix']:.0f} | "
                     f"{1000 * s['forward_backward']:.0f} | {g['forward_backward']:.0f} | {100 * p['forward_backward']:.1f}% | "
                     f"{same} | {r['main_job_model_minutes']:.1f} |")
    for label, sec in meta["compile_seconds"].items():
        lines.append(f"\nCompile time of '{label}' (three shapes): {sec:.0f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
