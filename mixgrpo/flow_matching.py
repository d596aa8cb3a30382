"""Forward-process objectives: reinforcement on the rollout's final samples through the flow-matching loss.

GRPO (`mixgrpo.grpo`) scores stored reverse-process transitions with their Gaussian log-densities. The
objectives here need none of that: each final sample x0 of the rollout is noised again by the forward
process, x_sigma = (1 - sigma) x0 + sigma eps, at freshly drawn sigmas, and the model is trained on the
pre-training target u = eps - x0, weighted by the reward. Any sampler may produce x0 (Euler, DPM-Solver++ on
a Flash grid, the MixGRPO window); no SDE, log-probability or trajectory is stored.

- DiffusionNFT (Zheng et al., arXiv 2509.16117), `nft_loss`: with the sampling (old) velocity v_old and the
  trained v_theta, the implicit positive and negative policies
      v+ = (1 - beta) v_old + beta v_theta,      v- = (1 + beta) v_old - beta v_theta
  and the optimality probability r in [0, 1] of each sample (`optimality_probability`),
      L = E[ r ||v+ - u||^2 + (1 - r) ||v- - u||^2 ] / beta.
  A sample with r = 1/2 pulls v_theta nowhere (the two terms cancel to first order); high r pulls v_theta
  towards u, low r pushes it away, around v_old.
- AWM, Advantage Weighted Matching (Xue et al., arXiv 2509.25050), `awm_log_prob` + `mixgrpo.grpo.policy_loss`:
  the flow-matching loss as a log-likelihood surrogate, log p = -w(sigma) ||v_theta - u||^2, inside the clipped
  policy-gradient loss with the group advantages; the ratio is taken against the sampling policy.

- V-GRPO, Variational GRPO (Tang et al., arXiv 2604.23380), `vgrpo_loss`: the whole generation is one action
  whose log-likelihood is the negative flow-matching loss of the final sample over M timestep-noise pairs,
  log p ~ -L = -(1/M) sum_m l(v_m, u_m, sigma_m) (`vgrpo_surrogate`), inside GRPO's clipped loss with the
  ratio exp(L_old - L) and softly clipped advantages (`soft_clip_advantages`); the pairs are drawn by
  `stratified_sigmas` and shared within a group (`mixgrpo.objectives.VGRPO`).

Shapes: N samples; latents [N, *latent]; sigma [N]; per-sample reductions are the MEAN over latent elements,
as for `mixgrpo.sampling.gaussian_log_prob`. All losses are computed in float32 (float64 if an input is).
"""

from __future__ import annotations

import torch

from mixgrpo.grpo import ratio_loss
from mixgrpo.sampling import reduce_latent

SIGMA_SAMPLERS = ("logit_normal", "uniform")
NFT_WEIGHTINGS = ("none", "adaptive")
AWM_WEIGHTINGS = ("uniform", "sigma", "sigma2")

SIGMA_MIN = 1e-3
"""Smallest training sigma: at sigma = 0 the target eps - x0 carries no information about x0's surroundings
and the x0-space weighting divides by zero; both ends are clamped to [SIGMA_MIN, 1 - SIGMA_MIN]."""


def _dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def sample_sigmas(num: int, generator: torch.Generator, how: str = "logit_normal", mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """[num] float64 training sigmas, drawn with `generator`.

    "logit_normal": sigma = sigmoid(mean + std z), z ~ N(0, 1) (SD3's training distribution);
    "uniform": sigma ~ U(0, 1). Both are clamped to [SIGMA_MIN, 1 - SIGMA_MIN]. (A third sampler, uniform over the
    current MixGRPO window's sigma range, was measured and removed: docs/results.md, sessions 7-8.)
    """
    if how == "logit_normal":
        z = torch.randn(num, generator=generator, dtype=torch.float64)
        sigma = torch.sigmoid(mean + std * z)
    elif how == "uniform":
        sigma = torch.rand(num, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"sigma sampler {how!r} is unknown: use one of {SIGMA_SAMPLERS}")
    return sigma.clamp(SIGMA_MIN, 1 - SIGMA_MIN)


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward process and its flow-matching target: (x_sigma = (1 - sigma) x0 + sigma eps, u = eps - x0).
    x0, eps: [N, *latent]; sigma: [N]."""
    s = _bcast(sigma, x0)
    return (1 - s) * x0 + s * eps, eps - x0


def optimality_probability(advantages: torch.Tensor, clip: float = 2.0) -> torch.Tensor:
    """DiffusionNFT's r = 1/2 + 1/2 clip(A / clip, -1, 1) in [0, 1], from group-normalised advantages A."""
    if clip <= 0:
        raise ValueError(f"clip = {clip}: the advantage scale of the optimality probability must be > 0")
    return 0.5 + 0.5 * (advantages / clip).clamp(-1.0, 1.0)


def _matching_error(v: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample [N] squared error of a velocity against the flow-matching target.

    "none": mean ||v - u||^2. "adaptive" (the DiffusionNFT code's x0-space loss): the x0-prediction error
    x0_hat - x0 = sigma (u - v) squared, divided by its own detached mean absolute value, so every sample and
    sigma contributes on one scale.
    """
    diff = v - target
    if weighting == "none":
        return reduce_latent(diff ** 2, "mean")
    if weighting == "adaptive":
        err = _bcast(sigma, diff) * diff  # x0_hat - x0
        scale = reduce_latent(err.abs(), "mean").detach().clamp_min(1e-5)  # [N]
        return reduce_latent(err ** 2, "mean") / scale
    raise ValueError(f"weighting {weighting!r} is unknown: use one of {NFT_WEIGHTINGS}")


def nft_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, sigma: torch.Tensor,
             beta: float = 1.0, weighting: str = "none") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT loss, averaged over N samples (module docstring). Returns (scalar loss, stats).

    v: [N, *latent] trained velocity at x_sigma (requires grad); v_old: the sampling policy's velocity there
    (a constant); target: u = eps - x0; r: [N] optimality probabilities; sigma: [N]; beta > 0.
    Stats: positive_loss, negative_loss (means of the two branches), velocity_shift = mean ||v - v_old||^2.
    """
    if not v.shape == v_old.shape == target.shape:
        raise ValueError(f"v {tuple(v.shape)}, v_old {tuple(v_old.shape)} and target {tuple(target.shape)} must "
                         f"have the same shape [N, *latent]")
    if r.shape != v.shape[:1] or sigma.shape != v.shape[:1]:
        raise ValueError(f"r {tuple(r.shape)} and sigma {tuple(sigma.shape)} must have shape [N] = [{v.shape[0]}]")
    if beta <= 0:
        raise ValueError(f"beta = {beta}: the NFT guidance strength must be > 0")
    dtype = _dtype(v, v_old, target)
    v, v_old, target = v.to(dtype), v_old.detach().to(dtype), target.to(dtype)
    r = r.detach().to(dtype)
    positive = (1 - beta) * v_old + beta * v                          # [N, *latent]
    negative = (1 + beta) * v_old - beta * v                          # [N, *latent]
    pos = _matching_error(positive, target, sigma, weighting)         # [N]
    neg = _matching_error(negative, target, sigma, weighting)         # [N]
    loss = ((r * pos + (1 - r) * neg) / beta).mean()
    with torch.no_grad():
        stats = {"positive_loss": pos.mean(), "negative_loss": neg.mean(),
                 "velocity_shift": reduce_latent((v - v_old) ** 2, "mean").mean()}
    return loss, stats


def awm_log_prob(v: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
                 weighting: str = "uniform") -> torch.Tensor:
    """AWM's log-likelihood surrogate per sample, [N]: -w(sigma) mean ||v - u||^2 with w = 1 ("uniform"),
    sigma ("sigma") or sigma^2 ("sigma2"). v, target: [N, *latent]; sigma: [N]."""
    if v.shape != target.shape:
        raise ValueError(f"v {tuple(v.shape)} and target {tuple(target.shape)} must have the same shape")
    dtype = _dtype(v, target)
    err = reduce_latent((v.to(dtype) - target.to(dtype)) ** 2, "mean")  # [N]
    return -awm_weight(sigma.to(dtype), weighting) * err


def awm_weight(sigma: torch.Tensor, weighting: str = "uniform") -> torch.Tensor:
    """AWM's w(sigma), [N]: 1 ("uniform"), sigma ("sigma") or sigma^2 ("sigma2"). The surrogate -w ||v - u||^2 is
    log N(u | v, 1 / (2 w)) up to a constant, a Gaussian of std 1 / sqrt(2 w) (what GRPO-Guard re-centres)."""
    if weighting == "uniform":
        return torch.ones_like(sigma)
    if weighting == "sigma":
        return sigma
    if weighting == "sigma2":
        return sigma * sigma
    raise ValueError(f"weighting {weighting!r} is unknown: use one of {AWM_WEIGHTINGS}")

def stratified_sigmas(num: int, strata: int, generator: torch.Generator) -> torch.Tensor:
    """[num] float64 training sigmas, term j uniform in its stratum [(j mod M) / M, (j mod M + 1) / M) of
    M = `strata` equal parts of (0, 1) (V-GRPO's stratified timesteps: every M consecutive terms cover the whole
    noise range once), clamped to [SIGMA_MIN, 1 - SIGMA_MIN]."""
    u = torch.rand(num, generator=generator, dtype=torch.float64)
    j = torch.arange(num, dtype=torch.float64) % strata
    return ((j + u) / strata).clamp(SIGMA_MIN, 1 - SIGMA_MIN)


def soft_clip_advantages(advantages: torch.Tensor, eta: float) -> torch.Tensor:
    """V-GRPO's advantage soft-clip, eta tanh(A / eta) (|A| < eta, and ~A for |A| << eta); eta = 0: A unchanged."""
    if eta < 0:
        raise ValueError(f"eta = {eta}: the soft-clip scale must be > 0 (or 0 for none)")
    return advantages if eta == 0 else eta * torch.tanh(advantages / eta)


def vgrpo_surrogate(v: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, weighting: str = "adaptive"
                    ) -> torch.Tensor:
    """V-GRPO's flow-matching loss of each sample over its M pairs, L = (1/M) sum_m l(v_m, u_m, sigma_m), [N]:
    l the velocity MSE ("none") or the x0-space error normalised by its own detached mean absolute value
    ("adaptive", the paper's adaptive loss weighting; `_matching_error`). v, target: [N, M, *latent]; sigma: [N, M]."""
    if v.shape != target.shape or v.shape[:2] != sigma.shape:
        raise ValueError(f"v {tuple(v.shape)} and target {tuple(target.shape)} must be [N, M, *latent] and sigma "
                         f"{tuple(sigma.shape)} [N, M]")
    dtype = _dtype(v, target)
    err = _matching_error(v.flatten(0, 1).to(dtype), target.flatten(0, 1).to(dtype), sigma.flatten(), weighting)
    return err.view(sigma.shape).mean(1)


def vgrpo_loss(v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor,
               advantages: torch.Tensor, clip_range: float, weighting: str = "adaptive", adv_soft_clip: float = 3.0,
               kl_old: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """V-GRPO's loss, averaged over N samples (docs/notation.md). Returns (scalar loss, stats).

    v: [N, M, *latent] the trained velocities at the sample's M noised points (requires grad); v_old: the old
    (sampling) policy's there; target: u = eps - x0; sigma: [N, M]; advantages: [N] group advantages.
    log ratio = L(v_old) - L(v) (`vgrpo_surrogate`: one ratio per sample, the generation one action);
    L = mean(max(-A' ratio, -A' clip(ratio, 1 - c, 1 + c))) + kl_old mean ||x0_hat - x0_hat_old||^2 with
    A' = `soft_clip_advantages`(A, adv_soft_clip) and x0_hat - x0_hat_old = -sigma (v - v_old) (the paper's KL to the
    old policy). Stats: those of `mixgrpo.grpo.ratio_loss`, surrogate (mean L), and kl_to_old when kl_old > 0.
    """
    if v.shape != v_old.shape:
        raise ValueError(f"v {tuple(v.shape)} and v_old {tuple(v_old.shape)} must have the same shape [N, M, *latent]")
    if advantages.shape != v.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must have shape [N] = [{v.shape[0]}]")
    surrogate = vgrpo_surrogate(v, target, sigma, weighting)                              # [N]
    with torch.no_grad():
        surrogate_old = vgrpo_surrogate(v_old, target, sigma, weighting)                  # [N]
    adv = soft_clip_advantages(advantages.to(surrogate.dtype), adv_soft_clip)
    loss, stats = ratio_loss(surrogate_old - surrogate, adv, clip_range)
    stats = {**stats, "surrogate": surrogate.detach().mean()}
    if kl_old > 0:
        shift = _bcast(sigma.flatten(), v.flatten(0, 1)) * (v.flatten(0, 1) - v_old.flatten(0, 1).detach())
        kl = reduce_latent(shift.to(surrogate.dtype) ** 2, "mean").mean()
        loss = loss + kl_old * kl
        stats["kl_to_old"] = kl.detach()
    return loss, stats
