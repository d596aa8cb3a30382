"""The GRPO trainer: one rollout loop and one update loop for every algorithm.

Flow-GRPO, DanceGRPO, MixGRPO, MixGRPO-Flash and Flash* differ only in their step plan
(`mixgrpo.plan`): which steps are SDE, ODE or DPM-Solver++, and which are trained. Each iteration:

1. plan      = build_plan(sampler, iteration, seed)        the window position is a pure function of both
2. rollout   P prompts x G images, shared initial noise per group, old log-probs from the rollout itself
3. rewards   scored on the decoded images, fused into group-normalised advantages
4. update    `updates_per_iteration` optimizer steps; step u sees the u-th share of every group; each
             trained transition is re-scored with the current weights under the clipped GRPO loss
5. log       one line of metrics.jsonl; a checkpoint every `checkpoint_every` iterations

All randomness derives from (seed, iteration, global prompt index), so a resumed run reproduces the
uninterrupted one and the result does not depend on how prompts are spread over ranks.

Simplifications: the frozen reference for the KL term and the EMA hold copies of the trainable weights only
(the rest of the model is shared), and are evaluated with `torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.func import functional_call

from mixgrpo import dist
from mixgrpo.checkpoint import (CheckpointError, is_sharded_checkpoint, latest_checkpoint, load_checkpoint,
                                 load_sharded_checkpoint, read_state, save_checkpoint, save_sharded_checkpoint)
from mixgrpo.config import ConfigError, RewardConfig, TrainConfig, save_config, to_dict
from mixgrpo.evaluate import evaluate
from mixgrpo.export import export_model
from mixgrpo.fileio import writing
from mixgrpo.flow_matching import awm_log_prob, forward_noise, nft_loss, optimality_probability, sample_sigmas
from mixgrpo.grpo import combine_rewards, kl_to_reference, policy_loss
from mixgrpo.images import plot_panels, save_grid
from mixgrpo.models import MODELS, FlowModel, cond_index, cond_repeat_interleave, cond_to
from mixgrpo.models.base import guided_velocity
from mixgrpo.plan import build_plan, ode_plan, train_mask
from mixgrpo.preflight import check_run
from mixgrpo.prompts import read_prompts
from mixgrpo.rewards import RewardError, build_reward
from mixgrpo.rollout import Trajectory, rollout
from mixgrpo.rundir import claim, keep_records_before
from mixgrpo.sampling import transition_log_prob
from mixgrpo.seeding import group_seeds, prompt_indices, sample_seeds, update_shares
from mixgrpo.tracking import Trackers, resource_metrics


class TrainingError(RuntimeError):
    """Training cannot go on (too many failed rewards, non-finite loss, ...); the message says why."""


class TrainingStopped(Exception):
    """SIGTERM/SIGINT stopped the run after a checkpoint; `--resume` continues it. The CLI exits 128 + signum
    (143 for SIGTERM, 130 for SIGINT), so a job scheduler sees an unfinished run, not a success."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# --------------------------------------------------------------------------------------------------
# building blocks


def build_model(cfg: TrainConfig, device: torch.device) -> FlowModel:
    factory = MODELS.get(cfg.model.name)
    try:
        model = factory(**cfg.model.args)
    except TypeError as e:
        raise ConfigError(f"model.args do not fit model {cfg.model.name!r}: {e}") from None
    return model.to(device)


def build_rewards(specs: list[RewardConfig], build: bool = True) -> list[tuple[str, float, Callable]]:
    """[(label, weight, fn)]; labels are unique ("verifier", "verifier_strict", "verifier_2", ...);
    weight 0 = logged only. build=False gives the labels and weights with fn None (ranks that score nothing)."""
    out, seen = [], {}
    for spec in specs:
        fn = build_reward(spec.name, spec.args) if build else None
        base = spec.name.split(":")[-1]
        if spec.args.get("score") and spec.args["score"] != "dense":
            base = f"{base}_{spec.args['score']}"
        seen[base] = seen.get(base, 0) + 1
        out.append((base if seen[base] == 1 else f"{base}_{seen[base]}", spec.weight, fn))
    if all(w == 0 for _, w, _ in out):
        raise ConfigError("every reward has weight 0: give at least one reward a non-zero weight")
    return out


def trainable_parameters(model: FlowModel, cfg: TrainConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze everything, then unfreeze the denoiser (full) or add and unfreeze LoRA weights."""
    model.requires_grad_(False)
    if cfg.lora.rank > 0:
        from mixgrpo.models.lora import apply_lora

        if not hasattr(model.denoiser, "add_adapter"):  # LoRA goes through diffusers' peft integration
            raise ConfigError(f"lora.rank = {cfg.lora.rank}: model {cfg.model.name!r} does not support LoRA "
                              f"adapters (its denoiser is not a diffusers model): use lora.rank=0")
        apply_lora(model.denoiser, rank=cfg.lora.rank, alpha=cfg.lora.alpha or cfg.lora.rank,
                   target_modules=list(cfg.lora.target_modules))
    else:
        model.denoiser.requires_grad_(True)
    if cfg.grad_checkpointing and hasattr(model.denoiser, "enable_gradient_checkpointing"):
        model.denoiser.enable_gradient_checkpointing()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ConfigError("no trainable parameters: check lora.target_modules against the model's module names")
    return params


TRANSIENT_ERRORS = (RewardError, TimeoutError, ConnectionError)
"""Reward failures worth retrying. Anything else (a TypeError, a prompt the reward cannot parse) is a bug or
bad input that a retry cannot fix: it propagates at once."""


class RetryingReward:
    """A reward under the failure policy. A call that raises one of TRANSIENT_ERRORS (a reward's own timeout
    included) or returns the wrong number of scores is retried `retries` times with backoff; if it still fails,
    a warning is printed and every image gets NaN, which the caller counts as failed groups. NaN/inf scores
    are not retried (the reward's verdict on those images). `last_error` keeps the reason of the latest
    call's failure or non-finite scores (None when clean), for the abort message."""

    def __init__(self, label: str, fn: Callable, retries: int):
        self.label, self.fn, self.retries = label, fn, retries
        self.last_error: str | None = None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.last_error = None
        for attempt in range(self.retries + 1):
            try:
                result = torch.as_tensor(self.fn(images, prompts), dtype=torch.float32).flatten().cpu()
                if result.numel() != len(prompts):
                    raise RewardError(f"returned {result.numel()} scores for {len(prompts)} images")
            except TRANSIENT_ERRORS as e:
                self.last_error = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(min(0.1 * 2.0**attempt, 2.0))
                continue
            bad = int((~torch.isfinite(result)).sum())
            self.last_error = f"{bad} of {result.numel()} scores were NaN or inf" if bad else None
            return result
        dist.print0(f"warning: reward {self.label!r} failed after {self.retries + 1} attempts ({self.last_error}); "
                    f"its images are scored NaN and their groups skipped")
        return torch.full((len(prompts),), float("nan"))


def score_groups(rewards: list[tuple[str, float, Callable]], images: torch.Tensor, prompts: list[str],
                 group_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Score B images with every reward -> ({label: [P, G]}, failed [P] bool): a group fails when any of
    its images got a NaN or infinite score from any reward."""
    num_prompts = len(prompts) // group_size
    scores = {label: fn(images, prompts).view(num_prompts, group_size) for label, _, fn in rewards}
    failed = torch.zeros(num_prompts, dtype=torch.bool)
    for s in scores.values():
        failed |= ~torch.isfinite(s).all(1)
    return scores, failed


class ModelClock:
    """Counts model calls and the seconds spent inside them (forward via hooks; the trainer adds backward).

    On CUDA each call is synchronised so that the time is the kernel time: enabled by `profile: true` only.
    """

    def __init__(self, model: torch.nn.Module, sync: bool):
        self.calls, self.seconds, self._start, self.sync = 0, 0.0, 0.0, sync
        model.register_forward_pre_hook(lambda *a: self._begin())
        model.register_forward_hook(lambda *a: self._end(count=True))

    def _begin(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def _end(self, count: bool) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._start
        self.calls += int(count)

    @contextlib.contextmanager
    def measure(self):
        """Time a block (the backward pass) as model time without counting a call."""
        self._begin()
        yield
        self._end(count=False)

    def take(self) -> tuple[int, float]:
        out = (self.calls, self.seconds)
        self.calls, self.seconds = 0, 0.0
        return out


class EMA:
    """Exponential moving average of the trainable weights (kept in float32)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.nn.Parameter]) -> None:
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)


@contextlib.contextmanager
def swapped_weights(model: FlowModel, weights: dict[str, torch.Tensor] | None):
    """Run a block with some parameters replaced in place (EMA weights for evaluation, the sampling copy for a
    rollout), restoring the live ones afterwards. weights=None changes nothing."""
    if weights is None:
        yield
        return
    backup = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in weights:
                p.copy_(weights[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in backup:
                    p.copy_(backup[n])


def model_with(model: FlowModel, weights: dict[str, torch.Tensor] | None) -> Callable:
    """A callable (x, sigma, cond) -> v that runs `model` with some parameters replaced (e.g. the frozen base)."""
    if weights is None:
        return model
    return lambda x, sigma, cond: functional_call(model, weights, (x, sigma, cond), strict=False)


# --------------------------------------------------------------------------------------------------
# the update


@dataclass
class UpdateStats:
    sums: dict[str, float] = field(default_factory=dict)
    weight: float = 0.0
    grad_norms: list[float] = field(default_factory=list)
    onpolicy_ratio_error: float = 0.0
    model_calls: int = 0

    def add(self, stats: dict[str, torch.Tensor], w: float) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * w
        self.weight += w

    def means(self) -> dict[str, float]:
        out = {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}
        out["grad_norm"] = sum(self.grad_norms) / max(len(self.grad_norms), 1)
        out["onpolicy_ratio_error"] = self.onpolicy_ratio_error
        return out


def optimizer_steps(params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    shares: list[torch.Tensor], num_terms: int, micro_batch_size: int, grad_clip: float,
                    loss_of: Callable[[int, torch.Tensor, int, UpdateStats], tuple[torch.Tensor, dict]],
                    ema: EMA | None, clock: ModelClock | None, device: torch.device) -> UpdateStats:
    """One optimizer step per share, whatever the objective.

    shares: one index tensor per optimizer step (the samples it sees); num_terms: K loss terms per sample
    (trained steps, or training sigmas); loss_of(u, mb, k, stats) -> (mean loss over the micro-batch mb at
    term k, stats). Within a step the loss is the mean over its samples and terms, whatever the micro-batch
    size, so `micro_batch_size` changes memory only; gradients are averaged over ranks before clipping.
    """
    stats = UpdateStats()
    for u, share in enumerate(shares):
        optimizer.zero_grad(set_to_none=True)
        n_share = dist.all_reduce_mean(torch.tensor(float(len(share)))).item() * dist.world_size()
        for mb in share.split(micro_batch_size):
            mb = mb.to(device)
            for k in range(num_terms):
                loss, step_stats = loss_of(u, mb, k, stats)
                stats.model_calls += 1
                if not torch.isfinite(loss):
                    raise TrainingError(f"the loss became {loss.item()} at optimizer step {u}, term {k}: lower lr "
                                        f"or clip_range, or check the rewards for extreme values")
                weight = len(mb) / (n_share * num_terms)
                with clock.measure() if clock is not None else contextlib.nullcontext():
                    (loss * weight * dist.world_size()).backward()
                stats.add({"loss": loss.detach(), **step_stats}, weight)
        grads = [p for p in params.values() if p.grad is not None]
        dist.average_gradients([p.grad for p in grads])
        norm = torch.nn.utils.clip_grad_norm_(grads, grad_clip if grad_clip > 0 else float("inf"))
        if not torch.isfinite(norm):  # stepping would write NaN into the weights (and the next checkpoint)
            raise TrainingError(f"the gradient norm became {float(norm)} at optimizer step {u}; the weights were "
                                f"not updated: lower lr or clip_range, or check the rewards for extreme values")
        stats.grad_norms.append(float(norm))
        optimizer.step()
        if ema is not None:
            ema.update(params)
    return stats


def update(model: FlowModel, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
           traj: Trajectory, advantages: torch.Tensor, cond: torch.Tensor | dict, uncond: dict | None,
           plan, cfg: TrainConfig, shares: list[torch.Tensor], ref_weights: dict[str, torch.Tensor] | None,
           ema: EMA | None, autocast: Callable[[], Any], clock: ModelClock | None = None) -> UpdateStats:
    """GRPO: optimizer steps over the stored transitions, each re-scored under the clipped policy loss.

    advantages: [B]; cond, uncond: [B, ...] rows; shares: one index tensor per optimizer step.
    """
    reference = model_with(model, ref_weights)

    def loss_of(u: int, mb: torch.Tensor, k: int, stats: UpdateStats):
        mb_cond = cond_index(cond, mb)
        mb_uncond = None if uncond is None else cond_index(uncond, mb)
        x, x_next = traj.x[mb, k], traj.x_next[mb, k]
        sigma, sigma_next = traj.sigma[mb, k], traj.sigma_next[mb, k]
        with autocast():
            v = guided_velocity(model, x, sigma.float(), mb_cond, mb_uncond, cfg.guidance_scale)
        logp, mean, std = transition_log_prob(x, v, x_next, sigma, sigma_next, plan.sde_form, plan.eta)
        loss, step_stats = policy_loss(logp, traj.log_prob[mb, k], advantages[mb], cfg.clip_range)
        if cfg.kl_beta > 0:
            with torch.no_grad(), autocast():
                v_ref = guided_velocity(reference, x, sigma.float(), mb_cond, mb_uncond, cfg.guidance_scale)
            mean_ref = transition_log_prob(x, v_ref, x_next, sigma, sigma_next, plan.sde_form, plan.eta).mean
            kl = kl_to_reference(mean, mean_ref, std).mean()
            loss = loss + cfg.kl_beta * kl
            step_stats = {**step_stats, "kl_to_base": kl.detach()}
        if u == 0:
            ratio_err = (logp.detach() - traj.log_prob[mb, k]).abs().max().exp().item() - 1
            stats.onpolicy_ratio_error = max(stats.onpolicy_ratio_error, ratio_err)
        return loss, step_stats

    return optimizer_steps(params, optimizer, shares, traj.x.shape[1], cfg.micro_batch_size, cfg.grad_clip, loss_of,
                           ema, clock, traj.x.device)


@dataclass
class MatchingBatch:
    """The forward-process training data of one iteration: K training sigmas per final sample.

    x_t, target, v_old: [B, K, *latent] (x_sigma, u = eps - x0, the sampling policy's velocity at x_sigma);
    sigma: [B, K] float64; log_prob_old: [B, K] AWM's surrogate under the sampling policy (None for NFT).
    """

    x_t: torch.Tensor
    target: torch.Tensor
    sigma: torch.Tensor
    v_old: torch.Tensor
    log_prob_old: torch.Tensor | None


@torch.no_grad()
def matching_batch(sampler_model: Callable, final: torch.Tensor, cond: dict, plan, cfg: TrainConfig,
                   sample_seeds: list[int], autocast: Callable[[], Any]) -> MatchingBatch:
    """Draw K = matching.sigmas_per_sample training sigmas and noises per final sample ([B, *latent]) and
    update pass (update_epochs) from the sample's own seed (the same on any rank and after a resume), noise the
    samples by the forward process, and evaluate the sampling policy there (conditional velocity: training is
    CFG-free). Pass e uses terms [e K, (e + 1) K)."""
    m = cfg.matching
    B, K = final.shape[0], m.sigmas_per_sample * cfg.update_epochs
    window = None
    if plan.window is not None:
        window = (plan.steps[plan.window[1] - 1].sigma_next, plan.steps[plan.window[0]].sigma)
    sigmas, noises = [], []
    for seed in sample_seeds:
        g = torch.Generator().manual_seed(seed)
        sigmas.append(sample_sigmas(K, g, m.sigmas, m.sigma_mean, m.sigma_std, window))
        noises.append(torch.randn((K, *final.shape[1:]), generator=g))
    sigma = torch.stack(sigmas).to(final.device)  # [B, K]
    eps = torch.stack(noises).to(final.device, final.dtype)  # [B, K, *latent]
    x0 = final[:, None].expand_as(eps)
    x_t, target = forward_noise(x0.flatten(0, 1), eps.flatten(0, 1), sigma.flatten())
    x_t, target = x_t.view_as(eps), target.view_as(eps)
    v_old = torch.empty_like(x_t)
    for b in range(0, B, cfg.micro_batch_size):
        rows = slice(b, b + cfg.micro_batch_size)
        rows_cond = cond_index(cond, torch.arange(B, device=final.device)[rows])
        for k in range(K):
            with autocast():
                v_old[rows, k] = sampler_model(x_t[rows, k], sigma[rows, k].float(), rows_cond).float()
    log_prob_old = None
    if cfg.objective == "awm":
        log_prob_old = awm_log_prob(v_old.flatten(0, 1), target.flatten(0, 1), sigma.flatten(),
                                    m.awm_weighting).view(B, K)
    return MatchingBatch(x_t, target, sigma, v_old, log_prob_old)


def matching_update(model: FlowModel, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    batch: MatchingBatch, advantages: torch.Tensor, cond: dict, cfg: TrainConfig,
                    shares: list[torch.Tensor], ref_weights: dict[str, torch.Tensor] | None, ema: EMA | None,
                    autocast: Callable[[], Any], clock: ModelClock | None = None) -> UpdateStats:
    """A forward-process objective (DiffusionNFT or AWM, `mixgrpo.flow_matching`): optimizer steps over the
    noised final samples. advantages: [B] group advantages; cond: [B, ...] rows. The trained velocity is the
    conditional one (CFG-free training); an optional KL term (kl_beta) is mean ||v - v_ref||^2 to the base."""
    reference = model_with(model, ref_weights)
    m = cfg.matching
    r = optimality_probability(advantages, m.adv_clip)

    def loss_of(u: int, mb: torch.Tensor, k: int, stats: UpdateStats):
        k += (u // cfg.updates_per_iteration) * m.sigmas_per_sample  # each update pass has sigmas of its own
        mb_cond = cond_index(cond, mb)
        x_t, sigma = batch.x_t[mb, k], batch.sigma[mb, k]
        with autocast():
            v = model(x_t, sigma.float(), mb_cond).float()
        if cfg.objective == "diffusion_nft":
            loss, step_stats = nft_loss(v, batch.v_old[mb, k], batch.target[mb, k], r[mb], sigma, m.beta,
                                        m.nft_weighting)
        else:
            logp = awm_log_prob(v, batch.target[mb, k], sigma, m.awm_weighting)
            loss, step_stats = policy_loss(logp, batch.log_prob_old[mb, k], advantages[mb], cfg.clip_range)
            if u == 0:
                ratio_err = (logp.detach() - batch.log_prob_old[mb, k]).abs().max().exp().item() - 1
                stats.onpolicy_ratio_error = max(stats.onpolicy_ratio_error, ratio_err)
        if cfg.kl_beta > 0:
            with torch.no_grad(), autocast():
                v_ref = reference(x_t, sigma.float(), mb_cond).float()
            kl = ((v - v_ref) ** 2).flatten(1).mean(1).mean()
            loss = loss + cfg.kl_beta * kl
            step_stats = {**step_stats, "kl_to_base": kl.detach()}
        return loss, step_stats

    return optimizer_steps(params, optimizer, shares, m.sigmas_per_sample, cfg.micro_batch_size, cfg.grad_clip,
                           loss_of, ema, clock, batch.x_t.device)


# --------------------------------------------------------------------------------------------------
# guards: nothing non-finite is saved, and a run without learning signal says so


def _any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (so that all ranks stop at the same point)."""
    return dist.all_reduce_mean(torch.tensor([float(flag)], device=dist.device())).item() > 0


def _count_non_finite(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(NaN or inf elements, elements) over this rank's part of `tensors` (FSDP: its shards), in one sync."""
    local = [t.detach().to_local() if hasattr(t, "to_local") else t.detach() for t in tensors]
    if not local:
        return 0, 0
    bad = torch.stack([(~torch.isfinite(t)).sum() for t in local]).sum()
    return int(bad), sum(t.numel() for t in local)


def _require_finite_weights(params: dict[str, torch.nn.Parameter], copies: tuple[EMA | None, ...],
                            iteration: int) -> None:
    """Stop after an update that made a weight (or a copy saved with it: EMA, sampling copy) NaN or inf, before
    the iteration is logged or checkpointed: a finite loss and gradient norm do not rule it out (lr = 1e10: the
    step itself overflows)."""
    bad, total = _count_non_finite([*params.values(), *(t for c in copies if c for t in c.shadow.values())])
    if _any_rank(bad > 0):
        where = f"{bad:,} of {total:,}" if dist.world_size() == 1 else f"{bad:,} of {total:,} on rank {dist.rank()}"
        raise TrainingError(f"the update of iteration {iteration + 1} made {where} trainable weights NaN or inf; "
                            f"they were not logged or saved (the last checkpoint holds finite weights): lower lr "
                            f"or clip_range, or check the rewards for extreme values")


def _require_finite_images(images: torch.Tensor, iteration: int) -> None:
    """Stop when a rollout gives NaN or inf pixels (images [B, 3, H, W]): no reward can score them, and
    scoring them as failures would hide a model that has diverged."""
    bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
    if _any_rank(bad > 0):
        raise TrainingError(f"the rollout of iteration {iteration + 1} gave {bad} of {images.shape[0]} images with "
                            f"NaN or inf pixels{'' if dist.world_size() == 1 else f' on rank {dist.rank()}'}: the "
                            f"model's outputs overflowed (weights grown by a too high lr, or bf16 range); nothing of "
                            f"this iteration was saved: lower lr or clip_range, or use precision: fp32")


def _warn_without_signal(record: dict[str, Any]) -> None:
    """One warning line for an iteration in which every group's advantages are zero (record: its metrics)."""
    if record["zero_advantage_groups"] == 1.0:
        dist.print0(f"warning: iteration {record['iteration']}: no learning signal: within every group the images "
                    f"got equal rewards (or failed), so every advantage is 0 and the update changes nothing")


def _no_signal_message(metrics: list[dict[str, Any]]) -> str | None:
    """Why a whole run learned nothing, when no iteration of it had learning signal; else None."""
    if not metrics or any(m.get("zero_advantage_groups", 0.0) < 1.0 for m in metrics):
        return None
    return (f"no learning signal in any of the {len(metrics)} iterations: within every group the images got equal "
            f"rewards (a constant or saturated reward?), so the policy gradient was always 0 and final/ is the base "
            f"model (up to weight decay); check the reward on the base model's images (mixgrpo eval) and its args")


def _require_learning_signal(run_dir: Path) -> None:
    """The end-of-run policy (docs/reliability.md): a run in which no iteration had learning signal ends with
    TrainingError (exit 2) after everything is written, so that neither a person nor a job scheduler takes it
    for a success. Every rank calls it; rank 0 reads metrics.jsonl (the whole run, resumed parts included)."""
    message = _no_signal_message(read_metrics(run_dir)) if dist.is_main() else None
    if _any_rank(message is not None):
        raise TrainingError(message or "no learning signal in any iteration (rank 0 says more)")


# --------------------------------------------------------------------------------------------------
# the run


def _progress_line(record: dict[str, Any], rewards: list, held_out: dict[str, float], iterations: int,
                   eta: float) -> str:
    """One line per iteration: the trained rewards (non-zero weight), the latest held-out figures, the loss
    and KL in scientific notation (they are often ~1e-5), clipping, speed and ETA."""
    trained = " ".join(f"{label} {record[f'reward/{label}']:.4f}" for label, w, _ in rewards if w != 0)
    window = "all" if record["window_start"] is None else f"{record['window_start']}-{record['window_end'] - 1}"
    parts = [f"it {record['iteration']:4d}/{iterations}", trained, f"window {window}", f"nfe {record['nfe_rollout']}",
             f"loss {record.get('loss', 0.0):+.2e}"]
    if "kl_to_base" in record:
        parts.append(f"kl {record['kl_to_base']:.2e}")
    if "clip_fraction" in record:
        parts.append(f"clip {record['clip_fraction']:.3f}")
    if held_out:
        parts.append("held-out " + " ".join(f"{k[5:]} {v:.3f}" for k, v in held_out.items()))
    parts.append(f"{record['time/iteration']:5.2f} s/it | ETA {_format_eta(eta)}")
    return " | ".join(parts)


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag: the loop finishes the iteration, checkpoints and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        dist.print0(f"\nreceived {signal.Signals(signum).name}: finishing this iteration, then checkpointing")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _eval_and_save(model, weights, prompts, rewards, cfg, tag: str | None, run_dir: Path) -> dict[str, float]:
    plan = ode_plan(cfg.sampler.num_steps, cfg.sampler.shift)
    guidance = cfg.guidance_scale if cfg.eval_guidance_scale < 0 else cfg.eval_guidance_scale
    with swapped_weights(model, weights):  # EMA weights, without touching the live ones
        res = evaluate(model, prompts, [(n, fn) for n, _, fn in rewards], plan, cfg.eval_images_per_prompt,
                       seed=cfg.seed + 1, guidance_scale=guidance)
    if dist.is_main() and tag is not None:
        save_grid(res.images[:64, 0], run_dir / f"samples_{tag}.png", nrow=8, scale=2, captions=res.prompts[:64])
    return {f"eval/{k}": v["mean"] for k, v in res.summary().items()}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Run GRPO training; returns the run directory. `stop_after` ends early after that many iterations
    of this call (tests use it to simulate an interruption). The run directory is locked for the whole run
    (`mixgrpo.rundir.claim`): a second process on it stops at once."""
    dist.init()
    check_run(cfg)  # everything the run needs (devices, rewards, prompts, embedding cache), before the run
    with claim(cfg.out_dir, resume):  # directory is claimed or any model loads
        return _run(cfg, resume, progress, stop_after)


def _run(cfg: TrainConfig, resume: bool, progress: bool, stop_after: int | None) -> Path:
    device = dist.device()
    run_dir = Path(cfg.out_dir)
    latest = latest_checkpoint(run_dir)
    if resume and latest is not None:
        # the fingerprint first: a checkpoint of another config is named as such, not as a weight-shape error
        _check_resumable(latest, read_state(latest).get("config") or {}, _fingerprint(cfg), run_dir)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    params = trainable_parameters(model, cfg)
    base_weights = {n: p.detach().clone() for n, p in params.items()} if cfg.kl_beta > 0 else None
    model = dist.wrap_model(model, cfg.parallel)  # FSDP replaces the parameters by their shards: collect them again
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    builds = cfg.parallel.rewards_on == "every_rank" or dist.is_main()  # "rank0": no reward model elsewhere
    rewards = [(label, w, RetryingReward(label, fn, cfg.reward_policy.retries))
               for label, w, fn in build_rewards(cfg.rewards, build=builds)]
    # the training images of every rank are scored where the rewards live; evaluation runs on rank 0 only
    served = rewards if cfg.parallel.rewards_on == "every_rank" else [(k, w, dist.on_rank0(fn)) for k, w, fn in rewards]
    train_prompts = read_prompts(cfg.train_prompts)
    eval_prompts = read_prompts(cfg.eval_prompts)[: cfg.eval_num_prompts]
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_iterations, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)))
    ema = EMA(params, cfg.ema_decay) if cfg.ema_decay > 0 else None
    grpo = cfg.objective == "grpo"
    # forward-process objectives roll out a soft copy of the weights (matching.sampler_decay; 0 = theta itself)
    sampler = EMA(params, cfg.matching.sampler_decay) if not grpo and cfg.matching.sampler_decay > 0 else None

    start = 0
    if resume and latest is not None:
        state = _restore(latest, model, params, optimizer, scheduler, ema, sampler)
        start = state["iteration"]
        dist.print0(f"resumed from {latest} at iteration {start}")
    tracker = None
    if dist.is_main():
        save_config(cfg, run_dir / "config.yaml")
        keep_records_before(run_dir / "metrics.jsonl", start + 1)  # the iterations the checkpoint covers
        # a checkpoint at N is written after N's evaluation: keep the rows up to it (none on a fresh start)
        keep_records_before(run_dir / "eval.jsonl", start + 1 if start else 0)
        tracker = Trackers(run_dir, to_dict(cfg), cfg.tensorboard, cfg.wandb_project)

    amp = cfg.precision == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)  # noqa: E731
    uncond_row = cond_to(model.encode_prompts([""]), device) if cfg.guidance_scale != 1.0 else None
    rank, world = dist.rank(), dist.world_size()
    P, G = cfg.prompts_per_iteration, cfg.group_size
    clock = ModelClock(model, sync=device.type == "cuda") if cfg.profile else None

    held_out: dict[str, float] = {}  # the latest held-out evaluation, for the progress line

    def evaluate_now(iteration: int, tag: str | None) -> None:
        """Held-out evaluation on the same noise every time (EMA weights when on), one row of eval.jsonl;
        tag "before"/"after" also saves the sample grid and prints the figures."""
        with dist.unsharded(model, cfg.parallel):  # FSDP: every rank gathers the weights, rank 0 evaluates
            if dist.is_main():
                held_out.update(_eval_and_save(model, ema.shadow if ema else None, eval_prompts, rewards, cfg, tag,
                                               run_dir))
                _record_eval(run_dir / "eval.jsonl", iteration, held_out)
                tracker.log(held_out, iteration)
                if tag is not None:
                    tracker.log_image("samples", run_dir / f"samples_{tag}.png", iteration)
                    dist.print0(f"{tag} training: " + ", ".join(f"{k} {v:.4f}" for k, v in held_out.items()))

    if start == 0 and eval_prompts:  # eval_num_prompts = 0 skips evaluation
        evaluate_now(0, "before")

    t_run = time.perf_counter()
    done_here, end = 0, start
    with _StopRequest() as stop:
        for it in range(start, cfg.iterations):
            t0 = time.perf_counter()
            plan = build_plan(cfg.sampler, it, cfg.seed)
            glob = prompt_indices(it, len(train_prompts), P * world, cfg.seed)
            mine = glob[rank * P:(rank + 1) * P]
            prompts = [train_prompts[i] for i in mine]
            cond = cond_to(model.encode_prompts(prompts), device)
            uncond = None if uncond_row is None else {k: v.expand(P, *v.shape[1:]) for k, v in uncond_row.items()}
            if grpo:
                mask = train_mask(plan, P * G, cfg.seed, it, sample_offset=rank * P * G)
            else:  # nothing to store: forward-process objectives train on the final samples only
                mask = torch.zeros((P * G, len(plan.steps)), dtype=torch.bool)
            seeds = group_seeds(cfg.seed, it, rank * P, P)
            if clock is not None:
                clock.take()
            model.eval()
            with autocast(), dist.unsharded(model, cfg.parallel), swapped_weights(model, sampler and sampler.shadow):
                traj = rollout(model, plan, cond, G, seeds, mask, uncond, cfg.guidance_scale, cfg.shared_noise)
            t1 = time.perf_counter()
            rollout_calls, rollout_model_s = clock.take() if clock is not None else (0, 0.0)

            with torch.no_grad():
                images = model.decode(traj.final).float()
            _require_finite_images(images, it)
            flat_prompts = [p for p in prompts for _ in range(G)]
            scores, failed = score_groups(served, images, flat_prompts, G)
            all_failed = dist.all_gather_cat(failed)
            if all_failed.float().mean().item() > cfg.reward_policy.max_failed_groups:
                reasons = "; ".join(f"{label}: {fn.last_error}" for label, _, fn in rewards if fn.last_error)
                raise TrainingError(f"{int(all_failed.sum())} of {all_failed.numel()} groups failed to get rewards at "
                                    f"iteration {it + 1} (limit: reward_policy.max_failed_groups = "
                                    f"{cfg.reward_policy.max_failed_groups}); {reasons or 'NaN or inf scores'}. "
                                    f"Fix the reward (model path, endpoint, binary), then resume")
            fused = {k: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0) for k, v in scores.items()}
            weights = {label: w for label, w, _ in rewards if w != 0}
            active = {k: v for k, v in fused.items() if k in weights}
            if cfg.advantage_std == "global":
                gathered = {k: dist.all_gather_cat(v) for k, v in active.items()}
                adv_all = combine_rewards(gathered, weights, cfg.reward_mode, std="global", clip=cfg.advantage_clip)
                advantages = adv_all[rank * P:(rank + 1) * P]
            else:
                advantages = combine_rewards(active, weights, cfg.reward_mode, clip=cfg.advantage_clip)
            advantages = advantages.masked_fill(failed[:, None], 0.0)
            t2 = time.perf_counter()

            model.train()
            shares = update_shares(cfg.seed, it, rank * P, P, G, cfg.updates_per_iteration, cfg.update_epochs)
            rows_cond = cond_repeat_interleave(cond, G)
            if grpo:
                ustats = update(model, params, optimizer, traj, advantages.flatten().to(device), rows_cond,
                                None if uncond is None else cond_repeat_interleave(uncond, G),
                                plan, cfg, shares, base_weights, ema, autocast, clock)
            else:
                seeds = sample_seeds(cfg.seed, it, rank * P * G, P * G)
                with swapped_weights(model, sampler and sampler.shadow):
                    batch = matching_batch(model, traj.final, rows_cond, plan, cfg, seeds, autocast)
                ustats = matching_update(model, params, optimizer, batch, advantages.flatten().to(device), rows_cond,
                                         cfg, shares, base_weights, ema, autocast, clock)
                if sampler is not None:
                    sampler.update(params)
            scheduler.step()
            _require_finite_weights(params, (ema, sampler), it)
            t3 = time.perf_counter()

            record = {"iteration": it + 1, "window_start": plan.window[0] if plan.window else None,
                      "window_end": plan.window[1] if plan.window else None,
                      "nfe_rollout": traj.nfe,
                      "nfe_trained": (traj.x.shape[1] if grpo else cfg.matching.sigmas_per_sample) * cfg.update_epochs,
                      "lr": optimizer.param_groups[0]["lr"],
                      "failed_groups": int(all_failed.sum())}
            for label, s in scores.items():
                s_all = dist.all_gather_cat(s)
                record[f"reward/{label}"] = float(torch.nanmean(s_all))
                record[f"reward/{label}_std"] = float(s_all[torch.isfinite(s_all)].std()) if s_all.numel() > 1 else 0.0
            local = {"advantage_abs_mean": float(advantages.abs().mean()),
                     "zero_advantage_groups": float((advantages.abs().sum(1) == 0).float().mean()), **ustats.means()}
            record.update(dist.mean_over_ranks(local))  # every rank holds the same number of samples
            _warn_without_signal(record)
            record.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                           "time/iteration": t3 - t0, **resource_metrics(device)})
            if clock is not None:
                update_calls, update_model_s = clock.take()
                record.update({"model_calls/rollout": rollout_calls, "model_calls/update": update_calls,
                               "time/model_rollout": rollout_model_s, "time/model_update": update_model_s})
            done_here += 1
            end = it + 1
            if dist.is_main():
                _append_json(run_dir / "metrics.jsonl", record)
                tracker.log(record, it + 1)
            # every rank stops at the same iteration, even when only some of them got the signal or ran out of time
            out_of_time = cfg.time_limit_minutes > 0 and time.perf_counter() - t_run >= 60 * cfg.time_limit_minutes
            flags = dist.all_reduce_mean(torch.tensor([float(stop.signal is not None), float(out_of_time)],
                                                      device=device))
            signalled = flags[0].item() > 0
            last = it + 1 == cfg.iterations or flags[1].item() > 0
            stopping = signalled or (stop_after is not None and done_here >= stop_after)
            if eval_prompts and cfg.eval_every and (it + 1) % cfg.eval_every == 0 and not last:
                evaluate_now(it + 1, None)  # before the checkpoint: a checkpoint at N implies its evaluation
            if dist.is_main() and progress:
                elapsed = time.perf_counter() - t_run
                eta = elapsed / done_here * (cfg.iterations - it - 1)
                if cfg.time_limit_minutes > 0:
                    eta = max(0.0, min(eta, 60 * cfg.time_limit_minutes - elapsed))
                print(_progress_line(record, rewards, held_out, cfg.iterations, eta), flush=True)
            if (it + 1) % cfg.checkpoint_every == 0 or last or stopping:
                _save(run_dir, it + 1, model, optimizer, scheduler, ema, sampler, cfg)
            if last:
                break
            if stopping:
                message = f"stopped after iteration {it + 1}; continue with --resume"
                if signalled:
                    signum = stop.signal or signal.SIGTERM
                    raise TrainingStopped(f"{signal.Signals(signum).name}: checkpoint saved, {message}", signum)
                dist.print0(message)
                if tracker is not None:
                    tracker.close()
                return run_dir

    if eval_prompts:
        evaluate_now(end, "after")
    export_model(model, run_dir / "final", ema.shadow if ema else None)  # every rank: FSDP shards are gathered
    if dist.is_main():
        _write_summary(run_dir, cfg)
        tracker.close()
        dist.print0(f"run directory: {run_dir}")
    _require_learning_signal(run_dir)
    return run_dir


def _fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """The parts of the config a resumed run must share with the original (not iterations or logging)."""
    d = to_dict(cfg)
    for key in ("iterations", "time_limit_minutes", "out_dir", "checkpoint_every", "keep_checkpoints", "reward_policy",
                "parallel", "tensorboard", "wandb_project"):
        d.pop(key, None)
    d["prompts_per_iteration"] *= dist.world_size()  # the global batch: a run may resume on another world size
    return json.loads(json.dumps(d))


def _save(run_dir, iteration, model, optimizer, scheduler, ema, sampler, cfg) -> None:
    """Checkpoint (every rank calls it). "full": weights and optimizer state gathered to rank 0, which writes
    them; "sharded": every rank writes its shards with torch.distributed.checkpoint."""
    state = {"config": _fingerprint(cfg)}
    if cfg.parallel.checkpoint_format == "sharded":
        save_sharded_checkpoint(run_dir, iteration, _sharded_app_state(model, optimizer, scheduler, ema, sampler),
                                state, keep=cfg.keep_checkpoints)
        return
    weights, optimizer_state = dist.full_state(model, optimizer)
    if not dist.is_main():
        return
    copies = {name: copy.shadow for name, copy in (("ema", ema), ("sampler", sampler)) if copy is not None}
    save_checkpoint(run_dir, iteration, weights, {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                    state, copies=copies, keep=cfg.keep_checkpoints)


def _sharded_app_state(model, optimizer, scheduler, ema, sampler) -> dict[str, Any]:
    """What a sharded checkpoint holds: this rank's shards of weights and optimizer state, scheduler, EMA and
    sampling copy."""
    app = {**dist.sharded_state(model, optimizer), "scheduler": scheduler.state_dict()}
    for name, copy in (("ema", ema), ("sampler", sampler)):
        if copy is not None:
            app[name] = copy.shadow
    return app


def _restore(path: Path, model, params, optimizer, scheduler, ema, sampler) -> dict[str, Any]:
    """Load checkpoint `path` (either format, written under any world size) into the live model, optimizer,
    scheduler, EMA and sampling copy; returns its state (iteration, config fingerprint)."""
    if is_sharded_checkpoint(path):
        app = _sharded_app_state(model, optimizer, scheduler, ema, sampler)
        state = load_sharded_checkpoint(path, app)  # in place; DCP reshards to this world size
        dist.load_state(model, optimizer, app["model"], app["optimizer"], full=False)
        scheduler.load_state_dict(app["scheduler"])
        return state
    ckpt = load_checkpoint(path)
    missing = set(params) - set(ckpt["model"])
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks weights {sorted(missing)[:3]}...: it is from "
                              f"another model configuration")
    dist.load_state(model, optimizer, ckpt["model"], ckpt["optimizer"]["optimizer"], full=True)
    scheduler.load_state_dict(ckpt["optimizer"]["scheduler"])
    for name, copy in (("ema", ema), ("sampler", sampler)):
        if copy is not None and ckpt[name] is not None:
            copy.shadow = {n: t.float() for n, t in ckpt[name].items()}
    return ckpt["state"]


def _append_json(path: Path, record: dict[str, Any]) -> None:
    with writing(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _eval_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # blank, or cut short by a crash mid-write
            pass
    return rows


def _record_eval(path: Path, iteration: int, metrics: dict[str, float]) -> None:
    """Write the evaluation at `iteration`, replacing any row at or after it (a run killed between its last
    evaluation and the export evaluates again on resume), so eval.jsonl holds one row per iteration."""
    keep_records_before(path, iteration)
    _append_json(path, {"iteration": iteration, **metrics})


def _config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every leaf that differs between two config fingerprints. A key the old one
    lacks is a field added by a newer mixgrpo (its default keeps the old behaviour), a key the new one lacks a
    field it removed (it did nothing): neither is a difference."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) if k in old and k in new
                for d in _config_diff(old[k], new[k], f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def _check_resumable(checkpoint: Path, old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume from a checkpoint of another configuration, naming the differences and the fix. A
    different global batch alone (another world size) gets the prompts_per_iteration that restores it."""
    changed = _config_diff(old, new)
    if not changed:
        return
    world, before, now = dist.world_size(), old.get("prompts_per_iteration"), new.get("prompts_per_iteration")
    if all(c.startswith("prompts_per_iteration:") for c in changed) and isinstance(before, int):
        fix = (f"resume with prompts_per_iteration={before // world}" if before % world == 0 else
               f"resume on a number of processes that divides {before}")
        raise CheckpointError(f"checkpoint {checkpoint} was trained with {before} prompts per iteration in all "
                              f"(prompts_per_iteration x processes), this launch has {now} "
                              f"({now // world} x {world} process{'es' if world > 1 else ''}): {fix}")
    raise CheckpointError(f"checkpoint {checkpoint} was written with a different configuration "
                          f"({', '.join(changed[:4])}): resume with the run's own config "
                          f"({run_dir / 'config.yaml'}) or start a new out_dir")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _write_summary(run_dir: Path, cfg: TrainConfig) -> None:
    """summary.md (before / after table) and the two curves: reward_curve.png (training reward per iteration,
    one panel per reward, held-out evaluations as points) and eval_curve.png (every held-out metric against
    iterations and training minutes)."""
    metrics = read_metrics(run_dir)
    evals = _eval_rows(run_dir / "eval.jsonl")
    reward_keys = [k for k in metrics[0] if k.startswith("reward/") and not k.endswith("_std")] if metrics else []
    plot_panels({k[7:]: {"train": [(m["iteration"], m[k]) for m in metrics]} for k in reward_keys},
                run_dir / "reward_curve.png", xlabels=("iteration",), title=f"{cfg.algorithm}: training reward",
                markers={k[7:]: {"held-out": [(e["iteration"], e[f"eval/{k[7:]}"]) for e in evals
                                              if f"eval/{k[7:]}" in e]} for k in reward_keys})
    minutes, total = {0: 0.0}, 0.0  # training minutes at the end of each iteration (evaluations excluded)
    for m in metrics:
        total += m["time/iteration"] / 60
        minutes[m["iteration"]] = total
    eval_keys = [k for k in (evals[0] if evals else {}) if k.startswith("eval/")]
    if eval_keys:
        plot_panels({k[5:]: {"held-out@0": [(e["iteration"], e[k]) for e in evals if k in e],
                             "held-out@1": [(minutes[e["iteration"]], e[k]) for e in evals
                                            if k in e and e["iteration"] in minutes]} for k in eval_keys},
                    run_dir / "eval_curve.png", xlabels=("iteration", "training minutes"),
                    title=f"{cfg.algorithm}: held-out evaluation ({cfg.eval_num_prompts} prompts x "
                          f"{cfg.eval_images_per_prompt} images, the same noise each time)")
    lines = [f"# Run summary: {cfg.algorithm} ({cfg.objective})", "",
             f"- iterations: {cfg.iterations}, prompts x group: {cfg.prompts_per_iteration} x {cfg.group_size}",
             f"- median seconds per iteration: {_median([m['time/iteration'] for m in metrics]):.2f}", ""]
    no_signal = _no_signal_message(metrics)
    if no_signal:
        lines += [f"**Warning: {no_signal}.**", ""]
    if len(evals) >= 2:
        lines += ["| held-out metric | before | after |", "|---|---|---|"]
        for k in evals[0]:
            if k.startswith("eval/") and k in evals[-1]:
                lines.append(f"| {k[5:]} | {evals[0][k]:.4f} | {evals[-1][k]:.4f} |")
    with writing(run_dir / "summary.md"):
        (run_dir / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else math.nan
