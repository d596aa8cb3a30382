"""Property tests of the step plan over grids of (T, w, tau, s, strategy, r, iteration), and the paper's NFE."""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics

import pytest
import torch

from mixgrpo.plan import (
    ALGORITHMS,
    FlashConfig,
    Plan,
    SamplerConfig,
    WindowConfig,
    build_plan,
    flash_num_steps,
    train_mask,
    window_start,
)
from mixgrpo.sampling import sigma_grid, unshift_sigmas

ITERATIONS = (0, 1, 24, 25, 26, 99, 10_000)


def window_configs(num_steps):
    """A grid of valid window configurations for T = num_steps."""
    for size in sorted({1, 2, 4, num_steps} - {0}):
        if size > num_steps:
            continue
        for start in sorted({0, 1, num_steps - size}):
            if start > num_steps - size:
                continue
            for tau in (1, 25):
                yield WindowConfig(size=size, strategy="frozen", start=start, tau=tau)
                yield WindowConfig(size=size, strategy="random", start=start, tau=tau)
                for stride in (1, 3):
                    yield WindowConfig(size=size, strategy="progressive", tau=tau, stride=stride, start=start)
                    yield WindowConfig(size=size, strategy="linear_decay", tau=tau, stride=stride, start=start,
                                       decay=2.0, tau_min=1)
                    yield WindowConfig(size=size, strategy="exp_decay", tau=tau, stride=stride, start=start,
                                       decay=0.3, tau_min=min(2, tau))


def mix_configs():
    for num_steps in (1, 2, 3, 6, 25):
        for window in window_configs(num_steps):
            for flash in (FlashConfig(), FlashConfig(enabled=True, ratio=0.2), FlashConfig(enabled=True, ratio=0.4),
                          FlashConfig(enabled=True, ratio=1.0)):
                yield SamplerConfig(num_steps=num_steps, window=window, flash=flash)


def check_contiguous(plan: Plan):
    steps = plan.steps
    assert steps[0].sigma == 1.0 and steps[-1].sigma_next == 0.0
    for a, b in zip(steps, steps[1:]):
        assert a.sigma_next == b.sigma
    assert all(s.sigma > s.sigma_next for s in steps)
    assert plan.sigmas.tolist() == [s.sigma for s in steps] + [0.0]


def test_mixgrpo_plan_properties_over_a_parameter_grid():
    count = 0
    for cfg in mix_configs():
        T, w, r = cfg.num_steps, cfg.window.size, cfg.flash.ratio
        grid = sigma_grid(T, cfg.shift).tolist()
        for it in ITERATIONS:
            plan = build_plan(cfg, it, seed=7)
            count += 1
            l, stop = plan.window
            assert stop - l == w and 0 <= l and stop <= T  # inside [0, T), never empty
            assert l == window_start(it, T, cfg.window, seed=7)
            check_contiguous(plan)
            kinds = [s.kind for s in plan.steps]
            assert kinds[l:stop] == ["sde"] * w and kinds.count("sde") == w
            assert [s.train for s in plan.steps] == [l <= i < stop for i in range(plan.nfe)]
            assert plan.num_trained == w and plan.train_fraction == 1.0
            # the steps before and in the window are the original grid, never compressed
            assert [(s.sigma, s.sigma_next) for s in plan.steps[:stop]] == list(zip(grid[:stop], grid[1:stop + 1]))
            assert kinds[:l] == ["ode"] * l
            if cfg.flash.enabled:
                post = plan.steps[stop:]
                assert all(s.kind == "dpm" and not s.train for s in post)
                expected = 0 if T - stop == 0 else max(1, math.floor((T - l - w) * r + 1e-9))
                assert len(post) == expected and plan.nfe == l + w + expected
                u = [unshift_sigmas(s.sigma, cfg.shift) for s in post] + [0.0]  # uniform in unshifted time
                assert all(abs(a - b - u[0] / len(post)) < 1e-12 for a, b in zip(u, u[1:]))
            else:
                assert plan.nfe == T and kinds[stop:] == ["ode"] * (T - stop)
            assert build_plan(cfg, it, seed=7) == plan  # a pure function of (cfg, iteration, seed)
    assert count > 5_000


def reference_window_positions(window: WindowConfig, num_steps: int, iterations: int) -> list[int]:
    """The stateful loop the official code runs (a counter and a position updated every iteration),
    written the obvious way; our pure `window_start` must reproduce it."""
    last = num_steps - window.size
    position, held, move, out = window.start, 0, 0, []
    for _ in range(iterations):
        out.append(position)
        if window.strategy == "frozen":
            continue
        held += 1
        if window.strategy == "linear_decay":
            hold = max(window.tau_min, math.floor(window.tau - window.decay * move + 0.5))
        elif window.strategy == "exp_decay":
            hold = max(window.tau_min, math.floor(window.tau * math.exp(-window.decay * move) + 0.5))
        else:
            hold = window.tau
        if held == hold and position < last:
            position, held, move = min(position + window.stride, last), 0, move + 1
    return out


@pytest.mark.parametrize("strategy", ["progressive", "frozen", "linear_decay", "exp_decay"])
def test_window_position_equals_the_stateful_loop(strategy):
    for num_steps in (4, 10, 25):
        for window in window_configs(num_steps):
            if window.strategy != strategy:
                continue
            ref = reference_window_positions(window, num_steps, 400)
            assert [window_start(i, num_steps, window) for i in range(400)] == ref


def test_progressive_window_reaches_and_stays_at_the_last_steps():
    for num_steps, size, stride, tau in itertools.product((5, 25), (1, 4), (1, 2, 7), (1, 25)):
        window = WindowConfig(size=size, tau=tau, stride=stride)
        end = num_steps - size
        positions = [window_start(i, num_steps, window) for i in range(tau * (num_steps + 1))]
        assert positions == sorted(positions) and positions[0] == 0
        assert positions[-1] == end and window_start(10 ** 6, num_steps, window) == end
        # the last step T - 1 is trained at the end (the official code never trains T - 2, T - 1)
        plan = build_plan(SamplerConfig(num_steps=num_steps, window=window), iteration=10 ** 6)
        assert plan.steps[-1].train and plan.steps[-1].kind == "sde"


def test_paper_progressive_schedule():
    """T = 25, w = 4, tau = 25, s = 1: l = iteration // 25 until 21."""
    window = WindowConfig()
    assert [window_start(i, 25, window) for i in (0, 24, 25, 49, 50, 300, 525, 10_000)] == [0, 0, 1, 1, 2, 12, 21, 21]


def test_decay_strategies_shorten_the_hold():
    lin = WindowConfig(strategy="linear_decay", tau=10, decay=3.0, tau_min=2)
    assert [lin.hold(k) for k in range(5)] == [10, 7, 4, 2, 2]
    exp = WindowConfig(strategy="exp_decay", tau=20, decay=0.5, tau_min=3)
    assert [exp.hold(k) for k in range(6)] == [20, 12, 7, 4, 3, 3]
    # moves happen after 10, 17, 21, 23 iterations
    assert [window_start(i, 25, lin) for i in (9, 10, 16, 17, 20, 21, 22, 23)] == [0, 1, 1, 2, 2, 3, 3, 4]


def test_random_window_is_seeded_and_covers_every_position():
    window = WindowConfig(strategy="random", start=2)
    seq = [window_start(i, 25, window, seed=3) for i in range(500)]
    assert seq == [window_start(i, 25, window, seed=3) for i in range(500)]  # every rank, every resume
    assert seq != [window_start(i, 25, window, seed=4) for i in range(500)]
    assert set(seq) == set(range(2, 22))  # reaches the last window {21, ..., 24}


def test_cps_window_avoids_the_deterministic_last_step():
    for strategy in ("progressive", "random"):
        cfg = SamplerConfig(sde_form="cps", eta=0.8, window=WindowConfig(strategy=strategy))
        for it in range(0, 2000, 7):
            plan = build_plan(cfg, it)
            assert plan.window[1] <= 24 and plan.steps[-1].kind == "ode" and not plan.steps[-1].train
        if strategy == "progressive":
            assert build_plan(cfg, 10 ** 6).window == (20, 24)
    plan = build_plan(SamplerConfig(sde_form="cps", eta=0.8, sde_steps="all", train_steps="all_but_last"))
    assert [s.kind for s in plan.steps] == ["sde"] * 24 + ["ode"]
    with pytest.raises(ValueError, match="CPS"):
        SamplerConfig(num_steps=4, sde_form="cps", eta=0.8)


def test_paper_nfe_and_trained_steps():
    """Paper Table 1 (T = 25): NFE rollout / trained per image."""
    plans = {name: build_plan(cfg) for name, cfg in ALGORITHMS.items()}
    assert (plans["mixgrpo"].nfe, plans["mixgrpo"].num_trained) == (25, 4)
    assert (plans["mixgrpo_flash_star"].nfe, plans["mixgrpo_flash_star"].num_trained) == (8, 4)
    assert (plans["flow_grpo"].nfe, plans["flow_grpo"].num_trained) == (25, 24)
    assert (plans["dance_grpo"].nfe, plans["dance_grpo"].num_trained) == (25, 14)
    flash = [build_plan(ALGORITHMS["mixgrpo_flash"], it).nfe for it in range(300)]  # the paper's 300 iterations
    assert round(statistics.mean(flash)) == 16
    assert all(build_plan(ALGORITHMS["mixgrpo_flash_star"], it).nfe == 8 for it in (0, 100, 10_000))
    assert flash_num_steps(21, 0.2) == 4 and flash_num_steps(10, 0.3) == 3 and flash_num_steps(2, 0.2) == 1
    assert flash_num_steps(0, 0.4) == 0


def test_baseline_plans():
    flow = build_plan(ALGORITHMS["flow_grpo"])
    assert flow.window is None and all(s.kind == "sde" for s in flow.steps)
    assert [s.train for s in flow.steps] == [True] * 24 + [False]
    assert (flow.sde_form, flow.eta) == ("flow_grpo", 0.7)
    dance = build_plan(ALGORITHMS["dance_grpo"])
    assert dance.window is None and (dance.sde_form, dance.eta, dance.train_fraction) == ("dance", 0.3, 0.6)
    star = build_plan(ALGORITHMS["mixgrpo_flash_star"], 1000)
    assert star.window == (0, 4) and (star.dpm_order, star.dpm_variant) == (2, "midpoint")
    ode = build_plan(SamplerConfig(sde_steps="none", train_steps="none"))
    assert all(s.kind == "ode" and not s.train for s in ode.steps) and ode.num_trained == 0


def test_train_mask_random_fraction():
    plan = build_plan(ALGORITHMS["dance_grpo"])
    candidates = torch.tensor([s.train for s in plan.steps])
    mask = train_mask(plan, 12, seed=5, iteration=3)
    assert mask.shape == (12, 25) and mask.dtype == torch.bool
    assert bool((mask.sum(1) == 14).all()) and not bool((mask & ~candidates).any())
    assert len({tuple(r.tolist()) for r in mask}) > 1  # per-sample subsets
    assert torch.equal(mask, train_mask(plan, 12, seed=5, iteration=3))
    assert not torch.equal(mask, train_mask(plan, 12, seed=5, iteration=4))
    assert not torch.equal(mask, train_mask(plan, 12, seed=6, iteration=3))
    # world size 1 vs 3: rank r asks for global rows [4r, 4r + 4)
    shards = [train_mask(plan, 4, seed=5, iteration=3, sample_offset=4 * r) for r in range(3)]
    assert torch.equal(torch.cat(shards), mask)
    # fractions round half up on the candidate count
    for fraction, k in ((0.6, 14), (0.5, 12), (0.02, 1), (1.0, 24)):
        cfg = dataclasses.replace(ALGORITHMS["dance_grpo"], train_fraction=fraction)
        p = build_plan(cfg)
        assert p.num_trained == k and bool((train_mask(p, 3, 0, 0).sum(1) == k).all())


def test_train_mask_without_fraction_copies_the_plan_flags():
    for name in ("mixgrpo", "mixgrpo_flash", "flow_grpo"):
        plan = build_plan(ALGORITHMS[name], iteration=77)
        flags = torch.tensor([s.train for s in plan.steps])
        assert torch.equal(train_mask(plan, 5, seed=1, iteration=77), flags.expand(5, -1))


@pytest.mark.parametrize("kwargs,field", [
    (dict(window=WindowConfig(size=30)), "window.size"),
    (dict(window=WindowConfig(start=22)), "window.start"),
    (dict(sde_steps="none"), "train_steps"),
    (dict(sde_steps="window", train_steps="all_but_last"), "sde_steps='all'"),
    (dict(sde_steps="all", train_steps="window", flash=FlashConfig(enabled=True)), "flash.enabled"),
    (dict(sde_form="ddpm"), "sde_form"),
    (dict(eta=-0.1), "eta"),
    (dict(sde_form="cps", eta=1.2), "eta"),
    (dict(train_fraction=0.0), "train_fraction"),
    (dict(num_steps=0), "num_steps"),
    (dict(shift=0.0), "shift"),
])
def test_sampler_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.").replace("(", r"\(")):
        SamplerConfig(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    (dict(strategy="sliding"), "window.strategy"),
    (dict(size=0), "window.size"),
    (dict(tau=0), "window.tau"),
    (dict(stride=0), "frozen"),
    (dict(start=-1), "window.start"),
    (dict(tau_min=30), "window.tau_min"),
    (dict(strategy="linear_decay"), "window.decay"),
    (dict(decay=0.5), "window.decay"),
])
def test_window_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        WindowConfig(**kwargs)


def test_flash_config_errors_and_window_start_errors():
    for kwargs, field in ((dict(ratio=0.0), "flash.ratio"), (dict(order=4), "flash.order"),
                          (dict(variant="rk"), "flash.variant")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            FlashConfig(**kwargs)
    with pytest.raises(ValueError, match="iteration"):
        window_start(-1, 25, WindowConfig())
    with pytest.raises(ValueError, match="exceeds num_steps"):
        window_start(0, 3, WindowConfig())
