"""Forward-process objectives (DiffusionNFT, AWM): losses against plain loops, the papers' limiting cases,
and the trainer end to end on the analytic Gaussian model (learning, model calls, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from mixgrpo.checkpoint import latest_checkpoint, load_checkpoint
from mixgrpo.config import ConfigError, build_config
from mixgrpo.flow_matching import (awm_log_prob, forward_noise, nft_loss, optimality_probability,
                                   sample_sigmas, soft_clip_advantages, stratified_sigmas, vgrpo_loss,
                                   vgrpo_surrogate)
from mixgrpo.rundir import read_metrics
from mixgrpo.train import train

from gaussian_run import gaussian_run, merged

F64 = torch.float64


def _batch(n=5, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    v, v_old, target = (torch.randn((n, *shape), generator=g, dtype=F64) for _ in range(3))
    r = torch.rand(n, generator=g, dtype=F64)
    sigma = torch.rand(n, generator=g, dtype=F64).clamp(0.05, 0.95)
    return v, v_old, target, r, sigma


def loop_nft_loss(v, v_old, target, r, sigma, beta, weighting):
    """One sample and one element at a time, from the formulas of docs/notation.md."""
    total = 0.0
    for b in range(v.shape[0]):
        vp = [(1 - beta) * o + beta * t for o, t in zip(v_old[b].flatten().tolist(), v[b].flatten().tolist())]
        vn = [(1 + beta) * o - beta * t for o, t in zip(v_old[b].flatten().tolist(), v[b].flatten().tolist())]
        u = target[b].flatten().tolist()
        s = float(sigma[b])

        def err(pred):
            d = [p - q for p, q in zip(pred, u)]
            if weighting == "none":
                return sum(x * x for x in d) / len(d)
            x0_err = [s * x for x in d]  # x0_hat - x0 = sigma (v - u) up to sign
            scale = max(sum(abs(x) for x in x0_err) / len(d), 1e-5)
            return sum(x * x for x in x0_err) / len(d) / scale

        total += (float(r[b]) * err(vp) + (1 - float(r[b])) * err(vn)) / beta
    return total / v.shape[0]


@pytest.mark.parametrize("weighting", ["none", "adaptive"])
@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_nft_loss_equals_the_plain_loop(weighting, beta):
    v, v_old, target, r, sigma = _batch()
    loss, stats = nft_loss(v, v_old, target, r, sigma, beta, weighting)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(loop_nft_loss(v, v_old, target, r, sigma, beta, weighting), rel=1e-12)
    assert stats["velocity_shift"].item() == pytest.approx(((v - v_old) ** 2).mean().item(), rel=1e-12)


def test_nft_with_every_sample_optimal_is_flow_matching_on_the_samples():
    """r = 1 and beta = 1: the positive policy is v_theta itself and the loss is the pre-training loss."""
    v, v_old, target, _, sigma = _batch()
    loss, _ = nft_loss(v, v_old, target, torch.ones(5, dtype=F64), sigma, beta=1.0)
    assert loss.item() == pytest.approx(((v - target) ** 2).mean().item(), rel=1e-12)


def test_nft_gradient_at_the_old_policy_is_the_reward_weighted_direction_for_any_beta():
    """At v = v_old the gradient is 2 (2r - 1) (v_old - u) / (N D) whatever beta (first order in beta cancels
    the 1 / beta), so r = 1/2 (no preference) does not move the model and beta -> 0 has a finite limit."""
    _, v_old, target, r, sigma = _batch()
    n, d = v_old.shape[0], v_old[0].numel()
    expected = 2 * (2 * r - 1).view(-1, 1, 1, 1) * (v_old - target) / (n * d)
    for beta in (1.0, 0.1, 1e-4):
        v = v_old.clone().requires_grad_(True)
        nft_loss(v, v_old, target, r, sigma, beta)[0].backward()
        torch.testing.assert_close(v.grad, expected, rtol=1e-6, atol=1e-12)
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, target, torch.full((n,), 0.5, dtype=F64), sigma, 1.0)[0].backward()
    assert v.grad.abs().max().item() < 1e-15


def test_optimality_probability_maps_advantages_into_zero_one():
    adv = torch.tensor([-5.0, -2.0, -1.0, 0.0, 1.0, 2.0, 5.0])
    torch.testing.assert_close(optimality_probability(adv, clip=2.0),
                               torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="clip"):
        optimality_probability(adv, clip=0.0)


@pytest.mark.parametrize("weighting,w", [("uniform", lambda s: 1.0), ("sigma", lambda s: s),
                                         ("sigma2", lambda s: s * s)])
def test_awm_log_prob_equals_the_plain_loop(weighting, w):
    v, _, target, _, sigma = _batch()
    got = awm_log_prob(v, target, sigma, weighting)
    for b in range(v.shape[0]):
        d = [(p - q) ** 2 for p, q in zip(v[b].flatten().tolist(), target[b].flatten().tolist())]
        assert got[b].item() == pytest.approx(-w(float(sigma[b])) * sum(d) / len(d), rel=1e-12)


def test_awm_with_a_positive_advantage_follows_the_flow_matching_gradient():
    """On-policy (ratio 1) with A = 1 for every sample, the clipped loss -A ratio has the gradient of the
    flow-matching loss: AWM is pre-training reweighted by the advantage."""
    from mixgrpo.grpo import policy_loss

    v0, _, target, _, sigma = _batch()
    v = v0.clone().requires_grad_(True)
    logp = awm_log_prob(v, target, sigma)
    policy_loss(logp, logp.detach(), torch.ones(5, dtype=F64), clip_range=0.2)[0].backward()
    w = v0.clone().requires_grad_(True)
    ((w - target) ** 2).flatten(1).mean(1).mean().backward()
    torch.testing.assert_close(v.grad, w.grad, rtol=1e-12, atol=0)


def _pairs_batch(n=5, M=3, shape=(2, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    v, v_old, target = (torch.randn((n, M, *shape), generator=g, dtype=F64) for _ in range(3))
    v = v_old + 0.3 * v  # a policy near the old one
    sigma = torch.rand(n, M, generator=g, dtype=F64).clamp(0.05, 0.95)
    adv = 2.5 * torch.randn(n, generator=g, dtype=F64)
    return v, v_old, target, sigma, adv


def loop_vgrpo_loss(v, v_old, target, sigma, adv, clip_range, weighting, eta, kl_old):
    """One sample, pair and element at a time, from the formulas of docs/notation.md."""
    import math

    def surrogate(vel, b):
        total = 0.0
        for m in range(vel.shape[1]):
            d = [p - q for p, q in zip(vel[b, m].flatten().tolist(), target[b, m].flatten().tolist())]
            s = float(sigma[b, m])
            if weighting == "none":
                total += sum(x * x for x in d) / len(d)
            else:
                e = [s * x for x in d]
                total += sum(x * x for x in e) / len(d) / max(sum(abs(x) for x in e) / len(d), 1e-5)
        return total / vel.shape[1]

    out = 0.0
    for b in range(v.shape[0]):
        a = eta * math.tanh(float(adv[b]) / eta) if eta > 0 else float(adv[b])
        ratio = math.exp(surrogate(v_old, b) - surrogate(v, b))
        out += max(-a * ratio, -a * min(max(ratio, 1 - clip_range), 1 + clip_range))
        if kl_old > 0:
            kl = 0.0
            for m in range(v.shape[1]):
                s = float(sigma[b, m])
                d = [s * (p - q) for p, q in zip(v[b, m].flatten().tolist(), v_old[b, m].flatten().tolist())]
                kl += sum(x * x for x in d) / len(d)
            out += kl_old * kl / v.shape[1]
    return out / v.shape[0]


@pytest.mark.parametrize("weighting,clip_range,eta,kl_old", [
    ("adaptive", 0.2, 3.0, 0.0), ("none", 0.2, 3.0, 0.0), ("adaptive", 1e-3, 0.0, 0.0), ("adaptive", 10.0, 1.0, 0.5),
])
def test_vgrpo_loss_equals_the_plain_loop(weighting, clip_range, eta, kl_old):
    v, v_old, target, sigma, adv = _pairs_batch()
    loss, stats = vgrpo_loss(v, v_old, target, sigma, adv, clip_range, weighting, eta, kl_old)
    assert loss.dtype == F64
    assert loss.item() == pytest.approx(loop_vgrpo_loss(v, v_old, target, sigma, adv, clip_range, weighting, eta,
                                                        kl_old), rel=1e-12)
    assert ("kl_to_old" in stats) == (kl_old > 0)


@pytest.mark.parametrize("weighting", ["adaptive", "none"])
def test_vgrpo_gradient_at_the_old_policy_is_the_advantage_weighted_flow_matching_direction(weighting):
    """At v = v_old the ratio is 1 and no clip binds: the gradient of the loss is that of
    (1/N) sum_i A'_i L_i(v), the flow-matching loss of every sample weighted by its soft-clipped advantage
    (positive advantages pull the velocity towards the sample's targets, negative ones push it away)."""
    _, v_old, target, sigma, adv = _pairs_batch()
    v = v_old.clone().requires_grad_(True)
    loss, stats = vgrpo_loss(v, v_old, target, sigma, adv, 1e-4, weighting, 3.0)
    loss.backward()
    assert stats["ratio_max"] == 1 and stats["ratio_min"] == 1 and stats["clip_fraction"] == 0
    w = v_old.clone().requires_grad_(True)
    (soft_clip_advantages(adv, 3.0) * vgrpo_surrogate(w, target, sigma, weighting)).mean().backward()
    torch.testing.assert_close(v.grad, w.grad, rtol=1e-12, atol=1e-15)
    if weighting == "none":  # explicitly: A'_i 2 (v - u) / (N M numel)
        n, M, numel = v.shape[0], v.shape[1], v[0, 0].numel()
        expected = soft_clip_advantages(adv, 3.0).view(-1, 1, 1, 1, 1) * 2 * (v_old - target) / (n * M * numel)
        torch.testing.assert_close(v.grad, expected, rtol=1e-12, atol=1e-15)


def test_stratified_sigmas_cover_every_stratum_and_the_soft_clip_bounds_advantages():
    s = stratified_sigmas(4 * 500, 4, torch.Generator().manual_seed(0)).view(500, 4)
    for m in range(4):
        assert (s[:, m] >= max(m / 4, 1e-3)).all() and (s[:, m] <= min((m + 1) / 4, 1 - 1e-3)).all()
        assert abs(s[:, m].mean().item() - (m + 0.5) / 4) < 0.01
    a = torch.tensor([-100.0, -1e-3, 0.0, 1e-3, 100.0], dtype=F64)
    clipped = soft_clip_advantages(a, 3.0)
    assert clipped.abs().max() <= 3.0 and clipped[-1].item() == pytest.approx(3.0) and clipped[3] > 0
    torch.testing.assert_close(clipped[1:4], a[1:4], rtol=1e-6, atol=0)
    assert torch.equal(soft_clip_advantages(a, 0.0), a)


@pytest.mark.parametrize("shared", [True, False])
def test_vgrpo_pairs_are_shared_within_a_group_and_fresh_across_groups(shared):
    from mixgrpo.config import MatchingConfig, VGRPOConfig
    from mixgrpo.objectives import vgrpo_pairs

    seeds = list(range(100, 108))  # 2 groups of 4
    sigma, eps = vgrpo_pairs(seeds, 4, (3, 2, 2), VGRPOConfig(shared_pairs=shared), MatchingConfig(), epochs=2)
    assert sigma.shape == (8, 8) and eps.shape == (8, 8, 3, 2, 2)
    assert torch.equal(sigma[0], sigma[3]) == shared and torch.equal(eps[1], eps[2]) == shared
    assert not torch.equal(sigma[0], sigma[4]) and not torch.equal(eps[0], eps[4])
    again, _ = vgrpo_pairs(seeds[4:], 4, (3, 2, 2), VGRPOConfig(shared_pairs=shared), MatchingConfig(), epochs=2)
    assert torch.equal(again, sigma[4:])  # the same on the rank that holds only the second group


def test_forward_noise_and_sigma_samplers():
    x0, eps = torch.randn(4, 3, 2, 2, dtype=F64), torch.randn(4, 3, 2, 2, dtype=F64)
    sigma = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    x, u = forward_noise(x0, eps, sigma)
    torch.testing.assert_close(x[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(x[0], x0[0]) and torch.testing.assert_close(x[3], eps[3])
    torch.testing.assert_close(u, eps - x0)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    for how in ("logit_normal", "uniform"):
        s = sample_sigmas(1000, g(), how)
        assert torch.equal(s, sample_sigmas(1000, g(), how)) and 1e-3 <= s.min() and s.max() <= 1 - 1e-3
    assert abs(sample_sigmas(20000, g(), "logit_normal").median().item() - 0.5) < 0.02  # sigmoid(N(0, 1))
    with pytest.raises(ValueError, match="unknown"):
        sample_sigmas(4, g(), "window")  # the windowed sampler was removed (docs/results.md)


# ---------------------------------------------------------------------------------------------------
# The trainer with a forward-process objective, on the analytic Gaussian model
# ---------------------------------------------------------------------------------------------------


def _cfg(tmp_path, **over):
    data = gaussian_run(algorithm="ode", objective="diffusion_nft", rollout={"shared_noise": False}, run={"iterations": 6, "out_dir": str(tmp_path / "run"), "checkpoint_every": 2}, eval={"num_prompts": 4}, sampler={"num_steps": 8})
    return build_config(merged(data, over))


@pytest.mark.parametrize("objective,algorithm,extra", [
    ("diffusion_nft", "ode", {}),
    ("diffusion_nft", "mixgrpo_flash_star", {"rollout": {"shared_noise": True}}),
    ("diffusion_nft", "mixgrpo", {"rollout": {"shared_noise": True}}),
    ("awm", "ode", {"loss": {"clip_range": 0.2}, "matching": {"sampler_decay": 0.0}}),
    ("awm", "ode", {"loss": {"clip_range": 0.2, "grpo_guard": True}, "matching": {"sampler_decay": 0.0}}),
    ("v_grpo", "ode", {"loss": {"clip_range": 0.2}}),
    ("v_grpo", "mixgrpo_flash_star", {"loss": {"clip_range": 0.2}, "rollout": {"shared_noise": True}}),
])
def test_the_reward_rises_with_any_rollout(tmp_path, objective, algorithm, extra):
    """A brightness reward: the Gaussian model's trainable data mean moves up, from ODE, Flash* and
    MixGRPO (SDE in a window) rollouts alike."""
    run = train(_cfg(tmp_path, objective=objective, algorithm=algorithm, run={"iterations": 16}, optim={"lr": 0.1}, **extra),
                progress=False)
    evals = [json.loads(line)["eval/brightness"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert evals[-1] > evals[0] + 0.02  # the same held-out noise before and after
    mu = load_checkpoint(latest_checkpoint(run))["model"]["mu"]  # starts at 0 (data mean 0, brightness 0.5)
    assert mu.mean().item() > 0.04


@pytest.mark.parametrize("epochs", [1, 2])
def test_model_calls_are_counted_not_computed(tmp_path, epochs):
    """profile: true counts real forward calls: the rollout's NFE per batch, then per sample, sigma and update
    pass one sampling-policy forward (v_old) and one trained forward."""
    cfg = _cfg(tmp_path, run={"iterations": 1, "profile": True}, eval={"num_prompts": 0}, update={"micro_batch_size": 8, "epochs": epochs},
               matching={"sigmas_per_sample": 3})
    (m,) = read_metrics(train(cfg, progress=False))
    assert m["model_calls/rollout"] == 8  # 8 steps, one batch of B = 8 (no guidance)
    # v_old: 1 micro-batch x 3 sigmas x passes; trained: passes x 2 optimizer steps x 1 micro-batch x 3 sigmas
    assert m["model_calls/update"] == 3 * epochs + epochs * 2 * 3
    assert m["nfe_trained"] == 3 * epochs


def test_update_passes_see_every_sample_once_each_with_fresh_sigmas(tmp_path):
    from mixgrpo.models import MODELS
    from mixgrpo.plan import build_plan
    from mixgrpo.seeding import update_shares
    from mixgrpo.objectives import matching_batch

    def _update_shares(cfg, iteration, rank):
        P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
        return update_shares(cfg.run.seed, iteration, rank * P, P, G, cfg.update.steps_per_epoch, cfg.update.epochs)

    one, two = _cfg(tmp_path), _cfg(tmp_path, update={"epochs": 2})
    shares = _update_shares(two, iteration=3, rank=0)
    assert len(shares) == 4 and [torch.equal(a, b) for a, b in zip(shares, _update_shares(one, 3, 0))] == [True] * 2
    for epoch in (shares[:2], shares[2:]):
        assert sorted(torch.cat(epoch).tolist()) == list(range(8))
    assert not all(torch.equal(a, b) for a, b in zip(shares[:2], shares[2:]))  # another split in pass 2
    model = MODELS.get("gaussian")(size=4)
    cond = model.encode_prompts(["a red circle"] * 8)
    batch = matching_batch(model, torch.zeros(8, 3, 4, 4), cond, build_plan(two.sampler), list(range(8)), two.matching,
                           two.update.epochs, two.update.micro_batch_size)
    assert batch.sigma.shape == (8, 2) and not torch.equal(batch.sigma[:, 0], batch.sigma[:, 1])


@pytest.mark.parametrize("over", [{}, {"objective": "v_grpo", "loss": {"clip_range": 0.2}}])
def test_resume_reproduces_the_uninterrupted_run_with_the_sampling_copy(tmp_path, over):
    full = train(_cfg(tmp_path / "full", **over), progress=False)
    cfg = _cfg(tmp_path / "cut", **over)
    train(cfg, progress=False, stop_after=3)
    ckpt = load_checkpoint(latest_checkpoint(cfg.run.out_dir))
    assert ckpt["sampler"] is not None and not torch.equal(ckpt["sampler"]["mu"], ckpt["model"]["mu"])
    resumed = train(cfg, resume=True, progress=False)
    assert torch.equal(load_checkpoint(latest_checkpoint(full))["model"]["mu"],
                       load_checkpoint(latest_checkpoint(resumed))["model"]["mu"])
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(m) for m in read_metrics(full)] == [drop(m) for m in read_metrics(resumed)]


def test_vgrpo_is_on_policy_on_its_first_step_and_counts_its_pairs(tmp_path):
    """sampler_decay 0: the ratio is 1 on the first optimizer step; profile counts M = 3 pairs per sample and pass:
    M old-policy calls per pass, then M trained calls per optimizer step (2 steps per pass, one micro-batch)."""
    cfg = _cfg(tmp_path, objective="v_grpo", run={"iterations": 2, "profile": True}, loss={"clip_range": 0.2}, update={"epochs": 2, "micro_batch_size": 8}, matching={"sampler_decay": 0.0}, v_grpo={"pairs": 3})
    metrics = read_metrics(train(cfg, progress=False))
    assert all(m["onpolicy_ratio_error"] < 1e-6 for m in metrics)
    assert metrics[0]["model_calls/update"] == 3 * 2 + 2 * 2 * 3 and metrics[0]["nfe_trained"] == 3 * 2


@pytest.mark.parametrize("guard", [False, True])
def test_awm_is_on_policy_on_its_first_optimizer_step(tmp_path, guard):
    run = train(_cfg(tmp_path, objective="awm", run={"iterations": 2}, loss={"clip_range": 0.2, "grpo_guard": guard},
                     matching={"sampler_decay": 0.0}), progress=False)
    assert all(m["onpolicy_ratio_error"] < 1e-6 for m in read_metrics(run))


@pytest.mark.parametrize("over,match", [
    ({"rollout": {"shared_noise": True}}, "shared_noise"),
    ({"matching": {"sigmas": "window"}}, "window"),  # the removed windowed sampler is refused by name
    ({"objective": "grpo"}, "trains no step"),
    ({"matching": {"sampler_decay": 1.0}}, "sampler_decay"),
    ({"objective": "nft"}, "objective"),
    ({"loss": {"grpo_guard": True}}, "grpo_guard"),  # DiffusionNFT clips no ratio
    ({"objective": "v_grpo", "loss": {"grpo_guard": True}}, "grpo_guard"),  # its per-pair weights: no one std per sample
    ({"objective": "v_grpo", "v_grpo": {"pairs": 0}}, "v_grpo.pairs"),
    ({"objective": "v_grpo", "v_grpo": {"weighting": "sigma"}}, "v_grpo.weighting"),
])
def test_inconsistent_settings_are_named(tmp_path, over, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **over)


@pytest.mark.parametrize("objective", ["diffusion_nft", "v_grpo"])
def test_the_kl_to_the_base_starts_at_zero_and_is_logged(tmp_path, objective):
    """kl_beta > 0: the KL to the frozen base is logged, and is 0 on the first optimizer step (the trained weights
    are the base's) and > 0 after the model moved."""
    run = train(_cfg(tmp_path, objective=objective, run={"iterations": 2}, loss={"kl_beta": 1.0, "clip_range": 0.2}, optim={"lr": 0.1}, eval={"num_prompts": 0}, update={"steps_per_epoch": 1}), progress=False)
    first, second = read_metrics(run)
    assert first["kl_to_base"] == 0 and second["kl_to_base"] > 0
