"""Typed configuration: dataclasses are the source of truth, YAML files hold recipes, and
`key.sub=value` overrides come from the command line.

    cfg = load_config("configs/mixgrpo.yaml", ["run.iterations=10", "sampler.window.size=2"])
    cfg = load_config(recipe_path("mixgrpo"))  # a shipped recipe by name, from a checkout or an installed package
    cfg = load_config("runs/x/config.yaml", saved=True)  # a run's own config, written by any mixgrpo version

`TrainConfig` is in sections (rollout, advantage, loss, optim, update, eval, run, ...; docs/design.md). Unknown keys
and values of the wrong type are errors that name the field and suggest the fix; a key of the flat layout before
the sections (`lr`) is refused with its new place (`optim.lr`), except in what a run stored (`migrate`).
`algorithm: NAME` selects a sampler preset from `mixgrpo.plan.ALGORITHMS`; `sampler.*` keys then override single
fields of that preset. A recipe may start from another (`base: NAME` or `base: path/relative/to/it.yaml`,
`read_recipe`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixgrpo.dtypes import PRECISIONS
from mixgrpo.errors import ConfigError, check_values
from mixgrpo.fileio import atomic_file
from mixgrpo.keyvalue import parse_pair
from mixgrpo.flow_matching import AWM_WEIGHTINGS, NFT_WEIGHTINGS, SIGMA_SAMPLERS
from mixgrpo.objectives import OBJECTIVES
from mixgrpo.plan import ALGORITHMS, SamplerConfig


def option(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, was: str = "",
           resumable: bool = False, compared: bool | None = None) -> Any:
    """A config field with its facts as metadata (`MOVED_KEYS`, `RESUMABLE_CHANGES` and `REFERENCE_IGNORED` are
    derived from them). Its meaning is the comment on its line (`mixgrpo.configdoc`).

    was:       its key before the config had sections (a flat `lr`, now `optim.lr`; "" = the same): a run
               directory's saved config.yaml or a checkpoint with it still loads (`migrate`); a recipe or override with
               it is refused with a message that names the new key.
    resumable: a resume may change it: the run's length, where and how it logs, not what it computes.
    compared:  whether a run is compared with a recipe's reference with it; false for what does not change what a
               run computes at an evaluated iteration (or changes it by float summation order only). Default: not
               for the resumable ones, else yes.
    """
    compared = not resumable if compared is None else compared
    return field(default=default, default_factory=factory,
                 metadata={"was": was, "resumable": resumable, "compared": compared})


def settings(section: type) -> Any:
    """A TrainConfig field holding a section whose fields are settings one by one, each with its own facts (`option`;
    `CONFIG_FIELDS`). Any other field (a plain `field`, or `option`) is one setting as a whole."""
    return field(default_factory=section, metadata={"settings": True})


@dataclass
class ModelConfig:
    name: str = "tiny"  # a name registered in mixgrpo.models.MODELS, or "package.module:factory"
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory


@dataclass
class RewardConfig:
    name: str = "verifier"  # a name registered in mixgrpo.rewards.REWARDS, or "package.module:function"
    weight: float = 1.0  # weight in the fused advantage; 0 = scored and logged only
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    frames: str = "mean"  # videos: how an image reward's frame scores become one (mixgrpo.rewards.FRAME_AGGREGATIONS)
    server: str | list[str] = ""  # URL of the reward server (mixgrpo serve-rewards) that scores it, or a list of
                                  # replicas' URLs that share the images; "" = scored in-process (docs/rewards.md)

    @property
    def servers(self) -> list[str]:
        """The server URLs of `server` (none: in-process)."""
        return [self.server] if isinstance(self.server, str) and self.server else list(self.server or [])


@dataclass
class LoraConfig:
    rank: int = 0  # 0 = full fine-tuning of the denoiser
    alpha: float = 0.0  # 0 = same as rank
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])  # layer names


@dataclass
class ParallelConfig:
    """How a run is spread over ranks (docs/distributed.md). None of it changes the update, except that
    param_dtype "bf16" computes with bf16 weights; a run may resume with other values."""

    strategy: str = "ddp"  # "ddp": replicated weights, gradients all-reduced; "fsdp": FSDP2, sharded per block
    reshard_after_forward: bool = True  # fsdp: free gathered weights after each training forward, re-gather in backward
    param_dtype: str = "fp32"  # fsdp: dtype of the gathered weights that forwards compute with ("bf16" or "fp32")
    reduce_dtype: str = "fp32"  # fsdp: dtype of the gradient reduce-scatter
    checkpoint_format: str = "full"  # "full": rank 0 writes gathered weights; "sharded": each rank its shard (DCP)
    rewards_on: str = "every_rank"  # "rank0": only rank 0 builds the reward models and scores every rank's images


@dataclass
class MatchingConfig:
    """The forward-process objectives (objective: diffusion_nft, awm or v_grpo; docs/notation.md): every final
    sample of the rollout is noised again at `sigmas_per_sample` fresh sigmas and trained with flow matching
    (v_grpo draws its own pairs, `v_grpo:`, and reads sampler_decay, and the sigma sampler when not stratified)."""

    sigmas: str = "logit_normal"  # training sigmas: "logit_normal" or "uniform"
    sigma_mean: float = 0.0  # logit_normal: sigma = sigmoid(mean + std z)
    sigma_std: float = 1.0
    sigmas_per_sample: int = 1  # K: training sigmas (and noises) per final sample and iteration
    sampler_decay: float = 0.5  # the rollout's policy is a soft copy: theta_old <- d theta_old + (1 - d) theta after
                                # every iteration; 0 = on-policy (roll out with theta itself)
    beta: float = 1.0  # diffusion_nft: strength of the implicit positive / negative policies
    adv_clip: float = 2.0  # diffusion_nft: optimality probability r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)
    nft_weighting: str = "none"  # diffusion_nft: "none" (velocity MSE) or "adaptive" (the paper code's x0 loss)
    awm_weighting: str = "uniform"  # awm: w(sigma) of log p = -w ||v - u||^2: "uniform", "sigma" or "sigma2"

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.sigmas in SIGMA_SAMPLERS, "matching.sigmas", self.sigmas, f"one of {SIGMA_SAMPLERS}"),
            (math.isfinite(self.sigma_mean), "matching.sigma_mean", self.sigma_mean, "a finite number"),
            (0 < self.sigma_std < math.inf, "matching.sigma_std", self.sigma_std, "a finite number > 0"),
            (self.sigmas_per_sample >= 1, "matching.sigmas_per_sample", self.sigmas_per_sample, "an integer >= 1"),
            (0 <= self.sampler_decay < 1, "matching.sampler_decay", self.sampler_decay,
             "a number in [0, 1) (0 = on-policy)"),
            (0 < self.beta < math.inf, "matching.beta", self.beta, "a finite number > 0"),
            (0 < self.adv_clip < math.inf, "matching.adv_clip", self.adv_clip, "a finite number > 0"),
            (self.nft_weighting in NFT_WEIGHTINGS, "matching.nft_weighting", self.nft_weighting,
             f"one of {NFT_WEIGHTINGS}"),
            (self.awm_weighting in AWM_WEIGHTINGS, "matching.awm_weighting", self.awm_weighting,
             f"one of {AWM_WEIGHTINGS}"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class VGRPOConfig:
    """V-GRPO (objective: v_grpo; arXiv 2604.23380; docs/notation.md): the flow-matching loss of each final sample
    over `pairs` timestep-noise pairs as its log-likelihood, in GRPO's clipped loss (`clip_range`). Every stabiliser
    is an option; the defaults are the paper's."""

    pairs: int = 4  # M timestep-noise pairs per sample and update pass, all inside one ratio (the paper's 4)
    shared_pairs: bool = True  # the samples of a group share their M pairs (sigma and noise)
    stratified: bool = True  # pair m's sigma uniform in [m / M, (m + 1) / M); false: i.i.d. from matching.sigmas
    weighting: str = "adaptive"  # "adaptive": x0-space error over its detached mean absolute value; "none":
                                 # the velocity MSE
    adv_soft_clip: float = 3.0  # eta of the advantage soft-clip eta tanh(A / eta); 0 = off
    kl_old: float = 0.0  # weight of the KL to the old policy, mean ||x0_hat - x0_hat_old||^2; 0 = off

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.pairs >= 1, "v_grpo.pairs", self.pairs, "an integer >= 1"),
            (self.weighting in NFT_WEIGHTINGS, "v_grpo.weighting", self.weighting, f"one of {NFT_WEIGHTINGS}"),
            (0 <= self.adv_soft_clip < math.inf, "v_grpo.adv_soft_clip", self.adv_soft_clip,
             "a finite number >= 0 (0 = off)"),
            (0 <= self.kl_old < math.inf, "v_grpo.kl_old", self.kl_old, "a finite number >= 0 (0 = off)"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class TeacherConfig:
    """One frozen teacher of on-policy distillation (`distill.teachers`)."""

    path: str = ""  # a run directory (its final/, else its latest checkpoint), a checkpoint of a run, or an exported
                    # model directory (RUN/final, mixgrpo export --out) of the student's own model
    prompts: str = ""  # the prompts it teaches, a prompt source as rollout.prompts (file, world:SPLIT, NAME:SPLIT):
                       # the training prompts it holds are routed to this teacher; "" = every training prompt
    weight: float = 1.0  # weight of its KL term


@dataclass
class DistillConfig:
    """On-policy distillation (objective: opd; Flow-OPD, arXiv 2605.08063; docs/notation.md): the student rolls out
    on its own, and at every trained SDE step the KL between its Gaussian transition and each routed teacher's at the
    same state is minimised; a training prompt is routed to every teacher whose `prompts` hold it."""

    teachers: list[TeacherConfig] = field(default_factory=list)  # the frozen teachers, each with the prompts it teaches
    reward_weight: float = 0.0  # weight of GRPO's clipped loss on the rewards' advantages beside the KL; 0 = the
                                # teachers alone (the rewards are still scored and logged)

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [(0 <= self.reward_weight < math.inf, "distill.reward_weight", self.reward_weight,
                 "a finite number >= 0 (0 = the teachers alone)")] + [
            check for i, t in enumerate(self.teachers) for check in (
                (bool(t.path), f"distill.teachers[{i}].path", t.path,
                 "a run directory, a checkpoint of a run or an exported model directory"),
                (0 < t.weight < math.inf, f"distill.teachers[{i}].weight", t.weight, "a finite number > 0"))]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class ScoringConfig:
    """How the rewards are called: what a failed call costs (a reward that raises, times out or returns NaN/inf), and
    how the run talks to its reward servers (rewards with `server:`; docs/rewards.md)."""

    retries: int = option(2, was="reward_policy.retries", resumable=True)  # extra attempts per reward call before
                                                                           # the failure counts
    max_failed_groups: float = option(0.25, was="reward_policy.max_failed_groups", resumable=True)  # abort when more
                                                  # than this fraction of an iteration's groups fail
    server_timeout: float = option(120.0, was="reward_servers.timeout")  # seconds one /score request may take; then
                                                                         # it fails and is retried (retries)
    server_images: str = option("float32", was="reward_servers.images")  # how images travel: "float32" (exact:
                                                  # scores equal in-process ones bit for bit), "uint8" (4x smaller,
                                                  # quantised as a PNG would be) or "png"
    server_token_env: str = option("", was="reward_servers.token_env")  # environment variable holding the servers'
                                                                        # bearer token; "" = send none

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.retries >= 0, "scoring.retries", self.retries, "an integer >= 0 (0 = no retry)"),
            (0 <= self.max_failed_groups <= 1, "scoring.max_failed_groups", self.max_failed_groups,
             "a fraction in [0, 1] (0 = stop at the first failed group, 1 = never stop)"),
            (self.server_timeout > 0, "scoring.server_timeout", self.server_timeout, "a positive number of seconds"),
            (self.server_images in ("float32", "uint8", "png"), "scoring.server_images", self.server_images,
             "'float32', 'uint8' or 'png'"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class RolloutConfig:
    """What an iteration samples: P prompts x G images per rank, drawn from `prompts`."""

    prompts: str = option("world:train", was="train_prompts")  # a prompt file (txt/jsonl/csv) or world:SPLIT
    prompts_per_iteration: int = option(8, was="prompts_per_iteration")  # P, per rank
    group_size: int = option(8, was="group_size")  # G
    shared_noise: bool = option(True, was="shared_noise")  # one initial noise per group (paper: +0.18 ImageReward)
    guidance_scale: float = option(1.0, was="guidance_scale")  # classifier-free guidance in rollout and update; 1 = off
    chunks: int = option(1, was="rollout_chunks")  # the rollout runs in this many parts of whole groups; each part is
                                                   # decoded and scored while the next one rolls out (reward_overlap);
                                                   # 1 = one rollout, then the rewards
    reward_overlap: bool = option(True, was="reward_overlap")  # chunks > 1: score each part in a background thread
                                                               # during the rollout; false: score every part after the
                                                               # rollout (the same numbers, not overlapped)

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.prompts_per_iteration >= 1, "rollout.prompts_per_iteration", self.prompts_per_iteration,
             "an integer >= 1"),
            (self.group_size >= 2, "rollout.group_size", self.group_size,
             "an integer >= 2 (GRPO compares images within a group)"),
            (1 <= self.guidance_scale < math.inf, "rollout.guidance_scale", self.guidance_scale,
             "a finite number >= 1 (1 = no guidance)"),
            (1 <= self.chunks <= self.prompts_per_iteration, "rollout.chunks", self.chunks,
             f"an integer in [1, rollout.prompts_per_iteration = {self.prompts_per_iteration}] (each part holds "
             f"whole groups)"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class AdvantageConfig:
    """How the rewards of a group become advantages (`mixgrpo.grpo`)."""

    reward_mode: str = option("advantage", was="reward_mode")  # "advantage": normalise each reward then sum;
                                                               # "reward": sum then normalise
    std: str = option("group", was="advantage_std")  # normalise by the std of the "group" or the "global" batch
    clip: float = option(5.0, was="advantage_clip")  # advantages clipped to [-clip, clip]

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.reward_mode in ("advantage", "reward"), "advantage.reward_mode", self.reward_mode,
             "'advantage' or 'reward'"),
            (self.std in ("group", "global"), "advantage.std", self.std, "'group' or 'global'"),
            (0 < self.clip < math.inf, "advantage.clip", self.clip,
             "a positive finite number (advantages are clipped to [-clip, clip])"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class LossConfig:
    """The terms of the loss besides the objective's own (`objective:`, `matching:`, `v_grpo:`)."""

    clip_range: float = option(1e-4, was="clip_range")  # ratio clip of the objectives with a ratio (grpo, awm, v_grpo):
                                                        # ratios outside [1 - clip_range, 1 + clip_range] are clipped
    kl_beta: float = option(0.0, was="kl_beta")  # weight of the KL term to the frozen base model; 0 = none
    grpo_guard: bool = option(False, was="grpo_guard")  # GRPO-Guard (arXiv 2510.22319): re-centre the log importance
                                                        # ratio by the policy's drift so that the clip binds as
                                                        # intended, and weight steps by 1/|dt| (docs/notation.md);
                                                        # objectives with a ratio only

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (0 < self.clip_range < math.inf, "loss.clip_range", self.clip_range, "a positive finite number"),
            (0 <= self.kl_beta < math.inf, "loss.kl_beta", self.kl_beta, "a finite number >= 0"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class OptimConfig:
    """The optimizer (AdamW), its learning-rate schedule and the EMA of the trained weights."""

    lr: float = option(1e-4, was="lr")  # AdamW learning rate
    weight_decay: float = option(1e-4, was="weight_decay")  # AdamW weight decay
    betas: tuple[float, float] = option((0.9, 0.999), was="betas")  # AdamW betas
    grad_clip: float = option(1.0, was="grad_clip")  # gradient-norm clip per optimizer step; 0 = none
    warmup_iterations: int = option(0, was="warmup_iterations")  # linear learning-rate warm-up over this many
                                                                 # iterations
    ema_decay: float = option(0.0, was="ema_decay")  # 0 = no EMA; > 0: the held-out evaluations and final/ use the EMA
                                                     # weights (`mixgrpo export --no-ema` writes the trained ones from
                                                     # a checkpoint)

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (0 < self.lr < math.inf, "optim.lr", self.lr, "a positive finite number"),
            (0 <= self.weight_decay < math.inf, "optim.weight_decay", self.weight_decay, "a finite number >= 0"),
            (all(0 <= b < 1 for b in self.betas), "optim.betas", self.betas,
             "two numbers in [0, 1), e.g. [0.9, 0.999]"),
            (0 <= self.grad_clip < math.inf, "optim.grad_clip", self.grad_clip,
             "a finite number >= 0 (0 = no clipping)"),
            (self.warmup_iterations >= 0, "optim.warmup_iterations", self.warmup_iterations,
             "an integer >= 0 (0 = no warm-up)"),
            (0 <= self.ema_decay < 1, "optim.ema_decay", self.ema_decay, "a number in [0, 1)"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class UpdateConfig:
    """How an iteration's samples are trained on: passes, optimizer steps, and the memory of each step."""

    steps_per_epoch: int = option(2, was="updates_per_iteration")  # optimizer steps per pass over the iteration's
                                                                   # samples; each sees G / steps_per_epoch images of
                                                                   # every group
    epochs: int = option(1, was="update_epochs")  # passes over the iteration's samples, each of steps_per_epoch
                                                  # optimizer steps (forward-process objectives draw fresh training
                                                  # sigmas for every pass)
    micro_batch_size: int = option(32, was="micro_batch_size", compared=False)  # samples per forward/backward
                                                  # (memory only: the update does not depend on it)
    grad_checkpointing: bool = option(False, was="grad_checkpointing", compared=False)  # recompute the denoiser's
                                                  # activations in backward (less memory)

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.steps_per_epoch >= 1, "update.steps_per_epoch", self.steps_per_epoch, "an integer >= 1"),
            (self.epochs >= 1, "update.epochs", self.epochs, "an integer >= 1"),
            (self.micro_batch_size >= 1, "update.micro_batch_size", self.micro_batch_size, "an integer >= 1"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class EvalConfig:
    """The held-out evaluation: before and after training (and every `every` iterations), with the same noise."""

    prompts: str = option("world:heldout", was="eval_prompts")  # held-out prompts (the formats of rollout.prompts)
    num_prompts: int = option(64, was="eval_num_prompts")  # held-out prompts evaluated; 0 = no evaluation
    every: int = option(0, was="eval_every", compared=False)  # also evaluate every N iterations; 0 = before and after
                                                              # only
    images_per_prompt: int = option(1, was="eval_images_per_prompt")  # images per held-out prompt
    guidance_scale: float = option(-1.0, was="eval_guidance_scale")  # -1 = same as rollout.guidance_scale

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.num_prompts >= 0, "eval.num_prompts", self.num_prompts, "an integer >= 0 (0 = no evaluation)"),
            (self.every >= 0, "eval.every", self.every, "an integer >= 0 (0 = before and after training only)"),
            (self.images_per_prompt >= 1, "eval.images_per_prompt", self.images_per_prompt, "an integer >= 1"),
            (self.guidance_scale == -1 or 1 <= self.guidance_scale < math.inf, "eval.guidance_scale",
             self.guidance_scale, "-1 (the same as rollout.guidance_scale) or a finite number >= 1 (1 = no guidance)"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class RunConfig:
    """The run as a job: its length, seed, numeric precision, directory, checkpoints and logging."""

    iterations: int = option(60, was="iterations", resumable=True)  # rollout + update rounds
    time_limit_minutes: float = option(0.0, was="time_limit_minutes", resumable=True)  # > 0: end (checkpoint,
                                                  # evaluate, export) after the iteration that reaches this many
                                                  # minutes of training in this launch; 0 = no limit
    seed: int = option(0, was="seed", compared=False)  # every random draw of the run derives from it (prompts,
                                                  # noise, trained steps)
    deterministic: bool = option(False, was="deterministic", resumable=True)  # deterministic GPU kernels: two runs
                                                  # of a config on one GPU are bit-equal (slower;
                                                  # docs/reproducibility.md); CPU runs are bit-equal without it
    precision: str = option("auto", was="precision", resumable=True)  # "bf16" (autocast; fp32 master weights),
                                                  # "fp32", or "auto": bf16 where the hardware multiplies bf16
                                                  # matrices (CPU with AMX, CUDA >= 8.0), else fp32 (mixgrpo.dtypes);
                                                  # a resume may change it (auto resolves by the machine)
    out_dir: str = option("runs/mixgrpo", was="out_dir", resumable=True)  # the run directory
    checkpoint_every: int = option(20, was="checkpoint_every", resumable=True)  # iterations between checkpoints
                                                  # (the last iteration is always checkpointed)
    keep_checkpoints: int = option(2, was="keep_checkpoints", resumable=True)  # complete checkpoints kept; older
                                                  # ones are deleted
    tensorboard: bool = option(True, was="tensorboard", resumable=True)  # event files in OUT/tensorboard (the
                                                  # package is in the tiny and models extras; the pre-flight names
                                                  # the pip command when it is missing)
    wandb_project: str = option("", was="wandb_project", resumable=True)  # log to this Weights & Biases project
                                                  # (needs the wandb package); "" = off
    profile: bool = option(False, was="profile", compared=False)  # count model calls and time spent inside them
                                                  # (metrics model_calls/*, time/model_*)

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of every field (`mixgrpo.errors.check_values`)."""
        return [
            (self.iterations >= 1, "run.iterations", self.iterations, "an integer >= 1"),
            (self.time_limit_minutes >= 0, "run.time_limit_minutes", self.time_limit_minutes,
             "a number >= 0 (0 = no limit)"),
            (self.seed >= 0, "run.seed", self.seed, "an integer >= 0"),
            (self.precision in PRECISIONS, "run.precision", self.precision, "'auto', 'fp32' or 'bf16'"),
            (bool(self.out_dir.strip()), "run.out_dir", self.out_dir,
             "a directory path (an empty one is an unset shell variable?)"),
            (self.checkpoint_every >= 1, "run.checkpoint_every", self.checkpoint_every, "an integer >= 1"),
            (self.keep_checkpoints >= 1, "run.keep_checkpoints", self.keep_checkpoints, "an integer >= 1"),
        ]

    def __post_init__(self):
        check_values(self.checks())


@dataclass
class TrainConfig:
    """A training run. `algorithm` and `sampler` decide the rollout's steps, `objective` (with `matching`, `v_grpo` or
    `distill`) what is trained on them; the other sections are shared by every objective."""

    algorithm: str = "mixgrpo"  # sampler preset: a key of mixgrpo.plan.ALGORITHMS
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objective: str = "grpo"  # one of OBJECTIVES: what the rollout trains
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    v_grpo: VGRPOConfig = field(default_factory=VGRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    scoring: ScoringConfig = settings(ScoringConfig)
    rollout: RolloutConfig = settings(RolloutConfig)
    advantage: AdvantageConfig = settings(AdvantageConfig)
    loss: LossConfig = settings(LossConfig)
    optim: OptimConfig = settings(OptimConfig)
    update: UpdateConfig = settings(UpdateConfig)
    eval: EvalConfig = settings(EvalConfig)
    run: RunConfig = settings(RunConfig)
    parallel: ParallelConfig = option(factory=ParallelConfig, resumable=True)

    @property
    def eval_guidance(self) -> float:
        """The guidance scale of held-out evaluations: eval.guidance_scale, or rollout.guidance_scale when it is -1."""
        return self.rollout.guidance_scale if self.eval.guidance_scale < 0 else self.eval.guidance_scale

    def checks(self) -> list[tuple[bool, str, Any, str]]:
        """(ok, field, value, what to use) of the top-level, lora, rewards and parallel fields
        (`mixgrpo.errors.check_values`); the other sections check their own. Written so that NaN fails (floats are
        finite already: `_convert` refuses NaN and inf)."""
        checks = [
            (self.algorithm in ALGORITHMS, "algorithm", f"one of {sorted(ALGORITHMS)}"),
            (self.objective in OBJECTIVES, "objective", f"one of {tuple(OBJECTIVES)}"),
            (len(self.rewards) >= 1, "rewards", "a list with at least one reward"),
            (self.lora.rank >= 0, "lora.rank", "an integer >= 0 (0 = full fine-tuning)"),
            (self.lora.alpha >= 0, "lora.alpha", "a number >= 0 (0 = the same as lora.rank)"),
            (self.parallel.strategy in ("ddp", "fsdp"), "parallel.strategy", "'ddp' or 'fsdp'"),
            (self.parallel.param_dtype in ("fp32", "bf16"), "parallel.param_dtype", "'fp32' or 'bf16'"),
            (self.parallel.reduce_dtype in ("fp32", "bf16"), "parallel.reduce_dtype", "'fp32' or 'bf16'"),
            (self.parallel.checkpoint_format in ("full", "sharded"), "parallel.checkpoint_format",
             "'full' or 'sharded'"),
            (self.parallel.rewards_on in ("every_rank", "rank0"), "parallel.rewards_on", "'every_rank' or 'rank0'"),
        ]
        return [(ok, name, getattr_path(self, name), want) for ok, name, want in checks] + [
            (math.isfinite(r.weight), f"rewards[{i}].weight", r.weight, "a finite number (0 = logged only)")
            for i, r in enumerate(self.rewards)]

    def __post_init__(self):
        check_values(self.checks())
        for i, reward in enumerate(self.rewards):
            for url in reward.servers:
                if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", url):
                    raise ConfigError(f"rewards[{i}].server = {url!r} is invalid: use a URL such as "
                                      f"http://127.0.0.1:8601 (a reward server of mixgrpo serve-rewards)")
        self._check_parallel()
        self._check_objective()
        steps, group = self.update.steps_per_epoch, self.rollout.group_size
        if group % steps:
            raise ConfigError(
                f"rollout.group_size = {group} is not a multiple of update.steps_per_epoch = {steps}: every optimizer "
                f"step takes the same share of each group; choose update.steps_per_epoch among "
                f"{[d for d in range(1, group + 1) if group % d == 0]}")

    def _check_parallel(self) -> None:
        """The settings that ranks, sharding and the reward threads do not support together."""
        if self.rollout.chunks > 1 and self.rollout.reward_overlap and self.parallel.rewards_on == "rank0":
            raise ConfigError("rollout.reward_overlap with parallel.rewards_on 'rank0' would gather images across "
                              "ranks from a background thread: use rewards_on 'every_rank' (or a reward server), or "
                              "rollout.reward_overlap: false")
        if self.parallel.strategy == "ddp" and (self.parallel.param_dtype, self.parallel.reduce_dtype) != ("fp32",) * 2:
            raise ConfigError("parallel.param_dtype / reduce_dtype apply to parallel.strategy 'fsdp' only: with 'ddp' "
                              "use run.precision: bf16 for bf16 compute, or set parallel.strategy: fsdp")
        if self.parallel.strategy == "fsdp" and (self.loss.kl_beta > 0 or self.optim.ema_decay > 0):
            raise ConfigError("loss.kl_beta > 0 and optim.ema_decay > 0 are not supported with parallel.strategy "
                              "'fsdp' yet (the reference and EMA copies are not sharded): use strategy 'ddp', or set "
                              "them to 0")

    def _check_objective(self) -> None:
        """What the objective needs of the plan and the rollout (it says so itself: `mixgrpo.objectives`)."""
        objective = OBJECTIVES.get(self.objective)
        if self.loss.grpo_guard and not objective.supports_guard:
            with_guard = " / ".join(repr(n) for n in OBJECTIVES if OBJECTIVES.get(n).supports_guard)
            raise ConfigError(f"loss.grpo_guard re-centres the ratio of a Gaussian density with one std per sample, "
                              f"which objective {self.objective!r} does not clip: use objective {with_guard}, or "
                              f"loss.grpo_guard: false")
        if objective.distills != bool(self.distill.teachers):
            distilling = " / ".join(repr(n) for n in OBJECTIVES if OBJECTIVES.get(n).distills)
            raise ConfigError(f"objective {self.objective!r} distills frozen teachers: give distill.teachers (each a "
                              f"run directory or exported model, with the prompts it teaches)" if objective.distills
                              else f"distill.teachers are read by objective {distilling} only: set objective: "
                                   f"{distilling}, or remove distill.teachers")
        if objective.stores_transitions and self.sampler.train_steps == "none":
            final_samples = " / ".join(repr(n) for n in OBJECTIVES if not OBJECTIVES.get(n).stores_transitions)
            raise ConfigError(f"algorithm {self.algorithm!r} trains no step (sampler.train_steps = 'none'), so GRPO "
                              f"has nothing to re-score: use a GRPO algorithm, or objective {final_samples}, which "
                              f"train on the final samples of any plan")
        if not objective.stores_transitions:
            if self.sampler.sde_steps == "none" and self.rollout.shared_noise:
                raise ConfigError(f"rollout.shared_noise with a deterministic plan (sampler.sde_steps = 'none') makes "
                                  f"the {self.rollout.group_size} images of a group identical, so no group has a "
                                  f"preference: set rollout.shared_noise: false, or use a plan with SDE steps")
            if self.parallel.strategy == "fsdp" and self.matching.sampler_decay > 0:
                raise ConfigError("matching.sampler_decay > 0 is not supported with parallel.strategy 'fsdp' yet (the "
                                  "sampling copy is not sharded): use strategy 'ddp', or sampler_decay: 0")


def getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _settings() -> dict[str, dataclasses.Field]:
    """Dotted key -> field of every setting: the fields of the `settings` sections (rollout, optim, run, ...) one by
    one, the other top-level fields (sampler, model, parallel, ...) as a whole."""
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("settings"):
            out.update({f"{f.name}.{g.name}": g for g in dataclasses.fields(hints[f.name])})
        else:
            out[f.name] = f
    return out


CONFIG_FIELDS: dict[str, dataclasses.Field] = _settings()
"""Every setting of TrainConfig with its facts (`option`), by dotted key."""

MOVED_KEYS: dict[str, str] = {f.metadata["was"]: key for key, f in CONFIG_FIELDS.items()
                              if f.metadata.get("was", key) not in ("", key)}
"""Old key -> new key of every setting that moved into a section."""

RESUMABLE_CHANGES: tuple[str, ...] = tuple(key for key, f in CONFIG_FIELDS.items() if f.metadata.get("resumable"))
"""The settings a resume may change (`option`'s resumable)."""

REFERENCE_IGNORED: tuple[str, ...] = tuple(key for key, f in CONFIG_FIELDS.items()
                                           if not f.metadata.get("compared", True))
"""The settings a comparison with a recipe's reference leaves out (`option`'s compared)."""


# --------------------------------------------------------------------------------------------------
# dict -> dataclass with type checking


_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")
"""Numbers in exponent form that PyYAML leaves as strings (no dot: 1e-4, 3E5)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert a YAML value to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value.strip()):
            value = float(value)  # PyYAML (YAML 1.1) reads "1e-4" as a string: it needs a dot, "1.0e-4"
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)  # NaN and inf are never a setting (0 or -1 mean "off" where a field has an off)
        raise ConfigError(f"{where} must be a {'finite ' * isinstance(value, float)}number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else str(key)
        if key not in names:
            # at the top: a setting's name in its section (num_prompts -> eval.num_prompts) or a misspelt old key
            within = {k.rpartition(".")[2]: k for k in MOVED_KEYS.values()} | MOVED_KEYS if cls is TrainConfig else {}
            close = difflib.get_close_matches(str(key), [*names, *within], n=1)
            hint = (f"; did you mean {within.get(close[0], close[0])!r}?" if close
                    else f"; valid keys: {', '.join(names)}")
            raise ConfigError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _convert(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key.sub: old -> new' for every leaf that differs between two config fingerprints. A key the old one
    lacks is a field added by a newer mixgrpo (its default keeps the old behaviour), a key the new one lacks a
    field it removed (it did nothing): neither is a difference, in lists of the same length (rewards) too."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str) if k in old and k in new
                for d in config_diff(old[k], new[k], f"{prefix}{k}.")]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in config_diff(a, b, f"{prefix.rstrip('.')}[{i}].")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


# --------------------------------------------------------------------------------------------------
# files and overrides


def recipes() -> dict[str, Path]:
    """The shipped recipes, name -> file: configs/*.yaml, which a wheel installs as the package data of
    `mixgrpo.configs` (pyproject.toml); a checkout without a fresh install has them beside the package."""
    from importlib.resources import files

    try:
        shipped = files("mixgrpo.configs")
    except ModuleNotFoundError:
        shipped = Path(__file__).resolve().parent.parent / "configs"
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in shipped.iterdir() if p.name.endswith(".yaml")}


def recipe_path(config: str | Path) -> Path:
    """The YAML file of `config`: a path as given (an existing file, or anything with a directory or a .yaml
    suffix), else the shipped recipe of that name ("mixgrpo" -> configs/mixgrpo.yaml)."""
    path = Path(config)
    if path.is_file() or len(path.parts) > 1 or path.suffix:
        return path
    known = recipes()
    if str(config) not in known:
        close = difflib.get_close_matches(str(config), list(known), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"config {str(config)!r} is neither a file nor a shipped recipe: {hint}give a YAML path "
                          f"or one of {sorted(known)}")
    return known[str(config)]


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: check the path (recipes live in configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text: save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


_INDEXED = re.compile(r"(\w+)\[(\d+)\]")
"""An override key's part that names an element of a list: rewards[0]."""


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `key.sub=value` override in place; the value is parsed as YAML ("3" -> 3, "[a, b]"). A part
    `name[i]` steps into element i of a list: rewards[0].args.path=/data/hps.pt."""
    key, value = parse_pair(override, "override", "key.sub=value")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        indexed = _INDEXED.fullmatch(part)
        name = indexed.group(1) if indexed else part
        if indexed:
            items = node.get(name)
            index = int(indexed.group(2))
            if not isinstance(items, list) or index >= len(items):
                what = f"has {len(items)} elements" if isinstance(items, list) else "is not a list"
                raise ConfigError(f"override {override!r}: {name!r} {what} in this config: index one it has, or give "
                                  f"the whole list ({name}='[...]')")
            if i == len(parts) - 1:
                items[index] = value
                return
            child = items[index]
        elif i == len(parts) - 1:
            node[name] = value
            return
        else:
            child = node.get(name)
            if child is None:
                child = node[name] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


REMOVED_KEYS = {
    "image_size": (0, "it was never read; the resolution is model.args.height and width (flux, sd3), and the tiny "
                      "model's is fixed by its checkpoint"),
}
"""Top-level keys that older versions accepted, with the value they wrote into every run's config.yaml (dropped
silently, so old runs still resume and sample) and why any other value is refused."""


def _pop(data: dict[str, Any], key: str) -> tuple[bool, Any]:
    """Remove dotted `key` from a nested mapping: (whether it was there, its value); a section it empties goes too."""
    section, _, leaf = key.rpartition(".")
    node = data.get(section) if section else data
    if not isinstance(node, dict) or leaf not in node:
        return False, None
    value = node.pop(leaf)
    if section and not node:
        del data[section]
    return True, value


def without_keys(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """A copy of a config mapping without the settings or sections `keys` (dotted: "run.seed", "parallel")."""
    data = copy.deepcopy(data)
    for key in keys:
        _pop(data, key)
    return data


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A config mapping written by any mixgrpo version, in today's layout: every key of MOVED_KEYS moved to its
    section (`lr` -> `optim.lr`). For what a run directory or a checkpoint stored (config.yaml, a fingerprint, a
    reference), never for a user's recipe or overrides, which name today's keys (`refuse_moved`)."""
    data = copy.deepcopy(data)
    for old, new in MOVED_KEYS.items():
        found, value = _pop(data, old)
        if found:
            section, leaf = new.split(".")
            data.setdefault(section, {}).setdefault(leaf, value)
    return data


def refuse_moved(data: dict[str, Any]) -> None:
    """ConfigError for the first key of a recipe or override that moved into a section, naming where it is now."""
    for key in data:
        moved = {old: new for old, new in MOVED_KEYS.items() if old == key or old.startswith(f"{key}.")}
        if key in moved:
            raise ConfigError(f"config key {key!r} moved to {moved[key]!r}: write it as {moved[key]} (the config "
                              f"is in sections now: docs/config.md)")
        if moved:
            keys = ", ".join(f"{old} -> {new}" for old, new in moved.items())
            raise ConfigError(f"config section {key!r} moved: its keys are now {keys} (docs/config.md)")


def _base_path(base: Any, child: Path) -> Path:
    """The file of a recipe's `base:`: a shipped recipe by name, or a path relative to the recipe's own file."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {str(child)!r}: base must be a recipe name or a YAML path, got {base!r}")
    path = Path(base).expanduser()
    if len(path.parts) == 1 and not path.suffix:
        known = recipes()
        if base not in known:
            close = difflib.get_close_matches(base, list(known), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"config file {str(child)!r}: base {base!r} is not a shipped recipe: {hint}give one of "
                              f"{sorted(known)} or a YAML path relative to the file")
        return known[base]
    path = path if path.is_absolute() else child.parent / path
    if not path.is_file():
        raise ConfigError(f"config file {str(child)!r}: base {base!r} does not exist ({path}): give a YAML path "
                          f"relative to the file, or a shipped recipe's name")
    return path


def read_recipe(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's mapping with its `base:` merged in, recursively: the base's keys, then the recipe's on top (mappings
    merged key by key, lists and values replaced). `sampler:` keys refine the `algorithm` preset, so a recipe that
    names another algorithm than its base does not inherit the base's sampler keys."""
    path = Path(path)
    data = read_yaml(path)
    if "base" not in data:
        return data
    base_path = _base_path(data.pop("base"), path)
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in (*chain, base_path.resolve()))
        raise ConfigError(f"config file {str(path)!r}: its bases make a cycle ({cycle}): remove one base")
    parent = read_recipe(base_path, chain)
    algorithm = parent.get("algorithm", TrainConfig.algorithm)
    if data.get("algorithm", algorithm) != algorithm:
        parent.pop("sampler", None)
    return _deep_merge(parent, data)


def build_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a raw mapping in today's layout (`migrate` converts an older one): the algorithm preset,
    then `sampler` overrides on top."""
    data = dict(data)
    for key, (written, why) in REMOVED_KEYS.items():
        if key in data:
            if data.pop(key) != written:
                raise ConfigError(f"config key {key!r} was removed: {why}; delete it")
    refuse_moved(data)
    algorithm = data.get("algorithm", TrainConfig.algorithm)
    if algorithm not in ALGORITHMS:
        close = difflib.get_close_matches(str(algorithm), list(ALGORITHMS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"algorithm {algorithm!r} is unknown{hint}; choose one of {sorted(ALGORITHMS)}")
    sampler = data.get("sampler") or {}
    if not isinstance(sampler, dict):
        raise ConfigError(f"sampler must be a mapping of SamplerConfig fields, got {sampler!r}")
    data["sampler"] = _deep_merge(to_dict(ALGORITHMS[algorithm]), sampler)
    return from_dict(TrainConfig, data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                saved: bool = False) -> TrainConfig:
    """The TrainConfig of a recipe file (with its `base:` chain) and `key.sub=value` overrides. saved: the file is a
    run directory's config.yaml, written by any mixgrpo version (`migrate`); the overrides name today's keys."""
    data = (migrate(read_yaml(path)) if saved else read_recipe(path)) if path else {}
    for override in overrides:
        apply_override(data, override)
    return build_config(data)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the config as YAML, atomically (a kill mid-write leaves the previous file, which --resume reads)."""
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
