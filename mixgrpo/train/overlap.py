"""Scoring that overlaps the rollout: the rollout runs in chunks of whole groups (`rollout.chunks`), each chunk is
decoded and handed to `ChunkScoring` as soon as it is done, which scores it in a background thread while the next
chunk rolls out (`rollout.reward_overlap`); the update waits only for what is still missing.

The result does not depend on the timing: a chunk's rollout noise comes from its groups' own generators
(`mixgrpo.seeding`), every chunk is scored by the same code on the same images whether in the thread or after the
rollout, and the scores are put together in chunk order, not in the order they arrive. A reward in the thread runs
concurrently with the rollout, so it should not draw from torch's global generator (none of the shipped rewards
does; a judge that samples gets its seeds, `mixgrpo.seeding.reward_seeds`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from mixgrpo.rewards.scoring import RewardSet

Scored = tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, str], float]
"""A chunk's ({label: [p, G]} scores, failed [p], {label: why some are NaN}, seconds spent scoring it)."""


def chunk_bounds(num_prompts: int, chunks: int) -> list[tuple[int, int]]:
    """[(first, end)) prompt ranges of `chunks` nearly equal parts of num_prompts groups (the first ones larger)."""
    base, extra = divmod(num_prompts, chunks)
    bounds, at = [], 0
    for c in range(chunks):
        size = base + (c < extra)
        bounds.append((at, at + size))
        at += size
    return [(a, b) for a, b in bounds if b > a]


class ChunkScoring:
    """The scores of one iteration's rollout chunks: `submit` each chunk's images as it is decoded, `collect` them
    all (in chunk order) before the advantages. overlap: score in one background thread, in submission order;
    else at `collect`."""

    def __init__(self, rewards: RewardSet, group_size: int, overlap: bool):
        self.rewards, self.group_size = rewards, group_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring") if overlap else None
        self._parts: list[Future | tuple] = []

    def _score(self, images: torch.Tensor, prompts: list[str], seeds: list[int],
               inputs: torch.Tensor | None) -> Scored:
        start = time.perf_counter()
        scores, failed, errors = self.rewards.score(images, prompts, self.group_size, seeds, inputs)
        return scores, failed, errors, time.perf_counter() - start

    def submit(self, images: torch.Tensor, prompts: list[str], seeds: list[int],
               inputs: torch.Tensor | None = None) -> None:
        """A chunk's decoded images [b, 3, H, W] (b = p G, group order), their prompts and reward seeds, and
        (image-conditioned models) each image's input image [b, 3, H, W]."""
        job = (images, prompts, seeds, inputs)
        self._parts.append(self._pool.submit(self._score, *job) if self._pool is not None else job)

    def collect(self, on_chunk: Callable[[], None] | None = None) -> Scored:
        """Every submitted chunk's scores, concatenated in chunk order: ({label: [P, G]}, failed [P], errors,
        seconds spent scoring in total, hidden or not); `on_chunk` is called as each chunk's scores are in (a
        progress bar). A reward's exception (a bug) is raised here."""
        parts = []
        for p in self._parts:
            parts.append(p.result() if isinstance(p, Future) else self._score(*p))
            if on_chunk is not None:
                on_chunk()
        self._parts = []
        errors: dict[str, str] = {}
        for _, _, e, _ in parts:
            for label, why in e.items():
                errors.setdefault(label, why)
        return ({label: torch.cat([p[0][label] for p in parts]) for label in parts[0][0]},
                torch.cat([p[1] for p in parts]), errors, sum(p[3] for p in parts))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
