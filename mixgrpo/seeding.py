"""Every random draw of a run, as a pure function of (seed, iteration, global index).

A prompt's images, its group's update shares and the evaluation noise depend only on these integers, never on
the rank or the batch that computes them: a run gives the same result at any world size and micro-batch size,
and a resumed run reproduces the uninterrupted one bit for bit (docs/design.md). The plan's own draws (the
random window position, DanceGRPO's trained steps) are part of the pure plan function (`mixgrpo.plan`).

Indices are global: prompt p of rank r is global prompt r P + p, sample b is global sample r P G + b.
"""

from __future__ import annotations

import numpy as np
import torch

# Stream tags: the same (seed, iteration, index) feeds several draws, each tagged apart.
_PROMPT_ORDER = 0xE90C
_UPDATE_SHARES = 0x5A5A
_TRAINING_SIGMAS = 0xF10
_REWARD_REQUESTS = 0x7E7


def held_out_seed(seed: int) -> int:
    """The evaluation seed of a run of `seed` (`image_seeds(held_out_seed(seed), ...)` is its held-out noise): the
    trainer's evaluations and `mixgrpo eval` / `sample` of the run draw the same images."""
    return seed + 1


def derive_seed(*values: int) -> int:
    """A 63-bit seed from a tuple of integers (stable across processes and platforms)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(2, np.uint64)[0] >> 1)


def prompt_indices(iteration: int, num_prompts: int, count: int, seed: int) -> list[int]:
    """Global prompt indices of one iteration: a stream of seeded permutations (epochs), sliced."""
    start = iteration * count
    out: list[int] = []
    epoch = start // num_prompts
    offset = start % num_prompts
    while len(out) < count:
        g = torch.Generator().manual_seed(derive_seed(seed, _PROMPT_ORDER, epoch))
        perm = torch.randperm(num_prompts, generator=g).tolist()
        out.extend(perm[offset:])
        epoch, offset = epoch + 1, 0
    return out[:count]


def group_seeds(seed: int, iteration: int, first_prompt: int, count: int) -> list[int]:
    """The rollout noise of global prompts [first_prompt, first_prompt + count): one generator seed per group."""
    return [derive_seed(seed, iteration, i) for i in range(first_prompt, first_prompt + count)]


def image_seeds(seed: int, jobs: list[tuple[int, int]]) -> list[int]:
    """The evaluation noise of (prompt index, image index) jobs: the same for every model compared."""
    return [derive_seed(seed, i, j) for i, j in jobs]


def sample_seeds(seed: int, iteration: int, first_sample: int, count: int) -> list[int]:
    """The forward-process training draws (sigmas, noises) of global samples [first_sample, first_sample + count)."""
    return [derive_seed(seed, iteration, b, _TRAINING_SIGMAS) for b in range(first_sample, first_sample + count)]


def reward_seeds(seed: int, iteration: int, first_sample: int, count: int) -> list[int]:
    """The seeds a reward that draws (a VLM judge's sampling) gets for global samples [first_sample, first_sample +
    count) of an iteration: a rerun asks the same questions with the same seeds."""
    return [derive_seed(seed, iteration, b, _REWARD_REQUESTS) for b in range(first_sample, first_sample + count)]


def update_shares(seed: int, iteration: int, first_prompt: int, num_prompts: int, group_size: int, updates: int,
                  epochs: int) -> list[torch.Tensor]:
    """Sample indices ([P G / U] each, local to the rank) of every optimizer step: `epochs` passes of `updates`
    steps. In every pass, step u takes the u-th slice of a seeded permutation of every group, so the split is the
    same whatever the number of ranks."""
    chunk = group_size // updates
    shares = []
    for epoch in range(epochs):
        perms = []
        for p in range(num_prompts):
            extra = (epoch,) if epoch else ()  # the first pass keeps the seeds of single-pass runs
            g = torch.Generator().manual_seed(derive_seed(seed, iteration, first_prompt + p, _UPDATE_SHARES, *extra))
            perms.append(p * group_size + torch.randperm(group_size, generator=g))
        shares += [torch.cat([perm[u * chunk:(u + 1) * chunk] for perm in perms]) for u in range(updates)]
    return shares
