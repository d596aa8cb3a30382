"""`deterministic: true`: the kernel settings that make two runs of one config on one GPU bit-equal, restored
after the run; on CPU (deterministic kernels already) the same run, bit for bit."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from gaussian_run import gaussian_run, merged
from mixgrpo.config import build_config
from mixgrpo.dtypes import deterministic_kernels
from mixgrpo.models.tiny import TinyConfig, build_tiny, save_tiny
from mixgrpo.train import train


def _tiny_run(tmp_path, name: str, **over) -> dict:
    """Two iterations of MixGRPO on a 16-pixel tiny FLUX model (attention, convolutions, the VAE-free decode)."""
    if not (tmp_path / "tiny").exists():
        torch.manual_seed(0)
        save_tiny(build_tiny(TinyConfig(image_size=16)), tmp_path / "tiny")
    return gaussian_run(model={"name": "tiny", "args": {"path": str(tmp_path / "tiny")}},
                        **merged({"sampler": {"num_steps": 4, "window": {"size": 1}}, "rollout": {"group_size": 2},
                                  "run": {"iterations": 2, "out_dir": str(tmp_path / name)}, "optim": {"lr": 1e-3},
                                  "eval": {"num_prompts": 0}}, over))


def _final(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_the_settings_hold_inside_and_come_back_after():
    was = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
           os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with deterministic_kernels(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
            os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == was
    with deterministic_kernels(False):
        assert torch.are_deterministic_algorithms_enabled() == was[0]


def test_on_cpu_a_deterministic_run_is_the_same_run(tmp_path):
    """No op of a tiny-FLUX run lacks a deterministic CPU kernel (one would raise), and the kernels it picks are
    the ones a default run picks: the same weights, bit for bit; and the mode ends with the run."""
    torch.set_num_threads(1)
    plain = train(build_config(_tiny_run(tmp_path, "plain")), progress=False)
    strict = train(build_config(_tiny_run(tmp_path, "strict", run={"deterministic": True})), progress=False)
    assert not torch.are_deterministic_algorithms_enabled()
    a, b = _final(plain), _final(strict)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: on CPU every kernel is deterministic already (the test above); "
                           "benchmarks/gpu_check.py runs this check on a lent GPU")
def test_two_deterministic_runs_on_one_gpu_are_bit_equal(tmp_path):
    runs = [train(build_config(_tiny_run(tmp_path, f"gpu{i}", run={"deterministic": True, "precision": "bf16"})),
                  progress=False) for i in range(2)]
    a, b = _final(runs[0]), _final(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
