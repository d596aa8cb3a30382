"""GRPO math: vectorised functions against plain-loop references, hand-derived loss cases, invariants."""

from __future__ import annotations

import math

import pytest
import torch

from mixgrpo.grpo import (combine_rewards, group_advantages, guard_log_ratio, guard_step_weight, kl_to_reference,
                         policy_loss, ratio_loss)
from mixgrpo.sampling import gaussian_log_prob, sde_mean_std

F64 = torch.float64


# ---------------------------------------------------------------------------------------------------
# Plain-loop references (one scalar at a time, straight from the formulas of REFERENCE.md)
# ---------------------------------------------------------------------------------------------------


def loop_group_advantages(rewards, eps=1e-4, std="group", clip=5.0):
    rows = rewards.tolist()
    flat = [r for row in rows for r in row]
    global_mean = sum(flat) / len(flat)
    global_std = math.sqrt(sum((r - global_mean) ** 2 for r in flat) / len(flat))
    out = []
    for row in rows:
        mean = sum(row) / len(row)
        scale = math.sqrt(sum((r - mean) ** 2 for r in row) / len(row)) if std == "group" else global_std
        adv_row = []
        for r in row:
            a = 0.0 if max(row) == min(row) else (r - mean) / (scale + eps)
            if clip is not None:
                a = min(max(a, -clip), clip)
            adv_row.append(a)
        out.append(adv_row)
    return torch.tensor(out, dtype=F64)


def loop_combine(rewards, weights, mode, **kw):
    names = list(rewards)
    P, G = rewards[names[0]].shape
    if mode == "reward":
        total = torch.zeros(P, G, dtype=F64)
        for p in range(P):
            for g in range(G):
                total[p, g] = sum(weights[n] * float(rewards[n][p, g]) for n in names)
        return loop_group_advantages(total, **kw)
    out = torch.zeros(P, G, dtype=F64)
    for n in names:
        adv = loop_group_advantages(rewards[n], **kw)
        for p in range(P):
            for g in range(G):
                out[p, g] += weights[n] * adv[p, g]
    return out


def loop_policy_loss(logp_new, logp_old, adv, clip_range):
    total, clipped = 0.0, 0
    for ln, lo, a in zip(logp_new.tolist(), logp_old.tolist(), adv.tolist()):
        ratio = math.exp(ln - lo)
        total += max(-a * ratio, -a * min(max(ratio, 1 - clip_range), 1 + clip_range))
        clipped += abs(ratio - 1) > clip_range
    return total / len(adv), clipped / len(adv)


def random_rewards(P=6, G=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(P, G, generator=gen, dtype=F64)
    r[1] = 0.3  # a zero-variance group
    r[2, :2] = 7.0  # ties
    return r


# ---------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("clip", [5.0, 1.0, None])
def test_group_advantages_equal_loop(std, clip):
    for seed in range(3):
        r = random_rewards(seed=seed)
        torch.testing.assert_close(group_advantages(r, std=std, clip=clip),
                                   loop_group_advantages(r, std=std, clip=clip))


def test_zero_variance_groups_give_zero_never_nan():
    r = torch.tensor([[0.1, 0.1, 0.1], [1e30, 1e30, 1e30], [0.0, 0.0, 0.0], [0.2, 0.5, 0.9]])
    for std in ("group", "global"):
        adv = group_advantages(r, std=std)
        assert not bool(adv.isnan().any())
        assert bool((adv[:3] == 0).all()) and bool((adv[3] != 0).all())
    assert bool((group_advantages(torch.tensor([[2.0]])) == 0).all())  # G = 1
    assert bool((group_advantages(torch.full((2, 4), 0.1)) == 0).all())


def test_group_advantages_hand_values_and_clip():
    # [0, 1]: mean 0.5, population std 0.5 -> (+-0.5) / (0.5 + 1e-4)
    adv = group_advantages(torch.tensor([[0.0, 1.0]], dtype=F64))
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.5]], dtype=F64) / 0.5001)
    # one outlier in a group of 100: (99 / 100) / std ~ 9.95 -> clipped to 5
    r = torch.zeros(1, 100, dtype=F64)
    r[0, 0] = 1.0
    assert float(group_advantages(r)[0, 0]) == 5.0
    assert float(group_advantages(r, clip=None)[0, 0]) > 9.0
    with pytest.raises(ValueError, match="P, G"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="std"):
        group_advantages(torch.zeros(2, 2), std="batch")


@pytest.mark.parametrize("mode", ["advantage", "reward"])
@pytest.mark.parametrize("std", ["group", "global"])
def test_combine_rewards_equals_loop(mode, std):
    rewards = {"hps": random_rewards(seed=1), "pick": 100 * random_rewards(seed=2), "ir": random_rewards(seed=3)}
    weights = {"hps": 1.0, "pick": 0.5, "ir": 2.0}
    torch.testing.assert_close(combine_rewards(rewards, weights, mode=mode, std=std),
                               loop_combine(rewards, weights, mode, std=std))
    equal = {n: 1.0 for n in rewards}
    torch.testing.assert_close(combine_rewards(rewards, mode=mode, std=std),
                               loop_combine(rewards, equal, mode, std=std))


def test_combine_modes_differ_on_rewards_of_different_scale():
    """'advantage' mode lets each reward count equally; 'reward' mode lets the large-scale one dominate."""
    small = torch.tensor([[0.0, 1.0, 2.0]], dtype=F64)
    large = torch.tensor([[300.0, 200.0, 100.0]], dtype=F64)  # opposite preference, 100x the scale
    both = {"small": small, "large": large}
    # equal and opposite up to eps = 1e-4 relative to the small reward's std
    torch.testing.assert_close(combine_rewards(both, mode="advantage"), torch.zeros(1, 3, dtype=F64), rtol=0, atol=1e-3)
    torch.testing.assert_close(combine_rewards(both, mode="reward"), group_advantages(small + large))
    assert float(combine_rewards(both, mode="reward")[0, 0]) > 0


def test_combine_rewards_errors():
    r = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="missing \\['b'\\], unknown \\['c'\\]"):
        combine_rewards({"a": r, "b": r}, {"a": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="same"):
        combine_rewards({"a": r, "b": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="mode"):
        combine_rewards({"a": r}, mode="rank")
    with pytest.raises(ValueError, match="empty"):
        combine_rewards({})


# ---------------------------------------------------------------------------------------------------
# Policy loss
# ---------------------------------------------------------------------------------------------------


def test_policy_loss_on_policy_ratio_is_one():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(16, generator=gen, dtype=F64)
    adv = torch.randn(16, generator=gen, dtype=F64)
    new = logp.clone().requires_grad_()
    loss, stats = policy_loss(new, logp, adv)
    torch.testing.assert_close(loss, -adv.mean())
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_fraction"]) == 0.0
    assert float(stats["approx_kl"]) == 0.0 and float(stats["ratio_max"]) == float(stats["ratio_min"]) == 1.0
    loss.backward()
    torch.testing.assert_close(new.grad, -adv / 16)  # d/dlogp of -A exp(logp - logp_old) at ratio 1


def test_policy_loss_hand_derived_cases():
    c = 0.1
    log = math.log
    # ratio 1.5 with A > 0: clipped at 1.1, no gradient; ratio 1.5 with A < 0: unclipped 1.5 wins
    # ratio 0.5 with A > 0: unclipped 0.5 wins;        ratio 0.5 with A < 0: clipped at 0.9, no gradient
    ratios = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.05], dtype=F64)
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0], dtype=F64)
    new = torch.log(ratios).requires_grad_()
    loss, stats = policy_loss(new, torch.zeros(5, dtype=F64), adv, clip_range=c)
    expected = [-1.1, 1.5, -1.0, 1.8, -3.15]
    assert float(loss) == pytest.approx(sum(expected) / 5)
    assert float(stats["clip_fraction"]) == pytest.approx(4 / 5)
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * sum(log(r) ** 2 for r in ratios.tolist()) / 5)
    loss.backward()
    # gradient flows only through the unclipped terms: d(-A r)/dlogp = -A r
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 1.5, -1.0, 0.0, -3.15], dtype=F64) / 5)


def test_policy_loss_equals_loop():
    gen = torch.Generator().manual_seed(1)
    for clip_range in (1e-4, 0.2):
        new = 0.01 * torch.randn(64, generator=gen, dtype=F64)
        old = torch.zeros(64, dtype=F64)
        adv = torch.randn(64, generator=gen, dtype=F64)
        loss, stats = policy_loss(new, old, adv, clip_range)
        ref_loss, ref_clip = loop_policy_loss(new, old, adv, clip_range)
        assert float(loss) == pytest.approx(ref_loss) and float(stats["clip_fraction"]) == pytest.approx(ref_clip)
    with pytest.raises(ValueError, match="same shape"):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(4))


def test_on_policy_rescoring_of_a_stored_transition_gives_ratio_one():
    """The trainer's path: store (x, x', logp_old) in the rollout, recompute the mean from the same v."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    v = torch.randn(4, 3, 8, 8, generator=gen)
    sigma, sigma_next = torch.tensor([0.9, 0.7, 0.5, 0.3]), torch.tensor([0.85, 0.6, 0.4, 0.0])
    mean, std = sde_mean_std(x, v, sigma, sigma_next)
    x_next = mean + std * torch.randn(4, 3, 8, 8, generator=gen)
    logp_old = gaussian_log_prob(x_next, mean, std)
    v_new = v.clone().requires_grad_()
    mean_new, std_new = sde_mean_std(x, v_new, sigma, sigma_next)
    loss, stats = policy_loss(gaussian_log_prob(x_next, mean_new, std_new), logp_old, torch.ones(4))
    assert float(stats["ratio_mean"]) == 1.0 and float(stats["clip_fraction"]) == 0.0
    loss.backward()
    assert float(v_new.grad.abs().sum()) > 0


# ---------------------------------------------------------------------------------------------------
# KL to the reference
# ---------------------------------------------------------------------------------------------------


def test_kl_to_reference_equals_torch_kl():
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    ref = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    for std in (torch.tensor(0.2, dtype=F64), torch.rand(3, 1, 1, generator=gen, dtype=F64) + 0.1):
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std.expand_as(mean)),
                                               torch.distributions.Normal(ref, std.expand_as(ref)))
        torch.testing.assert_close(kl_to_reference(mean, ref, std, reduce="mean"), kl.mean(dim=(1, 2)))
        torch.testing.assert_close(kl_to_reference(mean, ref, std, reduce="sum"), kl.sum(dim=(1, 2)))
    assert bool((kl_to_reference(mean, mean, 0.3) == 0).all())
    with pytest.raises(ValueError, match="same shape"):
        kl_to_reference(mean, ref[:2], 0.2)


# ---------------------------------------------------------------------------------------------------
# GRPO-Guard (arXiv 2510.22319): the re-centred ratio
# ---------------------------------------------------------------------------------------------------


def loop_guard_loss(x_next, mean, mean_old, std, adv, clip_range, weight):
    """One transition and one element at a time: log N densities, the drift b = ||mean - mean_old||^2 / (2 s^2),
    log r = s (log p - log p_old + b) (docs/notation.md), then the weighted clipped loss."""
    total = 0.0
    for n in range(x_next.shape[0]):
        xs, m, mo = x_next[n].flatten().tolist(), mean[n].flatten().tolist(), mean_old[n].flatten().tolist()
        s = float(std[n])
        logpdf = lambda x, mu: -(x - mu) ** 2 / (2 * s * s) - math.log(s) - 0.5 * math.log(2 * math.pi)  # noqa: E731
        delta = sum(logpdf(x, a) - logpdf(x, b) for x, a, b in zip(xs, m, mo)) / len(xs)
        drift = sum((a - b) ** 2 for a, b in zip(m, mo)) / len(xs) / (2 * s * s)
        ratio = math.exp(s * (delta + drift))
        a = float(adv[n])
        clipped = min(max(ratio, 1 - clip_range), 1 + clip_range)
        total += float(weight[n]) * max(-a * ratio, -a * clipped)
    return total / x_next.shape[0]


def _guard_batch(n=6, shape=(3, 2, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    mean_old = torch.randn((n, *shape), generator=g, dtype=F64)
    std = 0.05 + torch.rand(n, generator=g, dtype=F64)
    x_next = mean_old + std.view(-1, 1, 1, 1) * torch.randn((n, *shape), generator=g, dtype=F64)
    mean = mean_old + 0.1 * torch.randn((n, *shape), generator=g, dtype=F64)
    adv = torch.randn(n, generator=g, dtype=F64)
    return x_next, mean, mean_old, std, adv


@pytest.mark.parametrize("clip_range", [1e-4, 0.05, 10.0])
def test_guard_loss_equals_the_plain_loop(clip_range):
    x_next, mean, mean_old, std, adv = _guard_batch()
    s4 = std.view(-1, 1, 1, 1)  # the std as sde_mean_std gives it, [N, 1, ...]
    log_ratio = gaussian_log_prob(x_next, mean, s4) - gaussian_log_prob(x_next, mean_old, s4)
    guarded = guard_log_ratio(log_ratio, mean, mean_old, s4)
    # the closed form: mean((x' - mean_old)(mean - mean_old)) / std
    torch.testing.assert_close(guarded, ((x_next - mean_old) * (mean - mean_old)).flatten(1).mean(1) / std,
                               rtol=1e-10, atol=1e-12)
    weight = guard_step_weight(torch.linspace(0.9, 0.3, 6, dtype=F64), torch.linspace(0.8, 0.05, 6, dtype=F64), 0.1)
    loss, _ = ratio_loss(guarded, adv, clip_range, weight)
    assert loss.item() == pytest.approx(loop_guard_loss(x_next, mean, mean_old, std, adv, clip_range, weight),
                                        rel=1e-10)


def test_guard_ratio_is_exactly_one_on_policy():
    x_next, _, mean_old, std, adv = _guard_batch()
    logp = gaussian_log_prob(x_next, mean_old, std.view(-1, 1, 1, 1))
    guarded = guard_log_ratio(logp - logp, mean_old.clone(), mean_old, std)
    assert torch.equal(torch.exp(guarded), torch.ones_like(guarded))
    loss, stats = ratio_loss(guarded, adv, 1e-4)
    assert stats["clip_fraction"] == 0 and loss.item() == pytest.approx(-adv.mean().item(), rel=1e-12)


def test_guard_recentres_the_left_shifted_ratio_and_makes_it_step_consistent():
    """x' ~ N(mean_old, s^2), a policy that moved by d: the plain log-ratio has mean -||d||^2 / (2 s^2) (left of 0,
    the more so the smaller the step's std) and a spread ~ |d| / s; the guard's has mean 0 and the same spread at
    every std, so one clip range means the same at every step."""
    g = torch.Generator().manual_seed(1)
    n, shape = 20000, (4,)
    mean_old = torch.zeros((n, *shape), dtype=F64)
    mean = torch.full((n, *shape), 0.02, dtype=F64)
    z = torch.randn((n, *shape), generator=g, dtype=F64)
    plain, guarded = {}, {}
    for s in (0.05, 0.5):
        x_next = mean_old + s * z
        lr = gaussian_log_prob(x_next, mean, s) - gaussian_log_prob(x_next, mean_old, s)
        plain[s], guarded[s] = lr, guard_log_ratio(lr, mean, mean_old, torch.tensor(s, dtype=F64))
        assert lr.mean().item() == pytest.approx(-(0.02 ** 2) / (2 * s * s), rel=0.05)  # the drift
        assert abs(guarded[s].mean().item()) < 4 * guarded[s].std().item() / math.sqrt(n)  # re-centred
    assert plain[0.05].std().item() == pytest.approx(10 * plain[0.5].std().item(), rel=1e-6)
    torch.testing.assert_close(guarded[0.05], guarded[0.5], rtol=1e-9, atol=1e-12)  # z d: the std drops out


def test_guard_step_weight_is_one_on_a_uniform_grid():
    sigma = torch.linspace(1.0, 0.125, 8, dtype=F64)
    torch.testing.assert_close(guard_step_weight(sigma, sigma - 0.125, 0.125), torch.ones(8, dtype=F64))
    assert guard_step_weight(torch.tensor([0.5]), torch.tensor([0.45]), 0.1).item() == pytest.approx(2.0)


def test_policy_loss_is_ratio_loss_of_the_log_ratio_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    logp, logp_old, adv = (torch.randn(32, generator=g) for _ in range(3))
    a, sa = policy_loss(logp, logp_old, adv, 0.01)
    b, sb = ratio_loss(logp - logp_old, adv, 0.01)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)
