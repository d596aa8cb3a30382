"""benchmarks/gpu_check.py's smoke mode: the sections a lent GPU runs first (every model adapter at its real head
size x MixGRPO, Flash* and DiffusionNFT, LoRA and full; the determinism check; the FLUX-like transformer's rollout
and update; FSDP at world size 1), on CPU with tiny shapes, so that the first GPU run does not fail on a script
error. About 25 s of CPU time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_runs_its_sections_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out),
           "--sections", "adapters", "determinism", "flux_block", "flux1b_fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    adapters = result["adapters"]
    assert adapters["head_dims"] == {"flux": 128, "sd3": 64, "flux2": 128, "qwen_image": 128, "wan": 128,
                                     "flux_kontext": 128, "qwen_image_edit": 128, "wan_i2v": 128}
    runs = {(name, key): run for name in adapters["head_dims"] for key, run in adapters[name].items()}
    assert {key for name, key in runs if name == "flux"} >= {"mixgrpo_lora", "flash_star_lora", "diffusion_nft_lora",
                                                           "mixgrpo_full"}
    assert all(run["ok"] for run in runs.values()), runs
    assert result["determinism"]["deterministic"]["bit_equal"]  # CPU kernels: bit-equal with or without the mode
    assert set(result["flux_block"]["variants"]) == {"eager", "eager_checkpointing"}  # no compile on CPU
    assert result["flux1b_fsdp"]["grad_norm"] > 0
