"""Progress bars for the long phases (model loading, sampling, evaluation, scoring), with tqdm.

Shown on rank 0 only, on stderr. In a terminal they refresh every second; in a log file (a batch job) every
30 s, so a log gets a few lines per phase instead of one per step. TQDM_DISABLE=1 turns every bar off (tqdm's
own switch; the tests set it).

Inside a training iteration (`PhaseProgress`), the rollout's and the update's model calls, and the wait for the
chunks' scores, get a bar of their own only when the phase lasts longer than SLOW_PHASE_S: a real model's iteration takes minutes, the tiny model's a
second, and its one line per iteration is enough.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from mixgrpo import dist

T = TypeVar("T")

SLOW_PHASE_S = 10.0  # a phase of an iteration that runs longer than this shows its progress


def bar(total: int | None = None, desc: str = "", unit: str = "it", iterable: Iterable[T] | None = None,
        delay: float = 0.0) -> tqdm:
    """A tqdm bar (over `iterable`, or updated by hand up to `total`); a no-op on ranks other than 0. delay > 0:
    shown only once that many seconds have passed, and in a terminal cleared when it closes."""
    interactive = sys.stderr.isatty()
    off = not dist.is_main() or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=off, delay=delay,
                leave=not (delay and interactive), mininterval=1.0 if interactive else 30.0, dynamic_ncols=True,
                file=sys.stderr)


class PhaseProgress:
    """A bar per phase of a training iteration, advanced by every forward call of `model` (a forward hook), shown
    when the phase lasts longer than `delay` seconds (rank 0)."""

    def __init__(self, model: "torch.nn.Module", delay: float | None = None):  # noqa: F821
        self.delay, self._bar = SLOW_PHASE_S if delay is None else delay, None
        model.register_forward_hook(self._tick)

    def _tick(self, *_) -> None:
        if self._bar is not None:
            self._bar.update()

    def tick(self) -> None:
        """One unit of the current phase done, for a phase whose units are not model calls (scored chunks)."""
        self._tick()

    @contextlib.contextmanager
    def phase(self, desc: str, total: int | None = None, unit: str = "model call") -> Iterator[None]:
        """Count the model calls (or `tick`s) of the block under `desc` (of `total` when known)."""
        with bar(total=total, desc=desc, unit=unit, delay=self.delay) as b:
            self._bar = b
            try:
                yield
            finally:
                self._bar = None
