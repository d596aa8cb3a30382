"""One rollout: integrate a step plan over a batch of groups and keep only what the update needs.

Layout: P prompts, G images per prompt, B = P * G samples in group order (sample b belongs to prompt
b // G). With `shared_noise`, the G images of a prompt start from the same noise and follow the same
deterministic path until the first SDE step; that prefix is computed once per prompt (batch P), then
the states are repeated G times. The result is exact, and it removes most of the pre-window cost as the
MixGRPO window slides towards the data end.

Only the transitions of trained steps are stored (x, x_next, sigma, sigma_next, old log-prob), as
[B, K, ...] tensors where K is the number of trained steps per sample; everything else is discarded as
soon as it is used. Randomness comes from one generator per prompt, seeded by `group_seeds`, so a
prompt's images do not depend on which rank or batch computes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mixgrpo.models.base import Cond, FlowModel, cond_repeat_interleave, guided_velocity
from mixgrpo.plan import Plan
from mixgrpo.sampling import dpm_solver_step, euler_step, predict_x0, sde_step, transition_log_prob


@dataclass
class Trajectory:
    """Stored transitions of the trained steps of one rollout batch.

    x:          [B, K, *latent]  state before each trained step
    x_next:     [B, K, *latent]  the sampled next state (a constant when re-scored)
    sigma:      [B, K]           noise level of the step
    sigma_next: [B, K]
    log_prob:   [B, K]  float32  log N(x_next | mean_old, std^2) (`transition_log_prob`: the mean over latent elements)
    step:       [B, K]  long     index of the step in the plan
    final:      [B, *latent]     the end of the rollout (sigma = 0)
    nfe:        int              model calls made per image (batched CFG counts once)
    """

    x: torch.Tensor
    x_next: torch.Tensor
    sigma: torch.Tensor
    sigma_next: torch.Tensor
    log_prob: torch.Tensor
    step: torch.Tensor
    final: torch.Tensor
    nfe: int

    @staticmethod
    def cat(parts: Sequence["Trajectory"]) -> "Trajectory":
        """The trajectories of consecutive batches of groups as one (rows in order; every part has the same K)."""
        if len(parts) == 1:
            return parts[0]
        fields = ("x", "x_next", "sigma", "sigma_next", "log_prob", "step", "final")
        return Trajectory(*(torch.cat([getattr(t, f) for t in parts]) for f in fields), parts[0].nfe)


def _seeded_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


def _noise(gens: list[torch.Generator], per_group: int, shape: Sequence[int], device, dtype) -> torch.Tensor:
    """[len(gens) * per_group, *shape]: each generator draws its group's rows."""
    return torch.cat([torch.randn((per_group, *shape), generator=g, device=device, dtype=dtype) for g in gens])


@torch.no_grad()
def rollout(
    model: FlowModel,
    plan: Plan,
    cond: Cond,
    group_size: int,
    group_seeds: Sequence[int],
    train_mask: torch.Tensor | None = None,
    uncond: Cond | None = None,
    guidance_scale: float = 1.0,
    shared_noise: bool = True,
    switch_model: FlowModel | None = None,
    switch_at: int | None = None,
) -> Trajectory:
    """Sample B = P * G images along `plan` and store the trained transitions.

    cond: [P, ...] prompt conditioning; uncond: [P, ...] empty-prompt conditioning (for CFG) or None;
    group_seeds: P integers; train_mask: [B, len(plan.steps)] bool (default: the plan's train flags).
    """
    device = next(model.parameters()).device
    num_prompts = len(group_seeds)
    batch = num_prompts * group_size
    steps = plan.steps
    if train_mask is None:
        train_mask = torch.tensor([[s.train for s in steps]] * batch, dtype=torch.bool)
    train_mask = train_mask.cpu()
    if train_mask.shape != (batch, len(steps)):
        raise ValueError(f"train_mask has shape {tuple(train_mask.shape)}, expected {(batch, len(steps))}")
    for i, s in enumerate(steps):
        if train_mask[:, i].any() and s.kind != "sde":
            raise ValueError(f"step {i} is marked trained but is {s.kind!r}: only SDE steps have a log-prob")
    per_sample = train_mask.sum(1)
    k = int(per_sample[0]) if batch else 0
    if not bool((per_sample == k).all()):
        raise ValueError("every sample must train the same number of steps (rows of train_mask differ)")
    slot = (train_mask.cumsum(1) - 1).to(device)  # [B, n]: where step i goes among a sample's K slots
    train_mask_d = train_mask.to(device)

    gens = _seeded_generators(group_seeds, device)
    shape = tuple(model.latent_shape)
    expanded = not shared_noise  # True once states are per sample (B rows) rather than per prompt (P rows)
    x = _noise(gens, 1 if shared_noise else group_size, shape, device, torch.float32)
    rows_cond, rows_uncond = cond, uncond
    if expanded:
        rows_cond = cond_repeat_interleave(cond, group_size)
        rows_uncond = None if uncond is None else cond_repeat_interleave(uncond, group_size)

    # explicit dtypes: the states are float32 whatever torch's default dtype (float64 in the reference tests)
    store_x = torch.zeros((batch, k, *shape), device=device, dtype=torch.float32)
    store_next = torch.zeros_like(store_x)
    store_sigma = torch.zeros((batch, k), device=device, dtype=torch.float64)
    store_sigma_next = torch.zeros_like(store_sigma)
    store_logp = torch.zeros((batch, k), device=device, dtype=torch.float32)
    store_step = torch.zeros((batch, k), device=device, dtype=torch.long)
    history: tuple[tuple[torch.Tensor, float], ...] = ()  # (x0_hat, sigma), most recent first, for DPM-Solver++
    nfe = 0

    for i, step in enumerate(steps):
        if step.kind == "sde" and not expanded:
            x = x.repeat_interleave(group_size, dim=0)
            history = tuple((h.repeat_interleave(group_size, dim=0), s) for h, s in history)
            rows_cond = cond_repeat_interleave(cond, group_size)
            rows_uncond = None if uncond is None else cond_repeat_interleave(uncond, group_size)
            expanded = True
        net = switch_model if switch_model is not None and switch_at is not None and i >= switch_at else model
        sigma = torch.full((x.shape[0],), step.sigma, device=device, dtype=torch.float32)
        v = guided_velocity(net, x.to(_model_dtype(net)), sigma, rows_cond, rows_uncond, guidance_scale)
        x0_hat = predict_x0(x, v, step.sigma)
        nfe += 1
        if step.kind == "ode":
            x_next = euler_step(x, v, step.sigma, step.sigma_next)
        elif step.kind == "dpm":
            x_next = dpm_solver_step(x, x0_hat, step.sigma, step.sigma_next, history=history,
                                     order=plan.dpm_order, variant=plan.dpm_variant)
        elif step.kind == "sde":
            noise = _noise(gens, group_size, shape, device, torch.float32)
            out = sde_step(x, v, step.sigma, step.sigma_next, noise=noise, form=plan.sde_form, eta=plan.eta)
            x_next = out.x_next
            rows = train_mask_d[:, i]
            if rows.any():
                j = slot[rows, i]
                store_x[rows, j] = x[rows]
                store_next[rows, j] = x_next[rows]
                store_sigma[rows, j] = step.sigma
                store_sigma_next[rows, j] = step.sigma_next
                store_step[rows, j] = i
                store_logp[rows, j] = transition_log_prob(x[rows], v[rows], x_next[rows], step.sigma, step.sigma_next,
                                                          plan.sde_form, plan.eta).log_prob
        else:
            raise ValueError(f"unknown step kind {step.kind!r}")
        history = ((x0_hat, step.sigma),) + history[:2]
        x = x_next.float()

    if not expanded:
        x = x.repeat_interleave(group_size, dim=0)
    return Trajectory(store_x, store_next, store_sigma, store_sigma_next, store_logp, store_step, x, nfe)


def _model_dtype(model: FlowModel) -> torch.dtype:
    return next(model.parameters()).dtype


def sample(model: FlowModel, plan: Plan, cond: Cond, seeds: Sequence[int], uncond: Cond | None = None,
           guidance_scale: float = 1.0, switch_model: FlowModel | None = None, switch_at: int | None = None,
           ) -> torch.Tensor:
    """Sample one image per conditioning row along `plan`, storing nothing. Returns [N, *latent].

    Hybrid inference (against reward hacking): steps [switch_at, T) run `switch_model` (the base model)
    instead of `model` (the fine-tuned one). cond: [N, ...]; seeds: N integers.
    """
    none = torch.zeros((len(seeds), len(plan.steps)), dtype=torch.bool)
    return rollout(model, plan, cond, 1, seeds, none, uncond, guidance_scale,
                   switch_model=switch_model, switch_at=switch_at).final
