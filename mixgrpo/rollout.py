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
from typing import Callable, Sequence

import torch

from mixgrpo.models.base import Cond, FlowModel, cond_repeat_interleave, guided_velocity
from mixgrpo.plan import Plan, Step
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


def checked_train_mask(train_mask: torch.Tensor | None, plan: Plan, batch: int) -> torch.Tensor:
    """[B, len(plan.steps)] bool on the CPU: `train_mask` (default: the plan's train flags), checked to mark only
    SDE steps (the others have no log-prob) and the same number K of steps in every row."""
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
    return train_mask


class TransitionStore:
    """The trained transitions of one rollout, filled step by step into each sample's K slots ([B, K, ...] tensors,
    the fields of `Trajectory`); train_mask: [B, n] from `checked_train_mask`."""

    def __init__(self, train_mask: torch.Tensor, shape: tuple[int, ...], device: torch.device):
        batch = train_mask.shape[0]
        k = int(train_mask[0].sum()) if batch else 0
        self.mask = train_mask.to(device)
        self.slot = (train_mask.cumsum(1) - 1).to(device)  # [B, n]: where step i goes among a sample's K slots
        # explicit dtypes: the states are float32 whatever torch's default dtype (float64 in the reference tests)
        self.x = torch.zeros((batch, k, *shape), device=device, dtype=torch.float32)
        self.x_next = torch.zeros_like(self.x)
        self.sigma = torch.zeros((batch, k), device=device, dtype=torch.float64)
        self.sigma_next = torch.zeros_like(self.sigma)
        self.log_prob = torch.zeros((batch, k), device=device, dtype=torch.float32)
        self.step = torch.zeros((batch, k), device=device, dtype=torch.long)

    def add(self, i: int, step: Step, plan: Plan, x: torch.Tensor, v: torch.Tensor, x_next: torch.Tensor) -> None:
        """Store SDE step i (x -> x_next under velocity v, all [B, *latent]) for the samples that train it."""
        rows = self.mask[:, i]
        if not rows.any():
            return
        j = self.slot[rows, i]
        self.x[rows, j] = x[rows]
        self.x_next[rows, j] = x_next[rows]
        self.sigma[rows, j] = step.sigma
        self.sigma_next[rows, j] = step.sigma_next
        self.step[rows, j] = i
        self.log_prob[rows, j] = transition_log_prob(x[rows], v[rows], x_next[rows], step.sigma, step.sigma_next,
                                                     plan.sde_form, plan.eta).log_prob

    def trajectory(self, final: torch.Tensor, nfe: int) -> Trajectory:
        return Trajectory(self.x, self.x_next, self.sigma, self.sigma_next, self.log_prob, self.step, final, nfe)


@dataclass
class Rows:
    """The rows a rollout integrates: per prompt ([P, ...], the shared-noise prefix) or per sample ([B, ...])."""

    x: torch.Tensor
    history: tuple[tuple[torch.Tensor, float], ...]  # (x0_hat, sigma), most recent first, for DPM-Solver++
    cond: Cond
    uncond: Cond | None
    per_sample: bool

    def expanded(self, group_size: int) -> "Rows":
        """The group expansion: each prompt row repeated G times in place (sample b is prompt b // G's)."""
        if self.per_sample:
            return self
        repeat = lambda t: t.repeat_interleave(group_size, dim=0)  # noqa: E731
        return Rows(repeat(self.x), tuple((repeat(h), s) for h, s in self.history),
                    *_per_sample(self.cond, self.uncond, group_size), per_sample=True)


def _per_sample(cond: Cond, uncond: Cond | None, group_size: int) -> tuple[Cond, Cond | None]:
    """[P, ...] conditioning rows -> [B, ...], each repeated G times in place."""
    return cond_repeat_interleave(cond, group_size), None if uncond is None else cond_repeat_interleave(uncond, group_size)


def _integrate(model_at: Callable[[int], FlowModel], plan: Plan, cond: Cond, group_size: int,
               group_seeds: Sequence[int], uncond: Cond | None, guidance_scale: float, shared_noise: bool,
               shape: tuple[int, ...], device: torch.device, store: TransitionStore | None) -> tuple[torch.Tensor, int]:
    """(final samples [B, *shape], model calls) of `plan` from one generator per prompt: the shared-noise prefix at
    batch P, the rest at batch B; model_at(i): the network of step i; store: where the trained steps go."""
    gens = _seeded_generators(group_seeds, device)
    if shared_noise:  # one noise per group: the deterministic prefix runs per prompt until the first SDE step
        rows = Rows(_noise(gens, 1, shape, device, torch.float32), (), cond, uncond, per_sample=False)
    else:
        rows = Rows(_noise(gens, group_size, shape, device, torch.float32), (),
                    *_per_sample(cond, uncond, group_size), per_sample=True)
    nfe = 0
    for i, step in enumerate(plan.steps):
        if step.kind == "sde":
            rows = rows.expanded(group_size)
        x, net = rows.x, model_at(i)
        sigma = torch.full((x.shape[0],), step.sigma, device=device, dtype=torch.float32)
        v = guided_velocity(net, x.to(_model_dtype(net)), sigma, rows.cond, rows.uncond, guidance_scale)
        x0_hat = predict_x0(x, v, step.sigma)
        nfe += 1
        if step.kind == "ode":
            x_next = euler_step(x, v, step.sigma, step.sigma_next)
        elif step.kind == "dpm":
            x_next = dpm_solver_step(x, x0_hat, step.sigma, step.sigma_next, history=rows.history,
                                     order=plan.dpm_order, variant=plan.dpm_variant)
        elif step.kind == "sde":
            noise = _noise(gens, group_size, shape, device, torch.float32)
            x_next = sde_step(x, v, step.sigma, step.sigma_next, noise=noise, form=plan.sde_form, eta=plan.eta).x_next
            if store is not None:
                store.add(i, step, plan, x, v, x_next)
        else:
            raise ValueError(f"unknown step kind {step.kind!r}")
        rows.history = ((x0_hat, step.sigma),) + rows.history[:2]
        rows.x = x_next.float()
    return (rows.x if rows.per_sample else rows.x.repeat_interleave(group_size, dim=0)), nfe


@torch.no_grad()
def rollout(model: FlowModel, plan: Plan, cond: Cond, group_size: int, group_seeds: Sequence[int],
            train_mask: torch.Tensor | None = None, uncond: Cond | None = None, guidance_scale: float = 1.0,
            shared_noise: bool = True) -> Trajectory:
    """Sample B = P * G images along `plan` and store the trained transitions.

    cond: [P, ...] prompt conditioning; uncond: [P, ...] empty-prompt conditioning (for CFG) or None;
    group_seeds: P integers; train_mask: [B, len(plan.steps)] bool (default: the plan's train flags).
    """
    device, shape = next(model.parameters()).device, tuple(model.latent_shape)
    store = TransitionStore(checked_train_mask(train_mask, plan, len(group_seeds) * group_size), shape, device)
    final, nfe = _integrate(lambda i: model, plan, cond, group_size, group_seeds, uncond, guidance_scale,
                            shared_noise, shape, device, store)
    return store.trajectory(final, nfe)


def _model_dtype(model: FlowModel) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def sample(model: FlowModel, plan: Plan, cond: Cond, seeds: Sequence[int], uncond: Cond | None = None,
           guidance_scale: float = 1.0, switch_model: FlowModel | None = None, switch_at: int | None = None,
           ) -> torch.Tensor:
    """Sample one image per conditioning row along `plan`, storing nothing. Returns [N, *latent].

    Hybrid inference (against reward hacking): steps [switch_at, T) run `switch_model` (the base model)
    instead of `model` (the fine-tuned one). cond: [N, ...]; seeds: N integers.
    """
    switched = switch_model is not None and switch_at is not None

    def model_at(i: int) -> FlowModel:
        return switch_model if switched and i >= switch_at else model

    return _integrate(model_at, plan, cond, 1, seeds, uncond, guidance_scale, True, tuple(model.latent_shape),
                      next(model.parameters()).device, None)[0]
