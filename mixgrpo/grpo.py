"""GRPO math: group-relative advantages, multi-reward fusion, the clipped policy loss, the KL to a reference.

Shapes: P prompts, G images per prompt (a group), N = any flattened batch of trained transitions.
Pure functions over tensors; the trainer decides what to log and how to reduce across ranks.
"""

from __future__ import annotations

import torch

from mixgrpo.sampling import reduce_latent


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, std: str = "group",
                     clip: float | None = 5.0) -> torch.Tensor:
    """A = (R - mean_group) / (std + eps), clipped to [-clip, clip]. rewards: [P, G] -> [P, G].

    std="group": the population std (ddof 0) of each group; "global": of all P * G rewards (Flow-GRPO's
    option). A group whose rewards are all equal carries no preference and gets A = 0 exactly (never NaN,
    whatever the rounding of its mean). clip=None disables clipping. Rewards must be finite: the trainer
    handles failed (NaN) scores before this point.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards has shape {tuple(rewards.shape)}: expected [P, G] (prompts x group)")
    if std not in ("group", "global"):
        raise ValueError(f"std = {std!r}: use 'group' (per-prompt std) or 'global' (std of the whole batch)")
    r = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    centred = r - r.mean(dim=1, keepdim=True)                             # [P, G]
    scale = r.std(dim=1, keepdim=True, correction=0) if std == "group" else r.std(correction=0)
    adv = centred / (scale + eps)                                         # [P, G]
    constant = (r == r[:, :1]).all(dim=1, keepdim=True)                   # [P, 1]
    adv = torch.where(constant, torch.zeros_like(adv), adv)
    return adv if clip is None else adv.clamp(-clip, clip)


def combine_rewards(rewards: dict[str, torch.Tensor], weights: dict[str, float] | None = None,
                    mode: str = "advantage", eps: float = 1e-4, std: str = "group",
                    clip: float | None = 5.0) -> torch.Tensor:
    """Advantages [P, G] from several rewards, each [P, G].

    mode="advantage" (MixGRPO): A = sum_k w_k group_advantages(R_k): every reward is normalised within
    the group first, so rewards on different scales count equally.
    mode="reward" (Flow-GRPO): A = group_advantages(sum_k w_k R_k).
    weights: name -> w_k; None gives every reward weight 1.
    """
    if not rewards:
        raise ValueError("rewards is empty: pass at least one reward tensor")
    if mode not in ("advantage", "reward"):
        raise ValueError(f"mode = {mode!r}: use 'advantage' (normalise each reward, then sum) or 'reward' "
                         "(sum the rewards, then normalise)")
    if weights is None:
        weights = {name: 1.0 for name in rewards}
    if set(weights) != set(rewards):
        missing, unknown = sorted(set(rewards) - set(weights)), sorted(set(weights) - set(rewards))
        raise ValueError(f"weights must name exactly the rewards {sorted(rewards)}: missing {missing}, "
                         f"unknown {unknown}")
    shapes = {tuple(r.shape) for r in rewards.values()}
    if len(shapes) != 1:
        raise ValueError(f"all rewards must have the same [P, G] shape, got {sorted(shapes)}")
    if mode == "reward":
        total = sum(weights[name] * r for name, r in rewards.items())  # [P, G]
        return group_advantages(total, eps=eps, std=std, clip=clip)
    return sum(weights[name] * group_advantages(r, eps=eps, std=std, clip=clip) for name, r in rewards.items())


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                clip_range: float = 1e-4) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss of GRPO, averaged over N transitions. All inputs [N]; returns (scalar loss, stats).

    ratio = exp(logp_new - logp_old); L = mean(max(-A ratio, -A clip(ratio, 1 - c, 1 + c))) (`ratio_loss`).
    """
    if not logp_new.shape == logp_old.shape == advantages.shape:
        raise ValueError(f"logp_new {tuple(logp_new.shape)}, logp_old {tuple(logp_old.shape)} and advantages "
                         f"{tuple(advantages.shape)} must have the same shape [N]")
    return ratio_loss(logp_new - logp_old.detach(), advantages, clip_range)


def ratio_loss(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4,
               weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss of a log importance ratio. log_ratio, advantages, weight: [N]; returns (scalar loss,
    stats).

    ratio = exp(log_ratio); L = mean(w max(-A ratio, -A clip(ratio, 1 - c, 1 + c))), w = 1 when weight is None.
    Stats (detached scalars): clip_fraction (share with |ratio - 1| > c), approx_kl = mean((log ratio)^2) / 2
    (Flow-GRPO's estimate of KL(old || new)), ratio_mean, ratio_max, ratio_min.
    """
    if log_ratio.shape != advantages.shape or (weight is not None and weight.shape != log_ratio.shape):
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)}, advantages {tuple(advantages.shape)} and weight "
                         f"{None if weight is None else tuple(weight.shape)} must have the same shape [N]")
    if clip_range <= 0:
        raise ValueError(f"clip_range = {clip_range}: it must be > 0 (the paper uses 1e-4)")
    ratio = torch.exp(log_ratio)                                          # [N]
    adv = advantages.detach().to(ratio.dtype)                             # [N]
    unclipped = -adv * ratio                                              # [N]
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)          # [N]
    per_term = torch.maximum(unclipped, clipped)                          # [N]
    loss = (per_term if weight is None else weight.detach().to(ratio.dtype) * per_term).mean()
    with torch.no_grad():
        stats = {
            "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio ** 2).mean(),
            "ratio_mean": ratio.mean(),
            "ratio_max": ratio.max(),
            "ratio_min": ratio.min(),
        }
    return loss, stats


def guard_log_ratio(log_ratio: torch.Tensor, mean: torch.Tensor, mean_old: torch.Tensor,
                    std: torch.Tensor | float) -> torch.Tensor:
    """GRPO-Guard's re-centred log importance ratio (RatioNorm, arXiv 2510.22319), [N].

    For a Gaussian policy N(mean, std^2) whose sample x' was drawn from N(mean_old, std^2), the log-ratio has
    the mean -||mean - mean_old||^2 / (2 std^2) < 0 over x' (its distribution drifts left as the policy moves, so
    the upper clip rarely binds); adding that drift back and scaling by std,

        log r_guard = std (log_ratio + ||mean - mean_old||^2 / (2 std^2))
                    = mean((x' - mean_old)(mean - mean_old)) / std,

    has mean 0 over x' for every policy and step, and is exactly 0 when mean == mean_old (on-policy). ||.||^2 is
    the mean over latent elements, as in the log-probs (`mixgrpo.sampling.gaussian_log_prob`); the drift term
    carries gradient, as in the reference codes (verl-omni `GRPOGuardLoss`, Flow-Factory `GRPOGuardTrainer`).

    log_ratio: [N] (log p - log p_old, computed with the same std); mean, mean_old: [N, *latent]; std: 0-d, [N] or
    [N, 1, ...], one value per sample.
    """
    if mean.shape != mean_old.shape or mean.shape[:1] != log_ratio.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_old {tuple(mean_old.shape)} must be [N, *latent] with "
                         f"N = {log_ratio.shape[0]} (log_ratio {tuple(log_ratio.shape)})")
    dtype = log_ratio.dtype
    s = torch.as_tensor(std, dtype=dtype, device=log_ratio.device)
    s = s.reshape(-1)[0].expand(len(log_ratio)) if s.numel() == 1 else s.reshape(len(log_ratio), -1)[:, 0]  # [N]
    drift = reduce_latent((mean.to(dtype) - mean_old.detach().to(dtype)) ** 2, "mean") / (2 * s ** 2)  # [N]
    return s * (log_ratio + drift)


def guard_step_weight(sigma: torch.Tensor, sigma_next: torch.Tensor, mean_step: float) -> torch.Tensor:
    """GRPO-Guard's gradient reweighting of an SDE step, 1 / |dt| (the ratio's gradient scales with |dt| through
    the transition mean), normalised by the plan's mean step size `mean_step` so that a uniform grid weighs every
    step 1 and `lr` keeps its meaning. sigma, sigma_next: [N]; returns [N]."""
    return mean_step / (sigma - sigma_next).abs()


def kl_to_reference(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor | float,
                    reduce: str = "mean") -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) = ||mean - mean_ref||^2 / (2 std^2), reduced per sample.

    mean, mean_ref: [B, ...]; std: 0-d, [B, 1, ...] or [B, ...]; returns [B]. reduce="mean" averages over the
    latent elements, like `gaussian_log_prob`, so beta is on the same per-element scale as the log-ratio.
    Computed in float32 (float64 if an input is float64).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same shape")
    dtype = torch.float64 if torch.float64 in (mean.dtype, mean_ref.dtype) else torch.float32
    std_t = torch.as_tensor(std, device=mean.device).to(dtype)
    elem = (mean.to(dtype) - mean_ref.to(dtype)) ** 2 / (2 * std_t ** 2)  # [B, ...]
    return reduce_latent(elem, reduce)  # the same reduction as gaussian_log_prob, so beta shares its scale
