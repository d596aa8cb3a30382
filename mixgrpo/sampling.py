"""Pure step math of a flow-matching rollout: sigma grids, ODE / SDE / DPM-Solver++ steps, log-densities.

Notation (docs/notation.md): sigma in [0, 1], 1 = noise, 0 = data; x_sigma = (1 - sigma) x0 + sigma eps;
the model predicts the velocity v ~= eps - x0, so x0_hat = x - sigma v and eps_hat = x + (1 - sigma) v.
A step goes from `sigma` to `sigma_next` < `sigma`; dt = sigma_next - sigma < 0.

Every function is stateless. `sigma` and `sigma_next` may be Python floats, 0-d tensors, or [B] tensors
(one sigma per sample, broadcast over the trailing dims of x), so one model call may hold samples at
different steps. Step arithmetic runs in float64 when x is float64 and in float32 otherwise: a bf16 / fp16
model output is upcast, and the result is float32 (the caller decides whether to cast back).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

Sigma = float | torch.Tensor

SDE_FORMS = ("flow_grpo", "dance", "cps")
DPM_VARIANTS = ("midpoint", "heun")


# ----------------------------------------------------------------------------------------------------
# Sigma grids
# ----------------------------------------------------------------------------------------------------


def shift_sigmas(u: Sigma, shift: float) -> Sigma:
    """Static time shift of SD3 / FLUX: sigma = s u / (1 + (s - 1) u). s > 1 spends more steps at high noise."""
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigmas(sigma: Sigma, shift: float) -> Sigma:
    """Inverse of `shift_sigmas`: u = sigma / (s - (s - 1) sigma)."""
    return sigma / (shift - (shift - 1) * sigma)


def sigma_grid(num_steps: int, shift: float = 3.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[T + 1] grid from sigma_0 = 1 down to sigma_T = 0: uniform u = 1 - i / T, then `shift_sigmas`."""
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps}: a rollout needs at least one step")
    if shift <= 0:
        raise ValueError(f"shift = {shift}: the time shift must be > 0 (1 = no shift)")
    u = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift_sigmas(u, shift)
    sigmas[0], sigmas[-1] = 1.0, 0.0  # exact end points whatever the rounding
    return sigmas.to(dtype)


def flux_mu(seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift parameter: mu linear in the image token count, 0.5 at 256, 1.15 at 4096."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (seq_len - base_seq_len)


def flux_sigma_grid(num_steps: int, seq_len: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[T + 1] FLUX inference grid: sigma = e^mu / (e^mu + 1/u - 1) on u = 1, 1 - 1/T, ..., 1/T, then 0.

    Equals diffusers' FluxPipeline + FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True) (which
    computes it in float32). The exponential shift with e^mu is the static shift with s = e^mu.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps}: a rollout needs at least one step")
    return sigma_grid(num_steps, shift=math.exp(flux_mu(seq_len)), dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Broadcasting and precision helpers
# ----------------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _bcast(sigma: Sigma, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float, 0-d or [B] sigma as a tensor broadcastable to x: 0-d, or [B, 1, ..., 1]."""
    s = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if s.dim() == 0:
        return s
    if s.dim() != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma has shape {tuple(s.shape)}; expected a float, a 0-d tensor or a [B] tensor "
                         f"with B = x.shape[0] = {x.shape[0]}")
    return s.view(-1, *([1] * (x.dim() - 1)))


def _prepare(x: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    dtype = _compute_dtype(x)
    return tuple(t.to(dtype) for t in (x, *others))


# ----------------------------------------------------------------------------------------------------
# Predictions and the ODE step
# ----------------------------------------------------------------------------------------------------


def predict_x0(x: torch.Tensor, v: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """x0_hat = x - sigma v. x, v: [B, ...]; returns [B, ...] in the compute dtype."""
    x, v = _prepare(x, v)
    return x - _bcast(sigma, x, x.dtype) * v


def predict_eps(x: torch.Tensor, v: torch.Tensor, sigma: Sigma) -> torch.Tensor:
    """eps_hat = x + (1 - sigma) v. x, v: [B, ...]; returns [B, ...] in the compute dtype."""
    x, v = _prepare(x, v)
    return x + (1 - _bcast(sigma, x, x.dtype)) * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: Sigma, sigma_next: Sigma) -> torch.Tensor:
    """Euler step of the probability-flow ODE dx/dsigma = v: x' = x + (sigma' - sigma) v."""
    x, v = _prepare(x, v)
    dt = _bcast(sigma_next, x, x.dtype) - _bcast(sigma, x, x.dtype)
    return x + dt * v


# ----------------------------------------------------------------------------------------------------
# SDE steps
# ----------------------------------------------------------------------------------------------------


class SDEStepOutput(NamedTuple):
    """x_next = mean + std * noise. x_next, mean: [B, ...]; std: 0-d or [B, 1, ..., 1]."""

    x_next: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def sde_mean_std(x: torch.Tensor, v: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                 form: str = "flow_grpo", eta: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [B, ...] and std (0-d or [B, 1, ...]) of the Gaussian transition x -> x' of one SDE step.

    Only the mean depends on v (the policy); the trainer re-scores a stored x' by calling this again with a
    new v and the stored x, sigma, sigma_next. Forms (dt = sigma' - sigma < 0):

    - "flow_grpo": g = eta sqrt(sigma / (1 - sigma)) (at sigma = 1 the denominator uses sigma' instead, as
      Flow-GRPO does, to stay finite); mean = x + dt [v + g^2 / (2 sigma) (x + (1 - sigma) v)],
      std = g sqrt(-dt). This is the Euler-Maruyama step of the reverse SDE whose marginals are the ODE's.
    - "dance": the same mean and std with a constant g = eta (DanceGRPO, eta ~ 0.3).
    - "cps" (coefficients-preserving): eta is the angle a in [0, 1]; std = sigma' sin(pi a / 2),
      mean = (1 - sigma') x0_hat + sigma' cos(pi a / 2) eps_hat (= sqrt(sigma'^2 - std^2) eps_hat).
      std = 0 at sigma' = 0: the final CPS step is deterministic and has no density.

    eta = 0 gives the Euler step and std = 0 for every form.
    """
    if form not in SDE_FORMS:
        raise ValueError(f"unknown SDE form {form!r}: use one of {SDE_FORMS}")
    if eta < 0:
        raise ValueError(f"eta = {eta}: the noise level must be >= 0")
    x, v = _prepare(x, v)
    s = _bcast(sigma, x, x.dtype)
    s_next = _bcast(sigma_next, x, x.dtype)
    dt = s_next - s
    if form == "cps":
        if eta > 1:
            raise ValueError(f"eta = {eta}: the CPS noise angle a must be in [0, 1] (typical 0.8)")
        std = s_next * math.sin(math.pi * eta / 2)
        mean = (1 - s_next) * (x - s * v) + s_next * math.cos(math.pi * eta / 2) * (x + (1 - s) * v)
        return mean, std
    if form == "flow_grpo":
        g2 = eta ** 2 * s / (1 - torch.where(s == 1, s_next, s))
    else:
        g2 = torch.full_like(s, eta ** 2)
    score_term = g2 / (2 * s) * (x + (1 - s) * v)  # -g^2/2 * score, with score = -eps_hat / sigma
    mean = x + dt * (v + score_term)
    std = torch.sqrt(g2 * -dt)
    return mean, std


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma: Sigma, sigma_next: Sigma, noise: torch.Tensor | None = None,
             form: str = "flow_grpo", eta: float = 0.7, generator: torch.Generator | None = None) -> SDEStepOutput:
    """One SDE step (see `sde_mean_std` for the forms): x' = mean + std * noise, noise ~ N(0, I).

    x, v, noise: [B, ...]; noise, if not given, is drawn from `generator` (the global RNG when None).
    """
    mean, std = sde_mean_std(x, v, sigma, sigma_next, form=form, eta=eta)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x's shape {tuple(mean.shape)}")
    return SDEStepOutput(mean + std * noise.to(mean.dtype), mean, std)


# ----------------------------------------------------------------------------------------------------
# Log-densities
# ----------------------------------------------------------------------------------------------------


def reduce_latent(t: torch.Tensor, reduce: str) -> torch.Tensor:
    """[B, ...] -> [B] by the mean or sum over all non-batch elements (the log-prob and KL reduction)."""
    flat = t.reshape(t.shape[0], -1)
    if reduce == "mean":
        return flat.mean(dim=1)
    if reduce == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"unknown reduce {reduce!r}: use 'mean' (the reference codes' choice) or 'sum'")


def _upcast(*ts: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    tensors = [t for t in ts if torch.is_tensor(t)]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device
    return tuple(torch.as_tensor(t, dtype=dtype, device=device) for t in ts)


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float,
                      reduce: str = "mean") -> torch.Tensor:
    """log N(x' | mean, std^2 I), reduced over the non-batch dims: [B, ...] -> [B].

    Per element: -(x' - mean)^2 / (2 std^2) - log std - log(2 pi) / 2 (the full normalisation, so the
    value is a true log-density). reduce="mean" averages over the latent elements, as all three reference
    codes do (it keeps log-ratios O(1) per element, which is why a clip range of 1e-4 is usable);
    reduce="sum" gives the joint log-density. Computed in float32 (float64 if any input is float64).
    std: 0-d, [B, 1, ...] or [B, ...]; it must be > 0 (a deterministic step has no density).
    """
    x_next, mean, std = _upcast(x_next, mean, std)
    elem = -((x_next - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return reduce_latent(elem.expand(torch.broadcast_shapes(elem.shape, x_next.shape)), reduce)


class TransitionDensity(NamedTuple):
    """log N(x_next | mean, std^2) [B] of one SDE transition, with the transition's mean [B, ...] and std."""

    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def transition_log_prob(x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                        form: str, eta: float) -> TransitionDensity:
    """The policy's log-density of the SDE transition x -> x_next given its velocity v at x ([B, ...] each):
    log N(x_next | mean(x, v), std^2) of `sde_mean_std`, reduced by the mean over latent elements
    (`gaussian_log_prob`). The rollout stores it as the old log-prob; the GRPO update re-scores the stored
    transition with a fresh v, so unchanged weights give ratio 1."""
    mean, std = sde_mean_std(x, v, sigma, sigma_next, form=form, eta=eta)
    return TransitionDensity(gaussian_log_prob(x_next, mean, std), mean, std)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver++ in flow form
# ----------------------------------------------------------------------------------------------------


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of the flow path: lambda = log(alpha / sigma) with alpha = 1 - sigma (-inf at sigma = 1)."""
    return torch.log1p(-sigma) - torch.log(sigma)


def dpm_solver_step(x: torch.Tensor, x0_hat: torch.Tensor, sigma: Sigma, sigma_next: Sigma,
                    history: Sequence[tuple[torch.Tensor, Sigma]] = (), order: int = 2,
                    variant: str = "midpoint") -> torch.Tensor:
    """One multistep DPM-Solver++ step (data prediction) on the flow path alpha = 1 - sigma.

    x, x0_hat: [B, ...] (x0_hat = x - sigma v at this step); history: earlier (x0_hat, sigma) pairs, most
    recent first (the caller keeps them; nothing is stored here). With lambda = log(alpha / sigma),
    h = lambda' - lambda and h_prev = lambda - lambda_prev (DPM-Solver++, Lu et al. 2022, Alg. 2 and its
    third-order extension):

    - order 1: x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) x0_hat (DDIM).
    - order 2, "midpoint" (2M): D1 = (x0_hat - x0_prev) h / h_prev; x' = order-1 with x0_hat + D1 / 2.
      "heun": x' = order-1 result + alpha' ((e^{-h} - 1) / h + 1) D1.
    - order 3: the 3M update with D1, D2 from the two previous x0_hat.

    The order drops to what the history supports. A history entry at sigma = 1 (lambda = -inf: pure
    noise, no information on the data) ends the usable history. The step to sigma' = 0 returns x0_hat
    (lambda' = +inf), as diffusers does with lower_order_final / final_sigmas_type="zero".
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order = {order}: DPM-Solver++ is implemented for orders 1, 2 and 3")
    if variant not in DPM_VARIANTS:
        raise ValueError(f"unknown DPM-Solver++ variant {variant!r}: use one of {DPM_VARIANTS}")
    x, x0 = _prepare(x, x0_hat)
    s = _bcast(sigma, x, x.dtype)
    s_next = _bcast(sigma_next, x, x.dtype)

    usable = []
    for prev_x0, prev_sigma in history[: order - 1]:
        prev_s = _bcast(prev_sigma, x, x.dtype)
        if bool((prev_s >= 1).any()):
            break
        usable.append((prev_x0.to(x.dtype), prev_s))

    lam, lam_next = _lambda(s), _lambda(s_next)
    h = lam_next - lam
    alpha_next = 1 - s_next
    phi1 = torch.expm1(-h)  # e^{-h} - 1
    out = (s_next / s) * x - alpha_next * phi1 * x0
    if usable:
        x0_1, s_1 = usable[0]
        r0 = (lam - _lambda(s_1)) / h
        d1_0 = (x0 - x0_1) / r0
        if len(usable) == 1:
            if variant == "midpoint":
                out = out - 0.5 * alpha_next * phi1 * d1_0
            else:
                out = out + alpha_next * (phi1 / h + 1) * d1_0
        else:
            x0_2, s_2 = usable[1]
            r1 = (_lambda(s_1) - _lambda(s_2)) / h
            d1_1 = (x0_1 - x0_2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            out = out + alpha_next * (phi1 / h + 1) * d1 - alpha_next * ((phi1 + h) / h ** 2 - 0.5) * d2
    return torch.where(s_next == 0, x0, out)
