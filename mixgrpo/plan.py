"""The step plan of one rollout: for every step its sigmas, its kind (ode / sde / dpm) and whether it is trained.

All five algorithms are configurations of this one function (presets in `ALGORITHMS`):

    MixGRPO        SDE inside a sliding window of w steps, ODE (Euler) elsewhere; the window steps are trained.
    MixGRPO-Flash  as MixGRPO, and the steps after the window are re-gridded onto fewer DPM-Solver++ steps.
    Flash*         Flash with the window frozen at {0, ..., w - 1} and ratio 0.2.
    Flow-GRPO      SDE at every step; all steps but the last are trained.
    DanceGRPO      SDE at every step; a seeded random fraction of the steps (all but the last) per sample.
    ode            Euler at every step, nothing trained (for the forward-process objectives, `mixgrpo.flow_matching`).

The plan is a pure function of (config, iteration, seed): resuming needs no window state, and every rank
builds the same plan. Step kinds, the window strategies and the NFE rule are documented in docs/notation.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field

import torch

from mixgrpo.sampling import DPM_VARIANTS, SDE_FORMS, shift_sigmas, sigma_grid

WINDOW_STRATEGIES = ("progressive", "frozen", "random", "linear_decay", "exp_decay")
SDE_STEPS = ("window", "all", "none")
TRAIN_STEPS = ("window", "all_but_last", "random_fraction", "none")
STEP_KINDS = ("ode", "sde", "dpm")
MAX_STEPS = 10_000
"""The most steps a plan may have: a plan is materialised (one Step per step), and no flow model needs more."""


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} = {value!r} is not supported: use one of {allowed}")


@dataclass(frozen=True)
class WindowConfig:
    """The MixGRPO sliding window W(l) = {l, ..., l + size - 1} over the T steps.

    progressive:  l = min(start + stride * (iteration // tau), T - size)   (the paper's default).
    frozen:       l = start.
    random:       l uniform in {start, ..., T - size}, drawn from (seed, iteration): identical on every
                  rank and after a resume; tau and stride are not used.
    linear_decay: progressive, but the k-th window position is held for
                  tau_k = max(tau_min, round(tau - decay * k)) iterations (decay: iterations per move).
    exp_decay:    progressive with tau_k = max(tau_min, round(tau * exp(-decay * k))) (decay: rate per move).
    """

    size: int = 4  # w, steps in the window (SDE and trained)
    strategy: str = "progressive"  # "progressive", "frozen", "random", "linear_decay" or "exp_decay"
    tau: int = 25  # iterations between two moves of the window
    stride: int = 1  # steps the window moves at each move
    start: int = 0  # the first window position l
    tau_min: int = 1  # linear_decay / exp_decay: the smallest tau
    decay: float = 0.0  # linear_decay: iterations per move; exp_decay: rate per move; 0 for the others

    def __post_init__(self) -> None:
        _one_of("window.strategy", self.strategy, WINDOW_STRATEGIES)
        if self.size < 1:
            raise ValueError(f"window.size = {self.size}: the window needs at least one step")
        if self.tau < 1:
            raise ValueError(f"window.tau = {self.tau}: the window moves every tau >= 1 iterations")
        if self.stride < 1:
            raise ValueError(f"window.stride = {self.stride}: use stride >= 1, or strategy='frozen' "
                             "for a window that never moves")
        if self.start < 0:
            raise ValueError(f"window.start = {self.start}: the first window position must be >= 0")
        if not 1 <= self.tau_min <= self.tau:
            raise ValueError(f"window.tau_min = {self.tau_min}: it must be in [1, tau = {self.tau}]")
        decays = self.strategy in ("linear_decay", "exp_decay")
        if decays and self.decay <= 0:
            raise ValueError(f"window.decay = {self.decay}: strategy {self.strategy!r} needs decay > 0 "
                             "(use strategy='progressive' for a constant tau)")
        if not decays and self.decay != 0:
            raise ValueError(f"window.decay = {self.decay} has no effect with strategy {self.strategy!r}: "
                             "set decay = 0 or use 'linear_decay' / 'exp_decay'")

    def hold(self, move: int) -> int:
        """Iterations the window stays at its `move`-th position (tau_k of the class docstring)."""
        if self.strategy == "linear_decay":
            return max(self.tau_min, math.floor(self.tau - self.decay * move + 0.5))
        if self.strategy == "exp_decay":
            return max(self.tau_min, math.floor(self.tau * math.exp(-self.decay * move) + 0.5))
        return self.tau


@dataclass(frozen=True)
class FlashConfig:
    """MixGRPO-Flash: re-grid the steps after the window onto fewer DPM-Solver++ steps (see `flash_num_steps`)."""

    enabled: bool = False  # DPM-Solver++ on a compressed grid after the window (set by the Flash presets)
    ratio: float = 0.4  # compression: the steps after the window become round(ratio x their number)
    order: int = 2  # DPM-Solver++ order (1, 2 or 3)
    variant: str = "midpoint"  # 2nd-order update: one of DPM_VARIANTS

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"flash.ratio = {self.ratio}: the compression ratio must be in (0, 1]")
        if self.order not in (1, 2, 3):
            raise ValueError(f"flash.order = {self.order}: DPM-Solver++ orders 1, 2 and 3 are implemented")
        _one_of("flash.variant", self.variant, DPM_VARIANTS)


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that decides the steps of a rollout. See `ALGORITHMS` for the five presets.

    sde_steps:   "window" (MixGRPO), "all" (Flow-GRPO, DanceGRPO) or "none" (plain ODE sampling).
    train_steps: "window", "all_but_last", "random_fraction" (train_fraction of all but the last step, per
                 sample) or "none".
    eta:         SDE noise level; for sde_form="cps" it is the angle a in [0, 1].
    """

    num_steps: int = 25  # T, steps of a rollout (and of the before/after evaluation)
    shift: float = 3.0  # static time shift of the sigma grid (1 = none)
    sde_form: str = "flow_grpo"  # one of SDE_FORMS: "flow_grpo", "dance" or "cps"
    eta: float = 0.7  # SDE noise level; for sde_form "cps" the angle a in [0, 1]
    sde_steps: str = "window"  # "window" (MixGRPO), "all" (Flow-GRPO, DanceGRPO) or "none" (ODE sampling)
    train_steps: str = "window"  # "window", "all_but_last", "random_fraction" or "none"
    train_fraction: float = 0.6  # random_fraction: share of all but the last step trained, per sample
    window: WindowConfig = field(default_factory=WindowConfig)
    flash: FlashConfig = field(default_factory=FlashConfig)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps = {self.num_steps}: a rollout needs at least one step")
        if self.num_steps > MAX_STEPS:
            raise ValueError(f"num_steps = {self.num_steps}: use at most {MAX_STEPS} steps (flow models sample well "
                             f"in 10 to 100; the plan of {self.num_steps:,} would not fit in memory)")
        if not 0 < self.shift < math.inf:
            raise ValueError(f"shift = {self.shift}: the time shift must be a finite number > 0 (1 = no shift)")
        _one_of("sde_form", self.sde_form, SDE_FORMS)
        _one_of("sde_steps", self.sde_steps, SDE_STEPS)
        _one_of("train_steps", self.train_steps, TRAIN_STEPS)
        if not 0 <= self.eta < math.inf or (self.sde_form == "cps" and self.eta > 1):
            limit = "in [0, 1] for sde_form='cps'" if self.sde_form == "cps" else ">= 0"
            raise ValueError(f"eta = {self.eta}: the noise level must be {limit}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction = {self.train_fraction}: it must be in (0, 1]")
        if self.train_steps != "none" and self.sde_steps == "none":
            raise ValueError(f"train_steps = {self.train_steps!r} needs SDE steps (only they have a log-prob): "
                             "set sde_steps to 'window' or 'all', or train_steps='none'")
        if self.train_steps in ("all_but_last", "random_fraction") and self.sde_steps != "all":
            raise ValueError(f"train_steps = {self.train_steps!r} trains steps outside any window: "
                             "set sde_steps='all' (Flow-GRPO / DanceGRPO), or use train_steps='window'")
        if self.train_steps in ("all_but_last", "random_fraction") and self.num_steps < 2:
            raise ValueError(f"train_steps = {self.train_steps!r} needs num_steps >= 2")
        if self.flash.enabled and self.sde_steps != "window":
            raise ValueError("flash.enabled compresses the steps after the SDE window: set sde_steps='window'")
        if self.uses_window:
            span = self.window_span
            if self.window.size > span:
                cps = ", minus the deterministic last CPS step" if self.sde_form == "cps" else ""
                raise ValueError(f"window.size = {self.window.size} exceeds the {span} steps it can slide over "
                                 f"(num_steps = {self.num_steps}{cps}): lower window.size or raise num_steps")
            if self.window.start > span - self.window.size:
                raise ValueError(f"window.start = {self.window.start}: the last window position is "
                                 f"{span - self.window.size} (num_steps - window.size)")

    @property
    def uses_window(self) -> bool:
        return self.sde_steps == "window" or self.train_steps == "window"

    @property
    def window_span(self) -> int:
        """Steps the window slides over: all T, but T - 1 under CPS, whose last step (sigma' = 0) has std 0."""
        return self.num_steps - 1 if self.sde_form == "cps" else self.num_steps


@dataclass(frozen=True)
class Step:
    """One model call of a rollout: integrate from `sigma` to `sigma_next` with `kind`; `train`: a candidate
    for the loss (every trained step is an "sde" step)."""

    sigma: float
    sigma_next: float
    kind: str  # "ode" | "sde" | "dpm"
    train: bool


@dataclass(frozen=True)
class Plan:
    """The steps of one rollout (the same for every sample of an iteration).

    window: [start, stop) indices into `steps` of the SDE window, or None. train_fraction < 1 means each
    sample trains a seeded subset of the train-flagged steps (`train_mask`); 1.0 means all of them.
    """

    steps: tuple[Step, ...]
    window: tuple[int, int] | None
    sde_form: str
    eta: float
    dpm_order: int
    dpm_variant: str
    train_fraction: float = 1.0

    @property
    def nfe(self) -> int:
        """Model calls of one image's rollout (without CFG doubling): one per step."""
        return len(self.steps)

    @property
    def num_candidates(self) -> int:
        return sum(s.train for s in self.steps)

    @property
    def num_trained(self) -> int:
        """K, the steps trained per sample: round(train_fraction * candidates) (at least 1) or all candidates."""
        n = self.num_candidates
        if self.train_fraction >= 1 or n == 0:
            return n
        return max(1, math.floor(self.train_fraction * n + 0.5))

    @property
    def sigmas(self) -> torch.Tensor:
        """[nfe + 1] float64: sigma of every step, then the final sigma_next (0)."""
        return torch.tensor([s.sigma for s in self.steps] + [self.steps[-1].sigma_next], dtype=torch.float64)


def window_start(iteration: int, num_steps: int, window: WindowConfig, seed: int = 0) -> int:
    """First step l of the window at `iteration`: a pure function of its arguments, in [start, T - size]."""
    if iteration < 0:
        raise ValueError(f"iteration = {iteration} must be >= 0")
    last = num_steps - window.size
    if last < 0:
        raise ValueError(f"window.size = {window.size} exceeds num_steps = {num_steps}")
    if window.start > last:
        raise ValueError(f"window.start = {window.start}: the last window position is {last}")
    if window.strategy == "frozen":
        return window.start
    if window.strategy == "random":
        # A string seed goes through SHA-512: the same value in every process, unlike hash().
        return random.Random(f"mixgrpo-window:{seed}:{iteration}").randint(window.start, last)
    moves_needed = -(-(last - window.start) // window.stride)  # moves until the window reaches the end
    moves, elapsed = 0, 0
    while moves < moves_needed and elapsed + window.hold(moves) <= iteration:
        elapsed += window.hold(moves)
        moves += 1
    return min(window.start + moves * window.stride, last)


def flash_num_steps(remaining: int, ratio: float) -> int:
    """DPM-Solver++ steps replacing the `remaining` = T - l - w steps after the window.

    max(1, floor(remaining * ratio)) (0 if nothing remains). Floor, not ceil, is what gives the paper's
    NFE: Flash* (T = 25, w = 4, l = 0, r = 0.2) = 4 + floor(4.2) = 8, and Flash (r = 0.4, tau = 20, 300
    iterations) averages 16.2 (paper: 16); ceil would give 9 and 17.1.
    """
    if remaining <= 0:
        return 0
    return max(1, math.floor(remaining * ratio + 1e-9))  # 1e-9: 10 * 0.3 must count as 3, not 2


def build_plan(cfg: SamplerConfig, iteration: int = 0, seed: int = 0) -> Plan:
    """The rollout plan of `iteration` (see the module docstring for the algorithms).

    Steps before the window are plain Euler steps on the original grid (never compressed: the paper's Table
    12 shows training collapses otherwise). With Flash, the steps after the window are replaced by
    `flash_num_steps` DPM-Solver++ steps spaced uniformly in unshifted time u and then shifted, from the
    window's last sigma exactly down to sigma = 0. NFE = l + w + flash_num_steps(T - l - w, r) with Flash,
    T otherwise.
    """
    T = cfg.num_steps
    grid = sigma_grid(T, cfg.shift).tolist()
    span = cfg.window_span  # CPS: the last step is deterministic, so never SDE and never trained
    window = None
    if cfg.uses_window:
        start = window_start(iteration, span, cfg.window, seed)
        window = (start, start + cfg.window.size)

    def kind(i: int) -> str:
        if cfg.sde_steps == "all" and i < span:
            return "sde"
        if cfg.sde_steps == "window" and window[0] <= i < window[1]:
            return "sde"
        return "ode"

    def trained(i: int) -> bool:
        if cfg.train_steps == "window":
            return window[0] <= i < window[1]
        if cfg.train_steps in ("all_but_last", "random_fraction"):
            return i < T - 1
        return False

    stop = window[1] if cfg.flash.enabled else T
    steps = [Step(grid[i], grid[i + 1], kind(i), trained(i)) for i in range(stop)]
    if cfg.flash.enabled:
        n = flash_num_steps(T - stop, cfg.flash.ratio)
        u = torch.linspace(1 - stop / T, 0.0, n + 1, dtype=torch.float64)
        post = shift_sigmas(u, cfg.shift).tolist()
        post[0], post[-1] = grid[stop], 0.0  # continuous with the window, exactly 0 at the end
        steps += [Step(post[j], post[j + 1], "dpm", False) for j in range(n)]
    return Plan(
        steps=tuple(steps),
        window=window,
        sde_form=cfg.sde_form,
        eta=cfg.eta,
        dpm_order=cfg.flash.order,
        dpm_variant=cfg.flash.variant,
        train_fraction=cfg.train_fraction if cfg.train_steps == "random_fraction" else 1.0,
    )


def ode_plan(num_steps: int = 25, shift: float = 3.0) -> Plan:
    """A deterministic Euler plan on the shifted grid: the `ode` preset (the evaluation and default sampling plan)."""
    return build_plan(dataclasses.replace(ALGORITHMS["ode"], num_steps=num_steps, shift=shift))


def train_mask(plan: Plan, batch_size: int, seed: int, iteration: int, sample_offset: int = 0) -> torch.Tensor:
    """[B, nfe] bool: which steps each sample trains.

    With train_fraction < 1 (DanceGRPO) row b trains `plan.num_trained` of the plan's train-flagged steps,
    drawn from (seed, iteration, sample_offset + b): a rank holding global samples [offset, offset + B) gets
    the same rows at any world size. Otherwise every row equals the plan's train flags.
    """
    flags = torch.tensor([s.train for s in plan.steps], dtype=torch.bool)
    if plan.train_fraction >= 1:
        return flags.expand(batch_size, -1).clone()
    candidates = [i for i, s in enumerate(plan.steps) if s.train]
    k = plan.num_trained
    mask = torch.zeros(batch_size, len(plan.steps), dtype=torch.bool)
    for b in range(batch_size):
        rng = random.Random(f"mixgrpo-train-mask:{seed}:{iteration}:{sample_offset + b}")
        mask[b, rng.sample(candidates, k)] = True
    return mask


ALGORITHMS: dict[str, SamplerConfig] = {
    "mixgrpo": SamplerConfig(),
    "mixgrpo_flash": SamplerConfig(window=WindowConfig(tau=20), flash=FlashConfig(enabled=True, ratio=0.4)),
    "mixgrpo_flash_star": SamplerConfig(window=WindowConfig(strategy="frozen", start=0),
                                        flash=FlashConfig(enabled=True, ratio=0.2)),
    "flow_grpo": SamplerConfig(sde_form="flow_grpo", eta=0.7, sde_steps="all", train_steps="all_but_last"),
    "dance_grpo": SamplerConfig(sde_form="dance", eta=0.3, sde_steps="all", train_steps="random_fraction",
                                train_fraction=0.6),
    # Deterministic Euler sampling, nothing trained: a rollout for the forward-process objectives
    # (objective: diffusion_nft / awm / v_grpo), which train on final samples only.
    "ode": SamplerConfig(sde_steps="none", train_steps="none"),
}
