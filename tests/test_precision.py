"""precision: auto resolves by the hardware and falls back to fp32; bf16 training keeps the on-policy ratio at
1 (the rollout's log-probs are the update's, or re-scored when kernels depend on the batch size); the CPU
attention backward is the fused kernel's gradient."""

import pytest
import torch
import torch.nn.functional as F

from mixgrpo import dtypes
from mixgrpo.checkpoint import latest_checkpoint, load_checkpoint
from mixgrpo.config import build_config
from mixgrpo.rundir import read_metrics
from mixgrpo.train import train, trainer

from gaussian_run import gaussian_run, merged


def test_auto_is_bf16_only_where_the_hardware_multiplies_bf16(monkeypatch):
    monkeypatch.setattr(dtypes, "bf16_matmul_units", lambda device: (True, "CPU with AMX"))
    assert dtypes.resolve_precision("auto", "cpu")[0] == "bf16"
    monkeypatch.setattr(dtypes, "bf16_matmul_units", lambda device: (False, "CPU without AMX"))
    assert dtypes.resolve_precision("auto", "cpu") == ("fp32", "auto: CPU without AMX")
    assert dtypes.resolve_precision("bf16", "cpu")[0] == "bf16"  # an explicit value is kept
    with pytest.raises(ValueError, match="'auto', 'fp32', 'bf16'"):
        dtypes.resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("amx,flags,expected", [(True, set(), True), (False, {"amx_bf16"}, True),
                                                (False, {"avx512_bf16", "avx512f"}, False)])
def test_cpu_probe_asks_for_amx(monkeypatch, amx, flags, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(dtypes, "_cpu_flags", lambda: frozenset(flags))
    assert dtypes.bf16_matmul_units("cpu")[0] is expected


def test_cpu_attention_backward_is_the_fused_kernels_gradient():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 40, 16, generator=g) for _ in range(3))
    grad_out = torch.randn(3, 2, 40, 16, generator=g)

    def run(dtype, mode: bool, **kw):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        ctx = dtypes.CpuAttentionBackward() if mode else torch.autograd.set_grad_enabled(True)
        with ctx:
            out = F.scaled_dot_product_attention(*leaves, **kw)
        out.backward(grad_out.to(dtype))
        return out, [t.grad.float() for t in leaves]

    exact_out, exact = run(torch.float64, False)
    fused_out, fused = run(torch.bfloat16, False)
    ours_out, ours = run(torch.bfloat16, True)
    assert type(ours_out.grad_fn).__name__ == "_FlashForwardMathBackwardBackward"
    assert torch.equal(ours_out, fused_out)  # the forward is the fused kernel's: the rollout's values
    for e, a, b in zip(exact, fused, ours):
        err_fused, err_ours = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
        assert err_ours < 2e-2 and err_ours < 2 * err_fused + 1e-3
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    masked_out, _ = run(torch.bfloat16, True, attn_mask=mask)  # masked calls are left to PyTorch
    assert type(masked_out.grad_fn).__name__ != "_FlashForwardMathBackwardBackward"
    float_out, _ = run(torch.float32, True)
    assert type(float_out.grad_fn).__name__ != "_FlashForwardMathBackwardBackward"


def _tiny_cfg(tmp_path, **over):
    data = {"algorithm": "mixgrpo", "sampler": {"num_steps": 6, "window": {"size": 2}}, "model": {"name": "tiny"}, "rewards": [{"name": "toy_rewards:brightness"}], "run": {"iterations": 1, "out_dir": str(tmp_path / "run")}, "rollout": {"prompts_per_iteration": 2, "group_size": 4, "guidance_scale": 3.0}, "update": {"steps_per_epoch": 2, "micro_batch_size": 4}, "optim": {"lr": 1e-4}, "loss": {"clip_range": 1e-4}, "eval": {"num_prompts": 2}}
    return build_config(merged(data, over))


@pytest.mark.parametrize("over", [{"run": {"precision": "bf16"}}, {"run": {"precision": "bf16"}, "update": {"grad_checkpointing": True}},
                                  {"run": {"precision": "bf16"}, "update": {"micro_batch_size": 1}}])
def test_bf16_training_keeps_the_on_policy_ratio_at_one(tmp_path, over):
    (m,) = read_metrics(train(_tiny_cfg(tmp_path, **over), progress=False))
    assert m["precision"] == "bf16"
    assert m["onpolicy_ratio_error"] < 1e-6 and m["grad_norm"] > 0


def test_auto_falls_back_to_fp32_without_bf16_units(tmp_path, monkeypatch):
    monkeypatch.setattr(dtypes, "bf16_matmul_units", lambda device: (False, "CPU without AMX"))
    (m,) = read_metrics(train(_tiny_cfg(tmp_path), progress=False))
    assert m["precision"] == "fp32" and m["onpolicy_ratio_error"] < 1e-5


def _gaussian_cfg(tmp_path, model="gaussian", **over):
    return build_config(gaussian_run(**merged({"model": {"name": model, "args": {"size": 4}},
                                               "run": {"iterations": 2, "out_dir": str(tmp_path / "run")},
                                               "update": {"micro_batch_size": 2}, "loss": {"clip_range": 1e-4},
                                               "eval": {"num_prompts": 0}}, over)))


def test_batch_size_dependent_kernels_are_detected_and_re_scored(tmp_path, monkeypatch):
    run = train(_gaussian_cfg(tmp_path / "probe", "toy_models:batch_dependent"), progress=False)
    assert all(m["rescored_old_log_probs"] and m["onpolicy_ratio_error"] < 1e-6 for m in read_metrics(run))
    # what the re-scoring prevents: with the rollout's log-probs, the first step's ratios leave the clip range
    monkeypatch.setattr(trainer, "layouts_agree", lambda *a: True)
    run = train(_gaussian_cfg(tmp_path / "trusted", "toy_models:batch_dependent"), progress=False)
    assert all(not m["rescored_old_log_probs"] and m["onpolicy_ratio_error"] > 1e-4 for m in read_metrics(run))


def test_re_scoring_equals_the_rollouts_log_probs_with_batch_invariant_kernels(tmp_path, monkeypatch):
    plain = train(_gaussian_cfg(tmp_path / "plain"), progress=False)
    monkeypatch.setattr(trainer, "layouts_agree", lambda *a: False)
    rescored = train(_gaussian_cfg(tmp_path / "rescored"), progress=False)
    assert read_metrics(rescored)[0]["rescored_old_log_probs"] and not read_metrics(plain)[0]["rescored_old_log_probs"]
    assert torch.equal(load_checkpoint(latest_checkpoint(plain))["model"]["mu"],
                       load_checkpoint(latest_checkpoint(rescored))["model"]["mu"])


def test_a_run_resumes_under_another_precision(tmp_path):
    cfg = _gaussian_cfg(tmp_path, run={"iterations": 2, "precision": "fp32"})
    train(cfg, progress=False, stop_after=1)
    train(_gaussian_cfg(tmp_path, run={"iterations": 2, "precision": "auto"}), resume=True, progress=False)
    assert [m["iteration"] for m in read_metrics(cfg.run.out_dir)] == [1, 2]


@pytest.mark.parametrize("objective", ["diffusion_nft", "awm"])
def test_forward_process_objectives_train_under_bf16_as_under_fp32(tmp_path, objective):
    """DiffusionNFT and AWM compute their loss under the run's autocast (float32 targets and old velocities):
    the first iteration's loss and gradient are fp32's up to bf16 rounding, and AWM stays on-policy."""
    over = {"objective": objective, "algorithm": "ode", "rollout": {"shared_noise": False}, "sampler": {"num_steps": 6}, "loss": {"clip_range": 0.2}, "matching": {"sampler_decay": 0.0, "sigmas_per_sample": 2}, "eval": {"num_prompts": 0}}
    (fp32,) = read_metrics(train(_tiny_cfg(tmp_path / "fp32", run={"precision": "fp32"}, **over), progress=False))
    (bf16,) = read_metrics(train(_tiny_cfg(tmp_path / "bf16", run={"precision": "bf16"}, **over), progress=False))
    assert bf16["precision"] == "bf16" and not bf16["rescored_old_log_probs"]
    assert 0.8 < bf16["grad_norm"] / fp32["grad_norm"] < 1.25
    if objective == "diffusion_nft":  # AWM's loss is -mean(A ratio), ~0 for group-normalised advantages
        assert abs(bf16["loss"] - fp32["loss"]) <= 0.05 * abs(fp32["loss"])
    else:
        assert bf16["onpolicy_ratio_error"] < 1e-6
