"""Rollout: NFE counted from real model calls, the shared-noise prefix is exact, on-policy ratio == 1."""

import dataclasses

import pytest
import torch

from mixgrpo.models.analytic import GaussianFlow
from mixgrpo.models.base import guided_velocity
from mixgrpo.plan import ALGORITHMS, build_plan, train_mask
from mixgrpo.rollout import rollout
from mixgrpo.sampling import dpm_solver_step, euler_step, gaussian_log_prob, predict_x0, sde_mean_std, sde_step

P, G = 2, 3


def _model():
    torch.manual_seed(0)
    model = GaussianFlow(size=4)
    model.mu.data.normal_(0, 0.3)
    return model.double().float()


def _cond(model, n=P):
    return model.encode_prompts([f"prompt {i}" for i in range(n)])


def _reference_rollout(model, plan, cond, seeds, mask, shared_noise=True):
    """Naive loop: every image integrated on its own rows from the start (no shared prefix), noise drawn in
    the same order as the rollout draws it (shared_noise False: each image's own initial noise)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if shared_noise:
        x = torch.cat([torch.randn((1, *model.latent_shape), generator=g) for g in gens]).repeat_interleave(G, 0)
    else:
        x = torch.cat([torch.randn((G, *model.latent_shape), generator=g) for g in gens])
    rows = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}
    history, logps = (), {}
    for i, step in enumerate(plan.steps):
        v = model(x, torch.full((x.shape[0],), step.sigma), rows).float()
        x0 = predict_x0(x, v, step.sigma)
        if step.kind == "ode":
            nxt = euler_step(x, v, step.sigma, step.sigma_next)
        elif step.kind == "dpm":
            nxt = dpm_solver_step(x, x0, step.sigma, step.sigma_next, history, plan.dpm_order, plan.dpm_variant)
        else:
            noise = torch.cat([torch.randn((G, *model.latent_shape), generator=g) for g in gens])
            out = sde_step(x, v, step.sigma, step.sigma_next, noise=noise, form=plan.sde_form, eta=plan.eta)
            nxt = out.x_next
            logps[i] = gaussian_log_prob(nxt, out.mean, out.std)
        history = ((x0, step.sigma),) + history[:2]
        x = nxt
    return x, logps


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("iteration", [0, 60])
def test_nfe_counted_equals_plan(algorithm, iteration):
    model = _model()
    plan = build_plan(ALGORITHMS[algorithm], iteration=iteration, seed=1)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    traj = rollout(model, plan, _cond(model), G, [11, 12], train_mask(plan, P * G, 1, iteration))
    assert len(calls) == plan.nfe == traj.nfe
    assert traj.x.shape[1] == plan.num_trained


@pytest.mark.parametrize("algorithm", ["ode", "mixgrpo", "mixgrpo_flash_star"])
def test_per_image_noise_equals_the_naive_loop(algorithm):
    """shared_noise=False: every image of a group starts from its own noise, on its own rows from the first step."""
    model = _model()
    plan = build_plan(ALGORITHMS[algorithm], iteration=3, seed=0)
    cond, seeds = _cond(model), [7, 8]
    traj = rollout(model, plan, cond, G, seeds, train_mask(plan, P * G, 0, 3), shared_noise=False)
    ref_final, _ = _reference_rollout(model, plan, cond, seeds, None, shared_noise=False)
    assert traj.final.shape == ref_final.shape == (P * G, *model.latent_shape)
    torch.testing.assert_close(traj.final, ref_final, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(traj.final[0], traj.final[1])  # a group's images differ


@pytest.mark.parametrize("algorithm", ["mixgrpo", "mixgrpo_flash", "flow_grpo", "dance_grpo"])
def test_shared_prefix_is_exact(algorithm):
    """Computing the deterministic prefix once per prompt gives the same images and log-probs as the naive loop."""
    model = _model()
    plan = build_plan(ALGORITHMS[algorithm], iteration=100, seed=0)  # window well inside: a long prefix
    cond, seeds = _cond(model), [5, 6]
    mask = train_mask(plan, P * G, 0, 100)
    traj = rollout(model, plan, cond, G, seeds, mask)
    ref_final, ref_logps = _reference_rollout(model, plan, cond, seeds, mask)
    torch.testing.assert_close(traj.final, ref_final, rtol=1e-5, atol=1e-5)
    for b in range(P * G):
        for k in range(traj.x.shape[1]):
            i = int(traj.step[b, k])
            assert mask[b, i]
            torch.testing.assert_close(traj.log_prob[b, k], ref_logps[i][b].float(), rtol=1e-5, atol=1e-5)


def test_group_shares_initial_noise_and_diverges_only_after_first_sde_step():
    model = _model()
    cfg = dataclasses.replace(ALGORITHMS["mixgrpo"])
    plan = build_plan(cfg, iteration=1000, seed=0)
    traj = rollout(model, plan, _cond(model), G, [1, 2])
    first = traj.x[:, 0]  # state entering the first window step: identical within a group
    for p in range(P):
        group = first[p * G:(p + 1) * G]
        assert torch.equal(group, group[:1].expand_as(group))
    assert not torch.allclose(traj.final[0], traj.final[1])  # SDE noise made them differ
    assert not torch.allclose(first[0], first[G])  # different prompts, different noise


@pytest.mark.parametrize("algorithm", ["mixgrpo", "dance_grpo", "flow_grpo"])
def test_on_policy_rescoring_gives_ratio_one(algorithm):
    model = _model()
    plan = build_plan(ALGORITHMS[algorithm], iteration=3, seed=0)
    cond = _cond(model)
    traj = rollout(model, plan, cond, G, [3, 4], train_mask(plan, P * G, 0, 3))
    rows = {k: v.repeat_interleave(G, 0) for k, v in cond.items()}
    for k in range(traj.x.shape[1]):
        v = guided_velocity(model, traj.x[:, k], traj.sigma[:, k].float(), rows, None, 1.0)
        mean, std = sde_mean_std(traj.x[:, k], v, traj.sigma[:, k], traj.sigma_next[:, k], plan.sde_form, plan.eta)
        logp = gaussian_log_prob(traj.x_next[:, k], mean, std)
        ratio = torch.exp(logp - traj.log_prob[:, k])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["mixgrpo", "mixgrpo_flash", "dance_grpo"])
def test_a_float64_default_dtype_changes_nothing(algorithm):
    """torch.set_default_dtype(torch.float64), as float64 reference code sets it: the rollout runs and gives
    the same trajectory (its states are float32 whatever the default)."""
    model = _model()
    plan = build_plan(ALGORITHMS[algorithm], iteration=3, seed=0)
    mask = train_mask(plan, P * G, 0, 3)
    want = rollout(model, plan, _cond(model), G, [5, 6], mask)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = rollout(model, plan, _cond(model), G, [5, 6], mask)
    finally:
        torch.set_default_dtype(default)
    for name in ("x", "x_next", "sigma", "sigma_next", "log_prob", "step", "final"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_trained_step_must_be_sde():
    model = _model()
    plan = build_plan(ALGORITHMS["mixgrpo"], iteration=0, seed=0)
    mask = torch.zeros((P * G, len(plan.steps)), dtype=torch.bool)
    mask[:, -1] = True  # an ODE step
    with pytest.raises(ValueError, match="only SDE steps"):
        rollout(model, plan, _cond(model), G, [1, 2], mask)


def test_classifier_free_guidance_batches_cond_and_uncond_in_one_call():
    model = _model()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    x = torch.randn(4, *model.latent_shape)
    cond = model.encode_prompts(["a"] * 4)
    uncond = model.encode_prompts([""] * 4)
    sigma = torch.full((4,), 0.5)
    v = guided_velocity(model, x, sigma, cond, uncond, 3.0)
    assert calls == [8]
    v_c, v_u = model(x, sigma, cond), model(x, sigma, uncond)
    torch.testing.assert_close(v, v_u + 3.0 * (v_c - v_u))


def test_a_model_may_combine_guidance_its_own_way_and_its_reference_copy_does_too():
    """Qwen-Image's pipeline rescales the guided velocity; the rollout and the KL reference (the same module with
    the base weights) use the adapter's `guide` instead of plain CFG."""
    from mixgrpo.train.weights import model_with

    class Rescaled(GaussianFlow):
        def guide(self, v_cond, v_uncond, scale):
            return 2.0 * v_cond - v_uncond  # anything but v_u + s (v_c - v_u)

    model = Rescaled(size=4)
    model.mu.data.normal_(0, 0.3)
    x, sigma = torch.randn(2, *model.latent_shape), torch.full((2,), 0.5)
    cond, uncond = model.encode_prompts(["a", "b"]), model.encode_prompts(["", ""])
    v_c, v_u = model(x, sigma, cond), model(x, sigma, uncond)
    torch.testing.assert_close(guided_velocity(model, x, sigma, cond, uncond, 3.0), 2.0 * v_c - v_u)
    reference = model_with(model, {"mu": torch.zeros_like(model.mu)})
    base = Rescaled(size=4)  # mu = 0: the reference weights
    expected = 2.0 * base(x, sigma, cond) - base(x, sigma, uncond)
    torch.testing.assert_close(guided_velocity(reference, x, sigma, cond, uncond, 3.0), expected)
