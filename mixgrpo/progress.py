"""Progress bars for the long phases (model loading, sampling, evaluation, scoring), with tqdm.

Shown on rank 0 only, on stderr. In a terminal they refresh every second; in a log file (a batch job) every
30 s, so a log gets a few lines per phase instead of one per step. TQDM_DISABLE=1 turns every bar off (tqdm's
own switch; the tests set it).
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

from mixgrpo import dist

T = TypeVar("T")


def bar(total: int | None = None, desc: str = "", unit: str = "it", iterable: Iterable[T] | None = None) -> tqdm:
    """A tqdm bar (over `iterable`, or updated by hand up to `total`); a no-op on ranks other than 0."""
    interactive = sys.stderr.isatty()
    off = not dist.is_main() or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=off,
                mininterval=1.0 if interactive else 30.0, dynamic_ncols=True, file=sys.stderr)
