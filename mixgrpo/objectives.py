"""The objectives: what the update trains on, and how. One class each, registered by name in `OBJECTIVES`.

- `GRPO` ("grpo"): the clipped policy loss (`mixgrpo.grpo.policy_loss`) over the rollout's stored SDE transitions,
  each re-scored with the current weights (`mixgrpo.sampling.transition_log_prob`); every algorithm of
  `mixgrpo.plan.ALGORITHMS` that trains steps.
- `OnPolicyDistillation` ("opd"): Flow-OPD (arXiv 2605.08063): the same stored transitions, trained toward the
  transitions of frozen teachers at the same states (the closed-form Gaussian KL, `mixgrpo.grpo.kl_to_reference`), each
  sample routed to its prompt's teachers (`route`); optionally GRPO's loss on the rewards beside it.
- `DiffusionNFT` ("diffusion_nft"), `AWM` ("awm") and `VGRPO` ("v_grpo"): forward-process objectives
  (`mixgrpo.flow_matching`) on the rollout's final samples only, noised again by the forward process (their shared
  core: `ForwardProcess`); any plan feeds them. The rollout runs a soft copy of the weights (the sampling copy,
  `matching.sampler_decay`), which the trainer keeps and updates after every iteration.

An objective (`Objective`) tells the config, the pre-flight, the memory estimate and the trainer what it needs
(`stores_transitions`, `guided_update`, `sampler_decay`, `distills`), which steps the rollout stores (`train_mask`), how many loss terms a sample has (`terms`), and
runs the update (`update`) through the shared update loop (`mixgrpo.train.update.UpdateLoop`) over the micro-batches
of `micro_batches`. Each takes an optional KL term to the frozen base (`loss.kl_beta`).

Adding an objective: one class with the protocol's members, registered with `@OBJECTIVES.register("name")`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Protocol

import torch

from mixgrpo.flow_matching import (awm_log_prob, awm_weight, forward_noise, nft_loss, optimality_probability,
                                   sample_sigmas, stratified_sigmas, vgrpo_loss)
from mixgrpo.grpo import guard_log_ratio, guard_step_weight, kl_to_reference, policy_loss, ratio_loss
from mixgrpo.models.base import Cond, cond_index, guided_velocity
from mixgrpo.plan import Plan, train_mask
from mixgrpo.registry import Registry
from mixgrpo.rollout import Trajectory
from mixgrpo.sampling import sde_mean_std, transition_log_prob

if TYPE_CHECKING:
    from mixgrpo.config import MatchingConfig, TrainConfig, VGRPOConfig
    from mixgrpo.train.update import UpdateLoop, UpdateStats

Velocity = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # (x, sigma, cond) -> v


def micro_batches(indices: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """The update's micro-batch layout, its one definition: `indices` (the samples of one optimizer step's share,
    in order) cut into consecutive chunks of `size`, the last one shorter. The update loop, GRPO's re-scoring of
    the old log-probs, the forward-process objectives' old velocities and `layouts_agree` all use it."""
    return indices.split(size)


@dataclass
class Teacher:
    """A frozen teacher of on-policy distillation: its velocity (x, sigma, cond) -> v (a model of the student's own
    architecture, so that the student's conditioning rows are its too), the training prompts it teaches (None: every
    one) and the weight of its KL term."""

    velocity: Velocity
    prompts: frozenset[str] | None
    weight: float


def route(prompts: list[str], teachers: list[Teacher]) -> torch.Tensor:
    """[B, T] weights: w_k where teacher k teaches sample b's prompt (its `prompts` hold it, or it teaches every
    prompt), else 0. prompts: the prompt of each of the B samples."""
    return torch.tensor([[t.weight if t.prompts is None or p in t.prompts else 0.0 for t in teachers]
                         for p in prompts], dtype=torch.float32).view(len(prompts), len(teachers))


@dataclass
class Policy:
    """The trained model as an objective sees it: `model` (the live weights), `reference` (the frozen base as a
    velocity callable, for the KL term), `autocast` (the compute-precision context of the forward passes),
    `sampling` (a context in which `model` carries the weights the rollout sampled with: the sampling copy of the
    forward-process objectives; the live weights by default) and `teachers` (on-policy distillation's)."""

    model: torch.nn.Module
    reference: Velocity
    autocast: Callable[[], Any]
    sampling: Callable[[], ContextManager] = field(default=contextlib.nullcontext)
    teachers: list[Teacher] = field(default_factory=list)


@dataclass
class Samples:
    """One iteration's samples on this rank, as the update sees them (B = P G rows in group order).

    traj: the rollout (stored transitions [B, K, ...] and final samples [B, *latent]); advantages: [B];
    cond, uncond: [B, ...] rows (uncond None without CFG); shares: sample indices of each optimizer step;
    seeds: [B] the samples' own seeds (the forward-process draws); prompts: [B] each sample's prompt.
    """

    plan: Plan
    traj: Trajectory
    advantages: torch.Tensor
    cond: Cond
    uncond: Cond | None
    shares: list[torch.Tensor]
    seeds: list[int]
    prompts: list[str]


class Objective(Protocol):
    """What the config, the pre-flight and the trainer ask an objective; see the module docstring."""

    stores_transitions: ClassVar[bool]
    """True: the rollout stores its trained SDE transitions with their log-probs and the update re-scores them (the
    plan must train steps; the rollout's log-probs are the update's old ones only when the two layouts agree,
    `mixgrpo.train.trainer.layouts_agree`); False: the update trains on the rollout's final samples only."""

    guided_update: ClassVar[bool]
    """Whether the update calls the model with classifier-free guidance (conditional and unconditional rows in one
    batch, as the rollout does) when guidance_scale != 1; False: it trains the conditional velocity alone."""

    supports_guard: ClassVar[bool]
    """Whether `grpo_guard` applies: the loss clips the importance ratio of a Gaussian density (transition or
    surrogate) with one std per sample."""

    distills: ClassVar[bool]
    """Whether the loss distills frozen teachers (`distill.teachers`, `Policy.teachers`); every other objective
    refuses them."""

    sampler_decay: float
    """> 0: the rollout samples from a soft copy of the weights, theta_old <- d theta_old + (1 - d) theta after every
    iteration (kept by the trainer and its checkpoints); 0: from the live weights."""

    @classmethod
    def from_config(cls, cfg: TrainConfig, policy: Policy, rescore_old: bool) -> Objective:
        """The objective of a run; rescore_old: the layouts disagree (only read where stores_transitions)."""
        ...

    @staticmethod
    def forwards_per_backward(cfg: TrainConfig) -> int:
        """Trained forwards whose activations a micro-batch holds at once (the memory estimate)."""
        ...

    def train_mask(self, plan: Plan, batch_size: int, seed: int, iteration: int,
                   first_sample: int) -> torch.Tensor:
        """[B, nfe] bool: the steps whose transitions the rollout stores for this rank's samples."""
        ...

    def terms(self, traj: Trajectory) -> int:
        """K: loss terms per sample and update pass (trained steps, or training sigmas)."""
        ...

    def update(self, loop: UpdateLoop, s: Samples) -> UpdateStats:
        """The optimizer steps of one iteration on `s`."""
        ...


OBJECTIVES: Registry[Objective] = Registry("objective")
"""name -> objective class; `objective:` of a config is one of its names (in registration order)."""


@OBJECTIVES.register("grpo")
class GRPO:
    """The clipped GRPO loss over the stored transitions x -> x' (K trained steps per sample), with the KL term
    to the reference when kl_beta > 0; guidance_scale: CFG, as in the rollout.

    rescore_old: the old log-probs are the same weights' log-probs in the update's own micro-batches (no grad,
    one extra forward per trained transition before the first step) instead of the rollout's: for kernels whose
    results depend on the batch size (`mixgrpo.train.trainer.layouts_agree`), so that the ratio is 1 on the
    first step.

    guard: GRPO-Guard (arXiv 2510.22319): the re-centred ratio of `mixgrpo.grpo.guard_log_ratio` against the old
    transition means (re-scored, as with rescore_old: the rollout does not store them) and each step weighted by
    `mixgrpo.grpo.guard_step_weight`.
    """

    stores_transitions = True
    guided_update = True
    supports_guard = True
    distills = False
    sampler_decay = 0.0  # the rollout runs the live weights

    def __init__(self, policy: Policy, clip_range: float, kl_beta: float, guidance_scale: float,
                 rescore_old: bool = False, guard: bool = False):
        self.policy, self.clip_range, self.kl_beta, self.guidance_scale = policy, clip_range, kl_beta, guidance_scale
        self.rescore_old, self.guard = rescore_old, guard

    @classmethod
    def from_config(cls, cfg: TrainConfig, policy: Policy, rescore_old: bool) -> GRPO:
        return cls(policy, cfg.loss.clip_range, cfg.loss.kl_beta, cfg.rollout.guidance_scale, rescore_old,
                   cfg.loss.grpo_guard)

    @staticmethod
    def forwards_per_backward(cfg: TrainConfig) -> int:
        return 1

    def train_mask(self, plan: Plan, batch_size: int, seed: int, iteration: int, first_sample: int) -> torch.Tensor:
        return train_mask(plan, batch_size, seed, iteration, sample_offset=first_sample)

    def terms(self, traj: Trajectory) -> int:
        return traj.x.shape[1]

    def _log_prob(self, s: Samples, mb: torch.Tensor, k: int, cond: Cond, uncond: Cond | None):
        """(log-prob [N], mean, std) of the stored transitions (rows mb, slot k) under the live weights."""
        traj = s.traj
        x, x_next = traj.x[mb, k], traj.x_next[mb, k]                   # [N, *latent]
        sigma, sigma_next = traj.sigma[mb, k], traj.sigma_next[mb, k]   # [N] float64
        with self.policy.autocast():
            v = guided_velocity(self.policy.model, x, sigma.float(), cond, uncond, self.guidance_scale)
        return transition_log_prob(x, v, x_next, sigma, sigma_next, s.plan.sde_form, s.plan.eta)

    @torch.no_grad()
    def _rescored(self, s: Samples, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """([B, K] old log-probs, [B, K, *latent] old transition means or None without the guard) in the update's
        layout: each sample in the micro-batch of the first share that holds it (the first pass, where the ratio
        must be 1)."""
        device = s.traj.x.device
        old = s.traj.log_prob.clone()
        old_mean = torch.empty(s.traj.x.shape, dtype=torch.float32, device=device) if self.guard else None
        done = torch.zeros(len(old), dtype=torch.bool, device=device)
        for share in s.shares:
            for mb in micro_batches(share.to(device), micro_batch_size):
                new = ~done[mb]
                if not new.any():
                    continue
                cond = cond_index(s.cond, mb)
                uncond = None if s.uncond is None else cond_index(s.uncond, mb)
                for k in range(s.traj.x.shape[1]):
                    logp, mean, _ = self._log_prob(s, mb, k, cond, uncond)
                    old[mb[new], k] = logp[new].to(old.dtype)
                    if old_mean is not None:
                        old_mean[mb[new], k] = mean[new].to(old_mean.dtype)
                done[mb] = True
        return old, old_mean

    def update(self, loop: UpdateLoop, s: Samples) -> UpdateStats:
        traj, plan = s.traj, s.plan
        # the guard needs the old transition means, which the rollout does not store: it always re-scores
        if self.rescore_old or self.guard:
            old_log_prob, old_mean = self._rescored(s, loop.micro_batch_size)  # [B, K], [B, K, *latent] or None
        else:
            old_log_prob, old_mean = traj.log_prob, None
        mean_step = (plan.steps[0].sigma - plan.steps[-1].sigma_next) / plan.nfe

        def loss_of(u: int, mb: torch.Tensor, k: int, stats: UpdateStats):
            cond = cond_index(s.cond, mb)
            uncond = None if s.uncond is None else cond_index(s.uncond, mb)
            logp, mean, std = self._log_prob(s, mb, k, cond, uncond)
            if self.guard:
                log_ratio = guard_log_ratio(logp - old_log_prob[mb, k], mean, old_mean[mb, k], std)
                weight = guard_step_weight(traj.sigma[mb, k], traj.sigma_next[mb, k], mean_step)
                loss, step_stats = ratio_loss(log_ratio, s.advantages[mb], self.clip_range, weight)
            else:
                loss, step_stats = policy_loss(logp, old_log_prob[mb, k], s.advantages[mb], self.clip_range)
            loss, step_stats = self._with_base_kl(loss, step_stats, s, mb, k, mean, std, cond, uncond)
            if u == 0:
                if self.guard:
                    stats.note_ratio(log_ratio, torch.zeros_like(log_ratio))
                else:
                    stats.note_ratio(logp, old_log_prob[mb, k])
            return loss, step_stats

        return loop.run(s.shares, traj.x.shape[1], loss_of, traj.x.device)

    def _transition_mean(self, velocity: Velocity, s: Samples, rows: torch.Tensor, k: int, cond: Cond,
                         uncond: Cond | None) -> torch.Tensor:
        """[N, *latent]: the transition mean of a frozen `velocity` (the base, a teacher) at the stored states of
        samples `rows`, slot k (cond, uncond: those rows'), as the rollout's guidance computes it."""
        traj = s.traj
        x, sigma = traj.x[rows, k], traj.sigma[rows, k]
        with torch.no_grad(), self.policy.autocast():
            v = guided_velocity(velocity, x, sigma.float(), cond, uncond, self.guidance_scale)
        return sde_mean_std(x, v, sigma, traj.sigma_next[rows, k], s.plan.sde_form, s.plan.eta)[0]

    def _with_base_kl(self, loss: torch.Tensor, step_stats: dict[str, torch.Tensor], s: Samples, mb: torch.Tensor,
                      k: int, mean: torch.Tensor, std: torch.Tensor, cond: Cond,
                      uncond: Cond | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss plus kl_beta times the KL of the live transitions (mean [N, *latent], std) to the frozen base's."""
        if self.kl_beta <= 0:
            return loss, step_stats
        kl = kl_to_reference(mean, self._transition_mean(self.policy.reference, s, mb, k, cond, uncond), std).mean()
        return loss + self.kl_beta * kl, {**step_stats, "kl_to_base": kl.detach()}


@OBJECTIVES.register("opd")
class OnPolicyDistillation(GRPO):
    """On-policy distillation, Flow-OPD (arXiv 2605.08063, sec. 4): the student rolls out on its own (the plan's SDE
    steps, stored as GRPO stores them), and at every stored transition x -> x' the loss is the closed-form KL between
    the student's Gaussian transition N(mu_theta(x), s^2) and each routed teacher's N(mu_k(x), s^2) at the same state,
    with the same std s:

        L = mean over samples and trained steps of  sum_k w_k ||mu_theta - mu_k||^2 / (2 s^2)

    (`mixgrpo.grpo.kl_to_reference`: a mean over latent elements, as the log-probs; w_k from `route`). Its gradient
    pulls the student's transition mean toward its teachers' weighted mean (the paper's "mode blending" of the
    routed teachers). The paper writes this KL as a detached per-step reward inside the clipped ratio; a reward that
    depends on the state only has a ratio gradient of zero in expectation, and the official script keeps the
    reward's gradient (at ratio 1: this KL's), so the KL is minimised directly here. reward_weight > 0 adds GRPO's
    clipped loss on the rewards' advantages (the official script's "mixed" mode); kl_beta the KL to the frozen base
    (an anchor on every prompt, as the paper's Manifold Anchor Regularization, whose anchor is a teacher instead: a
    teacher with `prompts: ""` is that)."""

    supports_guard = False
    distills = True

    def __init__(self, policy: Policy, clip_range: float, kl_beta: float, guidance_scale: float,
                 rescore_old: bool = False, reward_weight: float = 0.0):
        super().__init__(policy, clip_range, kl_beta, guidance_scale, rescore_old)
        self.reward_weight = reward_weight

    @classmethod
    def from_config(cls, cfg: TrainConfig, policy: Policy, rescore_old: bool) -> OnPolicyDistillation:
        return cls(policy, cfg.loss.clip_range, cfg.loss.kl_beta, cfg.rollout.guidance_scale, rescore_old,
                   cfg.distill.reward_weight)

    def update(self, loop: UpdateLoop, s: Samples) -> UpdateStats:
        traj, teachers = s.traj, self.policy.teachers
        weights = route(s.prompts, teachers).to(traj.x.device)  # [B, T]
        old_log_prob = None
        if self.reward_weight > 0:
            old_log_prob = self._rescored(s, loop.micro_batch_size)[0] if self.rescore_old else traj.log_prob

        def loss_of(u: int, mb: torch.Tensor, k: int, stats: UpdateStats):
            cond = cond_index(s.cond, mb)
            uncond = None if s.uncond is None else cond_index(s.uncond, mb)
            logp, mean, std = self._log_prob(s, mb, k, cond, uncond)  # mean [N, *latent], std [N, 1, ...]
            kl = torch.zeros(len(mb), dtype=torch.float32, device=mean.device)  # [N] sum_k w_k KL_k
            step_stats = {}
            for t, teacher in enumerate(teachers):
                w = weights[mb, t]                                               # [N]
                rows = w.nonzero().flatten()                                     # the samples it teaches
                kl_t = torch.zeros_like(kl)
                if len(rows):
                    mean_t = self._transition_mean(teacher.velocity, s, mb[rows], k, cond_index(cond, rows),
                                                   None if uncond is None else cond_index(uncond, rows))
                    kl_t = kl_t.index_put((rows,), kl_to_reference(mean[rows], mean_t, std[rows]).float())
                kl = kl + w * kl_t
                step_stats[f"kl_to_teacher{t}"] = kl_t.detach().mean()  # over all samples, 0 where it does not teach
            loss = kl.mean()
            step_stats["kl_to_teachers"] = loss.detach()
            if self.reward_weight > 0:
                grpo, grpo_stats = policy_loss(logp, old_log_prob[mb, k], s.advantages[mb], self.clip_range)
                loss = loss + self.reward_weight * grpo
                step_stats.update(grpo_stats)
                if u == 0:
                    stats.note_ratio(logp, old_log_prob[mb, k])
            return self._with_base_kl(loss, step_stats, s, mb, k, mean, std, cond, uncond)

        return loop.run(s.shares, traj.x.shape[1], loss_of, traj.x.device)


@dataclass
class MatchingBatch:
    """The forward-process training data of one iteration: K training sigmas per final sample.

    x_t, target, v_old: [B, K, *latent] (x_sigma, u = eps - x0, the sampling policy's velocity at x_sigma);
    sigma: [B, K] float64.
    """

    x_t: torch.Tensor
    target: torch.Tensor
    sigma: torch.Tensor
    v_old: torch.Tensor


@torch.no_grad()
def matching_batch(velocity: Velocity, final: torch.Tensor, cond: Cond, plan: Plan, seeds: list[int],
                   matching: MatchingConfig, epochs: int, micro_batch_size: int) -> MatchingBatch:
    """Draw K = matching.sigmas_per_sample training sigmas and noises per final sample ([B, *latent]) and
    update pass (`epochs`) from the sample's own seed (the same on any rank and after a resume), noise the
    samples by the forward process, and evaluate the sampling policy `velocity` there in micro-batches
    (conditional velocity: training is CFG-free; cond: [B, ...] rows). Pass e uses terms [e K, (e + 1) K)."""
    m = matching
    K = m.sigmas_per_sample * epochs
    sigmas, noises = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        sigmas.append(sample_sigmas(K, g, m.sigmas, m.sigma_mean, m.sigma_std))
        noises.append(torch.randn((K, *final.shape[1:]), generator=g))
    sigma = torch.stack(sigmas).to(final.device)  # [B, K]
    eps = torch.stack(noises).to(final.device, final.dtype)  # [B, K, *latent]
    return noised_batch(velocity, final, cond, sigma, eps, micro_batch_size)


@torch.no_grad()
def noised_batch(velocity: Velocity, final: torch.Tensor, cond: Cond, sigma: torch.Tensor, eps: torch.Tensor,
                 micro_batch_size: int) -> MatchingBatch:
    """The final samples [B, *latent] noised at the drawn sigma [B, K] with noises eps [B, K, *latent], and the
    sampling policy `velocity` there in micro-batches (conditional velocity; cond: [B, ...] rows)."""
    B, K = sigma.shape
    x0 = final[:, None].expand_as(eps)
    x_t, target = forward_noise(x0.flatten(0, 1), eps.flatten(0, 1), sigma.flatten())
    x_t, target = x_t.view_as(eps), target.view_as(eps)
    v_old = torch.empty_like(x_t)
    for rows in micro_batches(torch.arange(B, device=final.device), micro_batch_size):
        rows_cond = cond_index(cond, rows)
        for k in range(K):
            v_old[rows, k] = velocity(x_t[rows, k], sigma[rows, k].float(), rows_cond)
    return MatchingBatch(x_t, target, sigma, v_old)


class ForwardProcess:
    """The forward-process objectives' shared core: optimizer steps over the final samples noised again at fresh
    training sigmas (`matching_batch`). The trained velocity is the conditional one (CFG-free training); an optional
    KL term (kl_beta) is mean ||v - v_ref||^2 to the base. Each of the `epochs` passes of `updates` optimizer steps
    has training sigmas of its own. A subclass gives the loss of one micro-batch and term (`loss`), after
    `prepare` has computed what it needs from the whole batch once."""

    stores_transitions = False
    guided_update = False
    supports_guard = False
    distills = False

    def __init__(self, policy: Policy, matching: MatchingConfig, clip_range: float, kl_beta: float,
                 micro_batch_size: int, updates: int, epochs: int, guard: bool = False):
        self.policy, self.matching = policy, matching
        self.clip_range, self.kl_beta, self.guard = clip_range, kl_beta, guard  # guard: objectives with a ratio
        self.micro_batch_size, self.updates, self.epochs = micro_batch_size, updates, epochs
        self.sampler_decay = matching.sampler_decay  # the rollout runs a soft copy of the weights (0: theta itself)

    @classmethod
    def from_config(cls, cfg: TrainConfig, policy: Policy, rescore_old: bool) -> ForwardProcess:
        return cls(policy, cfg.matching, cfg.loss.clip_range, cfg.loss.kl_beta, cfg.update.micro_batch_size,
                   cfg.update.steps_per_epoch, cfg.update.epochs, cfg.loss.grpo_guard)

    @staticmethod
    def forwards_per_backward(cfg: TrainConfig) -> int:
        return 1

    def train_mask(self, plan: Plan, batch_size: int, seed: int, iteration: int, first_sample: int) -> torch.Tensor:
        return torch.zeros((batch_size, len(plan.steps)), dtype=torch.bool)  # nothing to store: final samples only

    def terms(self, traj: Trajectory) -> int:
        return self.matching.sigmas_per_sample

    def _sampling_velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        with self.policy.autocast():
            return self.policy.model(x, sigma, cond).float()

    def prepare(self, batch: MatchingBatch, s: Samples) -> None:
        """Whatever the loss needs from the whole iteration (once, before the first optimizer step)."""

    def loss(self, v: torch.Tensor, batch: MatchingBatch, s: Samples, mb: torch.Tensor, k: int, u: int,
             stats: UpdateStats) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, statistics) of the trained velocity v [N, *latent] at rows mb, term k, of optimizer step u."""
        raise NotImplementedError

    def update(self, loop: UpdateLoop, s: Samples) -> UpdateStats:
        m, policy = self.matching, self.policy
        with policy.sampling():
            batch = matching_batch(self._sampling_velocity, s.traj.final, s.cond, s.plan, s.seeds, m, self.epochs,
                                   self.micro_batch_size)
        self.prepare(batch, s)

        def loss_of(u: int, mb: torch.Tensor, k: int, stats: UpdateStats):
            k += (u // self.updates) * m.sigmas_per_sample  # each update pass has sigmas of its own
            cond = cond_index(s.cond, mb)
            x_t, sigma = batch.x_t[mb, k], batch.sigma[mb, k]
            with policy.autocast():
                v = policy.model(x_t, sigma.float(), cond).float()
            loss, step_stats = self.loss(v, batch, s, mb, k, u, stats)
            return self._with_base_kl(loss, step_stats, v, x_t, sigma, cond)

        return loop.run(s.shares, m.sigmas_per_sample, loss_of, batch.x_t.device)

    def _with_base_kl(self, loss: torch.Tensor, step_stats: dict[str, torch.Tensor], v: torch.Tensor, x_t: torch.Tensor,
                      sigma: torch.Tensor, cond: Cond) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss plus kl_beta mean ||v - v_ref||^2 to the frozen base at x_t ([N, *latent]; sigma [N])."""
        if self.kl_beta <= 0:
            return loss, step_stats
        with torch.no_grad(), self.policy.autocast():
            v_ref = self.policy.reference(x_t, sigma.float(), cond).float()
        kl = ((v - v_ref) ** 2).flatten(1).mean(1).mean()
        return loss + self.kl_beta * kl, {**step_stats, "kl_to_base": kl.detach()}


@OBJECTIVES.register("diffusion_nft")
class DiffusionNFT(ForwardProcess):
    """DiffusionNFT (arXiv 2509.16117): implicit positive and negative policies around the sampling policy's
    velocity, weighted by the optimality probability r of each sample's advantage (`mixgrpo.flow_matching.nft_loss`)."""

    def prepare(self, batch: MatchingBatch, s: Samples) -> None:
        self.r = optimality_probability(s.advantages, self.matching.adv_clip)  # [B]

    def loss(self, v, batch, s, mb, k, u, stats):
        m = self.matching
        return nft_loss(v, batch.v_old[mb, k], batch.target[mb, k], self.r[mb], batch.sigma[mb, k], m.beta,
                        m.nft_weighting)


@OBJECTIVES.register("awm")
class AWM(ForwardProcess):
    """AWM, Advantage Weighted Matching (arXiv 2509.25050): the clipped policy loss with the flow-matching surrogate
    log p = -w(sigma) ||v - u||^2 (`mixgrpo.flow_matching.awm_log_prob`) as the log-probability, the sampling
    policy's as the old one. With the guard (`loss.grpo_guard`), the ratio is re-centred as GRPO-Guard's
    (`mixgrpo.grpo.guard_log_ratio`): the surrogate is log N(u | v, 1 / (2 w)), the mean v, the std 1 / sqrt(2 w)."""

    supports_guard = True

    @torch.no_grad()
    def prepare(self, batch: MatchingBatch, s: Samples) -> None:
        B, K = batch.sigma.shape
        self.log_prob_old = awm_log_prob(batch.v_old.flatten(0, 1), batch.target.flatten(0, 1), batch.sigma.flatten(),
                                         self.matching.awm_weighting).view(B, K)  # [B, K]

    def loss(self, v, batch, s, mb, k, u, stats):
        sigma = batch.sigma[mb, k]
        logp = awm_log_prob(v, batch.target[mb, k], sigma, self.matching.awm_weighting)
        if self.guard:
            std = (2 * awm_weight(sigma.to(logp.dtype), self.matching.awm_weighting)).rsqrt()  # [N]
            log_ratio = guard_log_ratio(logp - self.log_prob_old[mb, k], v, batch.v_old[mb, k], std)
            loss, step_stats = ratio_loss(log_ratio, s.advantages[mb], self.clip_range)
            if u == 0:
                stats.note_ratio(log_ratio, torch.zeros_like(log_ratio))
            return loss, step_stats
        loss, step_stats = policy_loss(logp, self.log_prob_old[mb, k], s.advantages[mb], self.clip_range)
        if u == 0:
            stats.note_ratio(logp, self.log_prob_old[mb, k])
        return loss, step_stats


def vgrpo_pairs(seeds: list[int], group_size: int, latent: tuple[int, ...], v_grpo: VGRPOConfig,
                matching: MatchingConfig, epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V-GRPO's timestep-noise pairs of one iteration: (sigma [B, E M] float64, eps [B, E M, *latent]), M =
    v_grpo.pairs per update pass (pass e uses pairs [e M, (e + 1) M)), E = `epochs`. Drawn from the sample's own
    seed, or with `shared_pairs` from the seed of its group's first sample (rows in group order, whole groups per
    rank), so every sample of a group is scored on the same pairs, on any rank and after a resume. Sigmas are
    stratified (`mixgrpo.flow_matching.stratified_sigmas`) or i.i.d. from matching.sigmas."""
    K = v_grpo.pairs * epochs
    draws: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b, seed in enumerate(seeds):
        key = seeds[b - b % group_size] if v_grpo.shared_pairs else seed
        if key not in draws:
            g = torch.Generator().manual_seed(key)
            sigma = (stratified_sigmas(K, v_grpo.pairs, g) if v_grpo.stratified
                     else sample_sigmas(K, g, matching.sigmas, matching.sigma_mean, matching.sigma_std))
            draws[key] = sigma, torch.randn((K, *latent), generator=g)
    rows = [draws[seeds[b - b % group_size] if v_grpo.shared_pairs else seed] for b, seed in enumerate(seeds)]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


@OBJECTIVES.register("v_grpo")
class VGRPO(ForwardProcess):
    """V-GRPO, Variational GRPO (arXiv 2604.23380): the whole generation is one action, its log-likelihood the
    negative flow-matching loss of the final sample over M = v_grpo.pairs timestep-noise pairs (`vgrpo_pairs`), in
    GRPO's clipped loss with one ratio per sample against the sampling policy (`mixgrpo.flow_matching.vgrpo_loss`).
    An optimizer step's micro-batch runs M trained forwards before its backward (M times the activations of the
    other forward-process objectives). The stabilisers are options of `v_grpo:` (and `loss.clip_range`, `loss.kl_beta`)."""

    def __init__(self, policy: Policy, matching: MatchingConfig, clip_range: float, kl_beta: float,
                 micro_batch_size: int, updates: int, epochs: int, v_grpo: VGRPOConfig, group_size: int):
        super().__init__(policy, matching, clip_range, kl_beta, micro_batch_size, updates, epochs)
        self.v_grpo, self.group_size = v_grpo, group_size

    @classmethod
    def from_config(cls, cfg: TrainConfig, policy: Policy, rescore_old: bool) -> VGRPO:
        return cls(policy, cfg.matching, cfg.loss.clip_range, cfg.loss.kl_beta, cfg.update.micro_batch_size,
                   cfg.update.steps_per_epoch, cfg.update.epochs, cfg.v_grpo, cfg.rollout.group_size)

    @staticmethod
    def forwards_per_backward(cfg: TrainConfig) -> int:
        return cfg.v_grpo.pairs  # the M pairs of one ratio are in one backward

    def terms(self, traj: Trajectory) -> int:
        return self.v_grpo.pairs

    def update(self, loop: UpdateLoop, s: Samples) -> UpdateStats:
        vg, policy, final = self.v_grpo, self.policy, s.traj.final
        M = vg.pairs
        sigma, eps = vgrpo_pairs(s.seeds, self.group_size, tuple(final.shape[1:]), vg, self.matching, self.epochs)
        with policy.sampling():
            batch = noised_batch(self._sampling_velocity, final, s.cond, sigma.to(final.device),
                                 eps.to(final.device, final.dtype), self.micro_batch_size)

        def loss_of(u: int, mb: torch.Tensor, _: int, stats: UpdateStats):
            pairs = slice((u // self.updates) * M, (u // self.updates + 1) * M)  # this update pass's pairs
            cond = cond_index(s.cond, mb)
            x_t, sig = batch.x_t[mb, pairs], batch.sigma[mb, pairs]  # [N, M, *latent], [N, M]
            with policy.autocast():
                v = torch.stack([policy.model(x_t[:, m], sig[:, m].float(), cond).float() for m in range(M)], 1)
            loss, step_stats = vgrpo_loss(v, batch.v_old[mb, pairs], batch.target[mb, pairs], sig, s.advantages[mb],
                                          self.clip_range, vg.weighting, vg.adv_soft_clip, vg.kl_old)
            if u == 0:
                extremes = torch.stack([step_stats["ratio_max"], step_stats["ratio_min"]]).log()
                stats.note_ratio(extremes, torch.zeros_like(extremes))
            cond_rows = cond_index(s.cond, mb.repeat_interleave(M))
            return self._with_base_kl(loss, step_stats, v.flatten(0, 1), x_t.flatten(0, 1), sig.flatten(), cond_rows)

        return loop.run(s.shares, 1, loss_of, final.device)  # one loss term per sample: the M pairs in one ratio
