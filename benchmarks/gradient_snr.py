"""How much of one iteration's policy gradient is signal? Cosines between the gradients of independent batches.

    python benchmarks/gradient_snr.py --config configs/mixgrpo.yaml --batches 6 --iteration 0 [key=value ...]

For each of --batches independent batches (P random train prompts x G images, fresh seeds) this runs the
recipe's rollout at the base weights, scores it with the recipe's rewards, and takes the GRPO loss's
gradient at ratio 1 (the first optimizer step of an iteration, all P x G samples in one step). If
g_b = s + n_b with a shared signal s and independent noise n_b, the mean pairwise cosine estimates
|s|^2 / (|s|^2 + E|n|^2): the share of one batch's gradient energy that is signal. The same is computed
with the advantages shuffled inside each group (signal removed) as the noise floor of the estimate.

A share near the floor means one iteration's update is almost pure noise: more samples per step, or many
more steps at a small learning rate, are needed before the weights move along the reward's direction.
`--iteration` places the window (and the rest of the plan) as at that training iteration.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random

import torch

from mixgrpo.config import load_config
from mixgrpo.grpo import combine_rewards
from mixgrpo.models import cond_expand, cond_repeat_interleave, cond_to
from mixgrpo.models.base import build_model
from mixgrpo.plan import build_plan, train_mask
from mixgrpo.prompts import read_prompts
from mixgrpo.rewards.scoring import build_rewards, score_groups
from mixgrpo.rollout import rollout
from mixgrpo.seeding import derive_seed
from mixgrpo.objectives import GRPO, Policy, Samples
from mixgrpo.train.update import UpdateLoop
from mixgrpo.train.weights import trainable_parameters


def mean_cosine(vectors: list[torch.Tensor]) -> float:
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(vectors, 2)]
    return sum(pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--config", default="configs/mixgrpo.yaml")
    parser.add_argument("--batches", type=int, default=6, help="independent batches (>= 2)")
    parser.add_argument("--iteration", type=int, default=0, help="training iteration whose plan to use")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args()
    if args.batches < 2:
        parser.error("--batches must be >= 2: the estimate compares pairs of batches")
    if args.threads:
        torch.set_num_threads(args.threads)
    # One optimizer step over the whole batch, no clipping of the gradient we want to measure.
    cfg = load_config(args.config, [*args.overrides, "optim.grad_clip=0", "update.steps_per_epoch=1"])
    device = torch.device("cpu")
    model = build_model(cfg.model.name, cfg.model.args).to(device)
    params = trainable_parameters(model, cfg.model.name, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules,
                                  cfg.update.grad_checkpointing)
    rewards = build_rewards(cfg.rewards)
    weights = {r.label: r.weight for r in rewards if r.weight != 0}
    frozen = torch.optim.SGD(list(params.values()), lr=0.0)  # the update steps it: lr 0 keeps the base weights
    loop = UpdateLoop(params, frozen, cfg.update.micro_batch_size, cfg.optim.grad_clip, ema=None, clock=None)
    grpo = GRPO(Policy(model, model, contextlib.nullcontext), cfg.loss.clip_range, kl_beta=0.0,
                guidance_scale=cfg.rollout.guidance_scale)
    prompts_all = read_prompts(cfg.rollout.prompts)
    P, G = cfg.rollout.prompts_per_iteration, cfg.rollout.group_size
    uncond_row = cond_to(model.encode_prompts([""]), device) if cfg.rollout.guidance_scale != 1.0 else None
    plan = build_plan(cfg.sampler, args.iteration, cfg.run.seed)
    real, shuffled = [], []
    for b in range(args.batches):
        prompts = [prompts_all[i] for i in random.Random(b).sample(range(len(prompts_all)), P)]
        cond = cond_to(model.encode_prompts(prompts), device)
        uncond = None if uncond_row is None else cond_expand(uncond_row, P)
        model.eval()
        traj = rollout(model, plan, cond, G, [derive_seed(1000 + b, args.iteration, i) for i in range(P)],
                       train_mask(plan, P * G, cfg.run.seed, args.iteration), uncond, cfg.rollout.guidance_scale,
                       cfg.rollout.shared_noise)
        with torch.no_grad():
            images = model.decode(traj.final).float()
        scores, _ = score_groups(rewards, images, [p for p in prompts for _ in range(G)], G)
        adv = combine_rewards({k: v for k, v in scores.items() if k in weights}, weights, cfg.advantage.reward_mode,
                              clip=cfg.advantage.clip)
        perm = torch.Generator().manual_seed(b)
        adv_shuffled = torch.stack([row[torch.randperm(G, generator=perm)] for row in adv])
        model.train()
        for target, a in ((real, adv), (shuffled, adv_shuffled)):
            grpo.update(loop, Samples(plan, traj, a.flatten(), cond_repeat_interleave(cond, G),
                                      None if uncond is None else cond_repeat_interleave(uncond, G),
                                      [torch.arange(P * G)], seeds=[], prompts=[p for p in prompts for _ in range(G)]))
            target.append(torch.cat([p.grad.flatten() for p in params.values()]).clone())
        print(f"batch {b + 1}/{args.batches}: " + ", ".join(f"{k} {float(v.mean()):.3f}" for k, v in scores.items()),
              flush=True)
    result = {"config": args.config, "overrides": args.overrides, "iteration": args.iteration,
              "window": plan.window, "images_per_batch": P * G, "batches": args.batches,
              "signal_share": mean_cosine(real), "floor_shuffled_advantages": mean_cosine(shuffled)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
