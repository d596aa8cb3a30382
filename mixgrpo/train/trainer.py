"""The trainer: one rollout and one update per iteration, for every algorithm and objective.

Flow-GRPO, DanceGRPO, MixGRPO, MixGRPO-Flash and Flash* differ only in their step plan (`mixgrpo.plan`): which
steps are SDE, ODE or DPM-Solver++, and which are trained. Each iteration (`Trainer.iteration`):

1. plan        build_plan(sampler, iteration, seed): the window position is a pure function of both
2. rollout     P prompts x G images, shared initial noise per group, old log-probs from the rollout itself; in
               `rollout.chunks` chunks of whole groups, each decoded and handed to the rewards when it is done
3. rewards     scored on the decoded images under the failure policy (`mixgrpo.rewards.scoring`), in-process or by
               reward servers; with `rollout.reward_overlap`, in the background while the next chunk rolls out
               (`mixgrpo.train.overlap`), so the update waits only for what is missing
4. advantages  the rewards fused into group-normalised advantages; failed groups get 0
5. update      the objective (`mixgrpo.objectives`): GRPO re-scores the stored transitions under the
               clipped policy loss; on-policy distillation pulls them toward frozen teachers' transitions;
               DiffusionNFT / AWM / V-GRPO train on the final samples. `update.steps_per_epoch`
               optimizer steps per pass; step u sees the u-th share of every group
6. log         one line of metrics.jsonl; a checkpoint every `run.checkpoint_every` iterations

Image-conditioned models (editing, image-to-video): a prompt is an example (instruction, input images,
`mixgrpo.prompts.Example`); the images are encoded into the conditioning with the text, CFG's unconditional rows are
the empty prompt with each example's own images, a group is G images of one example, and the rewards that compare a
result with its input (`takes_inputs`) get it.

All randomness derives from (seed, iteration, global prompt index) (`mixgrpo.seeding`), so a resumed run
reproduces the uninterrupted one and the result does not depend on how prompts are spread over ranks.

Simplifications: the frozen reference for the KL term and the EMA hold copies of the trainable weights only
(the rest of the model is shared), and are evaluated with `torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from mixgrpo import dist, memory
from mixgrpo.checkpoint import latest_checkpoint, read_state
from mixgrpo.config import TrainConfig, build_config, to_dict
from mixgrpo.dtypes import CpuAttentionBackward, deterministic_kernels, model_precision, resolve_precision
from mixgrpo.evaluate import evaluate, save_sample_grid
from mixgrpo.export import export_model, load_export, run_of
from mixgrpo.images import first_inputs, load_inputs, media_name
from mixgrpo.loading import ModelLoader, NoTextEncoder
from mixgrpo.models import Cond, FlowModel, cond_expand, cond_index, cond_repeat_interleave, cond_to
from mixgrpo.models.base import blank_inputs, build_model, encode_examples, guided_velocity, uncond_rows
from mixgrpo.models.text import take_truncations, truncation_lines
from mixgrpo.objectives import OBJECTIVES, Objective, Policy, Samples, Teacher, micro_batches
from mixgrpo.pipeline_grid import grid_of
from mixgrpo.plan import Plan, build_plan, ode_plan
from mixgrpo.preflight import check_run
from mixgrpo.progress import PhaseProgress
from mixgrpo.prompts import Example, read_examples, read_prompts
from mixgrpo.reference import end_of_run_line
from mixgrpo.rewards.scoring import RewardSet, score_metrics
from mixgrpo.rollout import Trajectory, rollout
from mixgrpo.runfiles import resolve_paths
from mixgrpo.rundir import FINAL, RunRecords, claim
from mixgrpo.seeding import group_seeds, held_out_seed, prompt_indices, reward_seeds, sample_seeds, update_shares
from mixgrpo.tracking import Trackers, resource_metrics
from mixgrpo.train.control import (ModelClock, Stopwatch, StopRequest, TimeLimit, TrainingError, agreed_stops,
                                   any_rank, require_agreeing_replicas, require_finite_images, require_finite_weights,
                                   require_learning_signal, stop_signalled, warn_without_signal)
from mixgrpo.train.overlap import ChunkScoring, chunk_bounds
from mixgrpo.train.report import progress_line, write_curves, write_summary
from mixgrpo.train.state import TrainState, check_resumable, fingerprint
from mixgrpo.train.update import UpdateLoop, UpdateStats
from mixgrpo.train.weights import EMA, model_with, shadow_of, swapped_weights, trainable_parameters


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run training; returns the run directory. `stop_after` ends early after that many iterations of this call
    (tests use it to simulate an interruption). The run directory is locked for the whole run
    (`mixgrpo.rundir.claim`): a second process on it stops at once."""
    dist.init()
    cfg = build_config(resolve_paths(to_dict(cfg)))  # absolute paths: config.yaml names the files from anywhere
    check_run(cfg)  # everything the run needs (devices, rewards, prompts, embedding cache), before the run
    memory.report(cfg, dist.world_size())
    # bf16 attention on CPU trains through matrix products (mixgrpo.dtypes); checkpointing's recomputation would not
    attention = contextlib.nullcontext() if cfg.update.grad_checkpointing else CpuAttentionBackward()
    # the run directory is claimed before any model loads
    with claim(cfg.run.out_dir, resume), attention, deterministic_kernels(cfg.run.deterministic):
        trainer = Trainer(cfg, resume)
        try:
            return trainer.run(progress, stop_after)
        finally:
            trainer.scoring.close()


EVAL_PENDING = "eval_pending"
"""state.json of a checkpoint whose periodic evaluation a stop cut short: the resume evaluates first."""


@dataclass
class Groups:
    """This rank's prompts of one iteration: P prompts, their conditioning and CFG's empty prompt ([P, ...]),
    the index of its first prompt among every rank's, and (image-conditioned models) each example's first input
    image [P, 3, H, W] at the decoded images' size, for the rewards that compare with it."""

    prompts: list[str]
    cond: Cond
    uncond: Cond | None
    first: int
    inputs: torch.Tensor | None = None


class Trainer:
    """A training run from its config: the model, its weights and copies, the rewards, the objective and the run
    directory, resumed from the latest checkpoint when `resume` is set; `run` trains it to the end."""

    def __init__(self, cfg: TrainConfig, resume: bool):
        self.cfg, self.device, self.run_dir = cfg, dist.device(), Path(cfg.run.out_dir)
        # The setup, in this order (each step's docstring says what it must follow):
        latest = self._check_resume(resume)
        base = self._build_model()
        self._load_rewards_and_prompts()
        optimizer = self._build_optimizer()
        self._build_objective(base)
        self._restore(latest, optimizer)
        self._open_records()
        self.clock = ModelClock(self.model, sync=self.device.type == "cuda") if cfg.run.profile else None
        self.phases = PhaseProgress(self.model)  # bars inside an iteration that takes long (rank 0)
        self.loop = UpdateLoop(self.params, optimizer, cfg.update.micro_batch_size, cfg.optim.grad_clip, self.ema,
                               self.clock)
        self.held_out: dict[str, float] = {}  # the latest held-out evaluation, for the progress line
        # held-out evaluations on the model's own pipeline grid (a real model), else the training grid's ODE plan
        grid = grid_of(cfg.model.name, cfg.model.args)
        self.eval_plan = grid.plan() if grid is not None else ode_plan(cfg.sampler.num_steps, cfg.sampler.shift)
        if grid is not None and self.eval_prompts:
            dist.print0(f"held-out evaluation: {grid.describe()} (training: {cfg.sampler.num_steps} steps, shift "
                        f"{cfg.sampler.shift:g})")

    def _check_resume(self, resume: bool) -> Path | None:
        """First, before any model loads: the checkpoint to resume from, checked against the config (a checkpoint of
        another config is named as such, not as a weight-shape error); the precision "auto" resolves to."""
        # "auto" resolves by this machine (bf16 where it multiplies bf16 matrices); logged in every metrics record
        self.precision, self.precision_why = resolve_precision(self.cfg.run.precision, self.device)
        latest = latest_checkpoint(self.run_dir) if resume else None
        self.identity = fingerprint(self.cfg)  # computed once: it reads the run's files
        if latest is not None:
            check_resumable(latest, read_state(latest), self.identity, self.run_dir)
        return latest

    def _build_model(self) -> dict[str, torch.Tensor] | None:
        """The model, seeded first (LoRA's initial draw), and its trainable parameters. Returns the frozen base weights
        of the KL term (None without one), cloned before FSDP wraps the model, since the wrap replaces the parameters
        by their shards; the parameters are read again after the wrap."""
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model.name, cfg.model.args).to(self.device)
        params = trainable_parameters(model, cfg.model.name, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules,
                                      cfg.update.grad_checkpointing)
        base = {n: p.detach().clone() for n, p in params.items()} if cfg.loss.kl_beta > 0 else None
        self.model = dist.wrap_model(model, cfg.parallel)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        return base

    def _load_rewards_and_prompts(self) -> None:
        cfg = self.cfg
        self.rewards = RewardSet(cfg.rewards, cfg.scoring.retries, cfg.parallel.rewards_on == "rank0",
                                 cfg.scoring)
        self.scoring = ChunkScoring(self.rewards, cfg.rollout.group_size,
                                    cfg.rollout.reward_overlap and cfg.rollout.chunks > 1)
        self.train_examples = read_examples(cfg.rollout.prompts)
        self.eval_examples = read_examples(cfg.eval.prompts)[: cfg.eval.num_prompts]
        self.train_prompts = [e.prompt for e in self.train_examples]
        self.eval_prompts = [e.prompt for e in self.eval_examples]
        # the size input images are given at: the model's own (an image of another size is resized, `load_input`)
        self.input_size = self.model.image_size() if getattr(self.model, "image_inputs", 0) else None
        self.eval_inputs = self.inputs_of(self.eval_examples)

    def inputs_of(self, examples: list[Example]) -> list[tuple[torch.Tensor, ...]] | None:
        """The input images of `examples` at the model's size (`FlowModel.encode_prompts`), None without any."""
        if self.input_size is None:
            return None
        return load_inputs(examples, self.input_size)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """After the wrap (they hold the wrapped parameters): AdamW, the warm-up schedule and the EMA copy."""
        cfg = self.cfg
        optimizer = torch.optim.AdamW(self.params.values(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay)
        warmup = max(cfg.optim.warmup_iterations, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / (warmup + 1)))
        self.ema = EMA(self.params, cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
        return optimizer

    def _build_objective(self, base: dict[str, torch.Tensor] | None) -> None:
        """After the precision and the wrap: CFG's empty prompt ([1, ...]; an image-conditioned model's is per example,
        `groups`); whether the rollout's log-probs are the update's (`layouts_agree`, which needs the precision, the
        wrapped model and that row); the objective and the sampling copy it asks for (of the wrapped parameters)."""
        cfg = self.cfg
        guided = cfg.rollout.guidance_scale != 1.0
        self.uncond_row = cond_to(encode_examples(self.model, [""], blank_inputs(self.model, 1)), self.device) \
            if guided else None
        # GRPO's old log-probs are the rollout's only if a row's velocity does not depend on the batch it is in
        objective = OBJECTIVES.get(cfg.objective)
        self.rescore_old = objective.stores_transitions and not layouts_agree(self.model, cfg, self.autocast,
                                                                              self.uncond_row, self.device)
        dist.print0(f"precision: {self.precision} ({self.precision_why})" + (
            "; old log-probs re-scored in the update's micro-batches (this machine's kernels depend on the batch "
            "size)" if self.rescore_old else ""))
        # the objective samples through `sampling`, which reads self.sampler when called (after it is set below)
        policy = Policy(self.model, model_with(self.model, base), self.autocast,
                        sampling=lambda: swapped_weights(self.model, shadow_of(self.sampler)),
                        teachers=load_teachers(cfg, self.device))
        self.objective: Objective = objective.from_config(cfg, policy, self.rescore_old)
        # the weights the rollout samples from: a soft copy of the live ones (forward-process objectives), or None
        decay = self.objective.sampler_decay
        self.sampler = EMA(self.params, decay) if decay > 0 else None

    def _restore(self, latest: Path | None, optimizer: torch.optim.Optimizer) -> None:
        """After every copy (EMA, sampling copy) exists, since a checkpoint restores them: the state, resumed."""
        copies = {name: c for name, c in (("ema", self.ema), ("sampler", self.sampler)) if c is not None}
        self.state = TrainState(self.model, optimizer, self.scheduler, copies)
        self.start, self.eval_pending = 0, False
        if latest is not None:
            restored = self.state.restore(latest, self.params)
            # a stop that cut the checkpoint's periodic evaluation short leaves it to the resume
            self.start, self.eval_pending = restored["iteration"], bool(restored.get(EVAL_PENDING))
            dist.print0(f"resumed from {latest} at iteration {self.start}")

    def _open_records(self) -> None:
        """After the restore (the records are cut to its iteration): the run directory's records and the trackers,
        which write nothing off rank 0."""
        self.records = RunRecords(self.run_dir, self.cfg, self.start)
        self.tracker = Trackers(self.run_dir, to_dict(self.cfg), self.cfg.run.tensorboard, self.cfg.run.wandb_project)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context of every model call of the run (rollout, update, evaluation) in its resolved precision."""
        return model_precision(self.device, self.precision)

    # ----------------------------------------------------------------------------------------------
    # one iteration

    def iteration(self, it: int, stop: StopRequest | None = None) -> dict[str, Any] | None:
        """One iteration of the algorithm (module docstring); returns its metrics record, or None when `stop` was
        signalled before the update (during the rollout and its rewards, which overlap): nothing of the iteration
        is kept, the weights are those after iteration `it`."""
        cfg, watch = self.cfg, Stopwatch()
        plan = build_plan(cfg.sampler, it, cfg.run.seed)
        groups = self.groups(it)
        chunks = len(chunk_bounds(len(groups.prompts), cfg.rollout.chunks))
        with self.phases.phase(f"it {it + 1} rollout", total=plan.nfe * chunks):
            traj = self.rollout(plan, groups, it)  # each chunk's images go to self.scoring as soon as it is done
        watch.lap("rollout")
        with self.phases.phase(f"it {it + 1} scoring", total=chunks, unit="chunk"):
            scores, failed, failed_all, scoring_seconds = self.score(it)
        advantages = self.rewards.advantages(scores, failed, cfg.advantage.reward_mode, cfg.advantage.std,
                                             cfg.advantage.clip)
        watch.lap("reward")
        if stop_signalled(stop):
            return None
        with self.phases.phase(f"it {it + 1} update"):
            stats = self.update(plan, traj, advantages, groups, it)
        watch.lap("update")
        record = self.log(it, plan, traj, scores, failed_all, advantages, stats, watch)
        # reward time in total (hidden behind the rollout or not), and the part the iteration waited for
        record.update({"time/reward_total": scoring_seconds, "time/reward_exposed": watch.laps["reward"]})
        served = self.rewards.served()
        if served:  # which reward server scored how many of this rank's images
            record["reward_servers"] = served
        return record

    def groups(self, it: int) -> Groups:
        """This rank's slice of the iteration's prompts (the same global order at any world size)."""
        P, rank = self.cfg.rollout.prompts_per_iteration, dist.rank()
        drawn = prompt_indices(it, len(self.train_prompts), P * dist.world_size(), self.cfg.run.seed)
        examples = [self.train_examples[i] for i in drawn[rank * P:(rank + 1) * P]]
        prompts = [e.prompt for e in examples]
        images = self.inputs_of(examples)
        cond = cond_to(encode_examples(self.model, prompts, images), self.device)
        uncond = None if self.uncond_row is None else cond_to(uncond_rows(self.model, P, images, self.uncond_row),
                                                              self.device)
        return Groups(prompts, cond, uncond, first=rank * P, inputs=None if images is None else first_inputs(
            images, self.input_size))

    def rollout(self, plan: Plan, groups: Groups, it: int) -> Trajectory:
        """G images per prompt along `plan`, with the weights the objective samples from; stores what it trains.
        In `rollout.chunks` chunks of whole groups: each chunk's decoded images go to `self.scoring` at once."""
        cfg, G, P = self.cfg, self.cfg.rollout.group_size, len(groups.prompts)
        mask = self.objective.train_mask(plan, P * G, cfg.run.seed, it, groups.first * G)
        seeds = group_seeds(cfg.run.seed, it, groups.first, P)
        if self.clock is not None:
            self.clock.reset()
        self.model.eval()
        parts = []
        for a, b in chunk_bounds(P, cfg.rollout.chunks):
            rows = slice(a, b)
            with self.autocast(), dist.unsharded(self.model, cfg.parallel), \
                    swapped_weights(self.model, shadow_of(self.sampler)):
                parts.append(rollout(self.model, plan, cond_index(groups.cond, rows), G, seeds[rows],
                                     mask[a * G:b * G], None if groups.uncond is None else
                                     cond_index(groups.uncond, rows), cfg.rollout.guidance_scale,
                                     cfg.rollout.shared_noise))
            with torch.no_grad():
                images = self.model.decode(parts[-1].final).float()
            require_finite_images(images, it)
            self.scoring.submit(images, [p for p in groups.prompts[a:b] for _ in range(G)],
                                reward_seeds(cfg.run.seed, it, (groups.first + a) * G, (b - a) * G),
                                None if groups.inputs is None else groups.inputs[a:b].repeat_interleave(G, dim=0))
        if self.clock is not None:
            self.clock.lap("rollout")
        return Trajectory.cat(parts)

    def score(self, it: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, float]:
        """({label: [P, G]} scores, failed [P], failed [P x ranks], seconds spent scoring) of the rollout's images,
        once every chunk is scored; too many failed groups stop the run."""
        scores, failed, errors, seconds = self.scoring.collect(self.phases.tick)
        failed_all = dist.all_gather_cat(failed)
        failure = self.rewards.failure(failed_all, self.cfg.scoring.max_failed_groups, it, errors)
        if failure is not None:
            raise TrainingError(failure)
        return scores, failed, failed_all, seconds

    def update(self, plan: Plan, traj: Trajectory, advantages: torch.Tensor, groups: Groups, it: int) -> UpdateStats:
        """The objective's optimizer steps on this iteration's samples, then the learning-rate schedule; a weight
        made non-finite, or replicas that disagree (world size > 1), stop the run before anything is saved."""
        cfg, G, P = self.cfg, self.cfg.rollout.group_size, len(groups.prompts)
        self.model.train()
        samples = Samples(plan, traj, advantages.flatten().to(self.device), cond_repeat_interleave(groups.cond, G),
                          None if groups.uncond is None else cond_repeat_interleave(groups.uncond, G),
                          update_shares(cfg.run.seed, it, groups.first, P, G, cfg.update.steps_per_epoch,
                                        cfg.update.epochs),
                          sample_seeds(cfg.run.seed, it, groups.first * G, P * G),
                          [p for p in groups.prompts for _ in range(G)])
        stats = self.objective.update(self.loop, samples)
        if self.sampler is not None:
            self.sampler.update(self.params)
        self.scheduler.step()
        weights = {"weights": list(self.params.values()),
                   **{name: list(copy.shadow.values()) for name, copy in self.state.copies.items()}}
        require_finite_weights([t for group in weights.values() for t in group], it)
        stats.replicas = require_agreeing_replicas(weights, it)
        if self.clock is not None:
            self.clock.lap("update")
        return stats

    def log(self, it: int, plan: Plan, traj: Trajectory, scores: dict[str, torch.Tensor], failed_all: torch.Tensor,
            advantages: torch.Tensor, stats: UpdateStats, watch: Stopwatch) -> dict[str, Any]:
        """The metrics record of iteration `it` (means over ranks), with a warning when it had no learning
        signal."""
        record = {"iteration": it + 1, "window_start": plan.window[0] if plan.window else None,
                  "window_end": plan.window[1] if plan.window else None, "nfe_rollout": traj.nfe,
                  "nfe_trained": self.objective.terms(traj) * self.cfg.update.epochs,
                  "lr": self.state.optimizer.param_groups[0]["lr"], "failed_groups": int(failed_all.sum()),
                  "precision": self.precision, "rescored_old_log_probs": self.rescore_old,
                  **score_metrics(scores)}
        local = {"advantage_abs_mean": float(advantages.abs().mean()),
                 "zero_advantage_groups": float((advantages.abs().sum(1) == 0).float().mean()), **stats.means()}
        record.update(dist.mean_over_ranks(local))  # every rank holds the same number of samples
        record.update(stats.replicas)  # equal on every rank
        if not self.objective.distills:  # a distilling objective learns from its teachers, advantages or not
            warn_without_signal(record)
        record.update({**watch.metrics(), **resource_metrics(self.device)})
        if self.clock is not None:
            record.update(self.clock.metrics())
        return record

    # ----------------------------------------------------------------------------------------------
    # the run

    def run(self, progress: bool, stop_after: int | None) -> Path:
        """Train from the start iteration to the end (or a signal, the time limit, `stop_after` iterations of
        this launch): evaluations, checkpoints, the export and the summary. A signal raises TrainingStopped after
        its checkpoint; every other end of a launch leaves by the one return at the bottom."""
        cfg = self.cfg
        if self.start == 0 and self.eval_prompts:  # eval.num_prompts = 0 skips evaluation
            self.evaluate(0, "before")
        limit, done, end = TimeLimit(cfg.run.time_limit_minutes), 0, self.start
        finished = True  # the run's last iteration or the time limit reached (False: `stop_after` ended the launch)
        with StopRequest() as stop:
            if self.eval_pending and self.eval_prompts and not self.evaluate(self.start, None, stop):
                raise stop.stopped(f"stopped before iteration {self.start + 1}, in the evaluation of iteration "
                                   f"{self.start} that the last stop left to this launch; nothing was trained: "
                                   f"continue with --resume", saved=False)
            for it in range(self.start, cfg.run.iterations):
                record = self.iteration(it, stop)
                if record is None:  # a signal before the update: iteration it + 1 is dropped, checkpoint it
                    self._stop_before(it, stop)
                done, end = done + 1, it + 1
                self.records.metrics(record)
                self.tracker.log(record, it + 1)
                # every rank stops at the same iteration, even when only some of them got the signal or ran out of time
                signalled, out_of_time = agreed_stops(stop, limit)
                last = it + 1 == cfg.run.iterations or out_of_time
                stopping = signalled or (stop_after is not None and done >= stop_after)
                evaluated = True
                if self.eval_prompts and cfg.eval.every and (it + 1) % cfg.eval.every == 0 and not last:
                    # before the checkpoint: a checkpoint at N implies its evaluation, or says it is pending (a
                    # signal before or inside it: the resume evaluates first, so nothing waits for the evaluation)
                    evaluated = not signalled and self.evaluate(it + 1, None, stop)
                    signalled = signalled or agreed_stops(stop, limit)[0]
                    stopping = stopping or signalled
                if progress:
                    dist.print0(progress_line(record, list(self.rewards.weights), self.held_out, cfg.run.iterations,
                                              limit.eta(done, cfg.run.iterations - it - 1)))
                if (it + 1) % cfg.run.checkpoint_every == 0 or last or stopping:
                    self.state.save(self.run_dir, it + 1, {**self.identity, EVAL_PENDING: not evaluated},
                                    cfg.parallel.checkpoint_format == "sharded", cfg.run.keep_checkpoints)
                if last:
                    break
                if stopping:
                    if signalled:
                        raise stop.stopped(f"stopped after iteration {end}; continue with --resume")
                    finished = False
                    break
        if finished:
            self._finish(end)
        self.tracker.close()
        dist.print0(f"run directory: {self.run_dir}" if finished else
                    f"stopped after iteration {end}; continue with --resume")
        if finished and not self.objective.distills:
            require_learning_signal(self.run_dir, cfg.rollout.prompts_per_iteration * dist.world_size())
        return self.run_dir

    def _finish(self, end: int) -> None:
        """The end of the run: the held-out evaluation, the export (every rank: FSDP shards are gathered), then on
        rank 0 summary.md with the curves and the line against the recipe's reference curves (mixgrpo compare)."""
        if self.eval_prompts:
            self.evaluate(end, "after")
        export_model(self.model, self.run_dir / FINAL, shadow_of(self.ema))
        if dist.is_main():
            write_summary(self.run_dir)
            for line in truncation_lines(take_truncations()):  # without a cache: one line per text encoder
                print(line, flush=True)
            against = end_of_run_line(self.run_dir)
            if against is not None:
                print(against, flush=True)

    def _stop_before(self, it: int, stop: StopRequest) -> None:
        """End a launch signalled inside iteration it + 1, before its update: checkpoint the weights after
        iteration `it` unless that checkpoint exists, then raise TrainingStopped."""
        if it == 0:
            raise stop.stopped("stopped in iteration 1, before any update: nothing was trained; start the run again "
                               "with --resume", saved=False)
        latest = latest_checkpoint(self.run_dir)
        if latest is None or read_state(latest)["iteration"] != it:
            self.state.save(self.run_dir, it, {**self.identity, EVAL_PENDING: False},
                            self.cfg.parallel.checkpoint_format == "sharded", self.cfg.run.keep_checkpoints)
        raise stop.stopped(f"stopped after iteration {it} (iteration {it + 1} was dropped before its update); "
                           f"continue with --resume")

    def evaluate(self, iteration: int, tag: str | None, stop: StopRequest | None = None) -> bool:
        """Held-out evaluation on the same noise every time (EMA weights when on), one row of eval.jsonl;
        tag "before"/"after" also saves the sample grid and prints the figures. Returns False, writing nothing,
        when `stop` is signalled before it ends (checked between its batches)."""
        cfg = self.cfg
        # FSDP: every rank gathers the weights, rank 0 evaluates; in the run's precision, like the rollout
        with dist.unsharded(self.model, cfg.parallel), self.autocast():
            if not dist.is_main():  # rank 0 writes the checkpoint's eval_pending; the stop is agreed after
                return True
            with swapped_weights(self.model, shadow_of(self.ema)):  # EMA weights, without touching the live ones
                res = evaluate(self.model, self.eval_prompts, self.rewards.functions(), self.eval_plan,
                               cfg.eval.images_per_prompt, seed=held_out_seed(cfg.run.seed),
                               guidance_scale=cfg.eval_guidance,
                               stop=None if stop is None else lambda: stop.signal is not None,
                               inputs=self.eval_inputs)
            if res is None:
                return False
            samples = res.images[:64, 0]  # the first image (or video) of each of the first 64 prompts
            grid = self.run_dir / media_name(f"samples_{tag}", samples)  # .png, or .gif for videos
            if tag is not None:
                save_sample_grid(res, grid)
            self.held_out.update({f"eval/{k}": v["mean"] for k, v in res.summary().items()})
            self.records.evaluation(iteration, self.held_out)
            write_curves(self.run_dir)
            self.tracker.log(self.held_out, iteration)
            if tag is not None:
                self.tracker.log_image("samples", grid, iteration)
                dist.print0(f"{tag} training: " + ", ".join(f"{k} {v:.4f}" for k, v in self.held_out.items()))
        return True


def load_teachers(cfg: TrainConfig, device: torch.device) -> list[Teacher]:
    """On-policy distillation's teachers (`distill.teachers`; none for the other objectives), as the objective takes
    them: each a frozen model of the student's architecture in eval mode, the training prompts it teaches (None:
    every one) and its weight. A path in a run (the run: its final/ or newest checkpoint; a checkpoint; RUN/final)
    loads as `mixgrpo sample` loads it (`mixgrpo.loading.ModelLoader`), an export outside any run is put into the
    student's base model. A teacher reads the student's conditioning rows, so its text encoders are not loaded
    (where the model's factory takes a text encoder). Nothing of a teacher is checkpointed: a resume loads it again,
    and the checkpoint's record of its files (`mixgrpo.runfiles`) refuses a teacher that changed."""
    teachers = []
    for spec in cfg.distill.teachers:
        if run_of(spec.path) is not None:
            model = ModelLoader([spec.path], cfg.model.name, device=str(device), text_encoders=False).load(spec.path)
        else:
            model = load_export(build_model(cfg.model.name, cfg.model.args, str(device), text_encoder=NoTextEncoder()),
                                spec.path)
        teachers.append(Teacher(model.eval().requires_grad_(False),
                                frozenset(read_prompts(spec.prompts)) if spec.prompts else None, spec.weight))
    return teachers


@torch.no_grad()
def layouts_agree(model: FlowModel, cfg: TrainConfig, autocast: Callable[[], contextlib.AbstractContextManager],
                  uncond_row: Cond | None, device: torch.device) -> bool:
    """Whether a velocity is the same bit for bit computed as the rollout computes it (eval mode, chunks of P G)
    and as the GRPO update does (train mode, each micro-batch size), so that the rollout's log-probs are the
    update's old ones (ratio == 1 on the first step). One call of each on random inputs; kernels that block by
    batch size (fp32 GEMMs at batch 1 on CPU, bf16 GEMMs on some GPUs) fail it, and the update re-scores instead
    (`GRPO(rescore_old=True)`)."""
    G = cfg.rollout.group_size
    B = cfg.rollout.prompts_per_iteration * G
    share = B // cfg.update.steps_per_epoch
    sizes = sorted({len(mb) for mb in micro_batches(torch.arange(share), cfg.update.micro_batch_size)})
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, *model.latent_shape), generator=g).to(device)
    sigma = torch.full((B,), 0.5, device=device)
    rows = lambda c: {k: v.contiguous() for k, v in cond_expand(c, B).items()}  # noqa: E731
    cond = rows(cond_to(encode_examples(model, [""], blank_inputs(model, 1)), device))  # "" is in every embedding cache
    uncond = None if uncond_row is None else rows(uncond_row)
    training = model.training
    model.eval()
    with autocast(), dist.unsharded(model, cfg.parallel):  # in the rollout's chunks (rollout.chunks)
        v_rollout = torch.cat([guided_velocity(model, x[a * G:b * G], sigma[a * G:b * G], cond_index(cond, rows),
                                               None if uncond is None else cond_index(uncond, rows),
                                               cfg.rollout.guidance_scale)
                               for a, b in chunk_bounds(cfg.rollout.prompts_per_iteration, cfg.rollout.chunks)
                               for rows in [slice(a * G, b * G)]])
    model.train()
    same = True
    for n in sizes:
        idx = torch.randperm(B, generator=g)[:n].to(device)
        with autocast():
            v = guided_velocity(model, x[idx], sigma[idx], cond_index(cond, idx),
                                None if uncond is None else cond_index(uncond, idx), cfg.rollout.guidance_scale)
        same = same and torch.equal(v, v_rollout[idx])
    model.train(training)
    return not any_rank(not same)
