"""What several commands share: the --set option and the checks of an output directory and of a flag's value."""

from __future__ import annotations

import argparse
from pathlib import Path

from mixgrpo.errors import UsageError


def add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a field of the run's config.yaml for this command, as `train` takes them "
                        "(repeatable); e.g. --set model.args.path=/data/FLUX.1-dev for a run whose base model moved")


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """An output directory (sample --out, eval --out, export --out) that can be created: no file in the way,
    checked before the models load, so that no sampled image or exported model is lost."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"{flag} {str(out)!r}: {str(p)!r} is a file, not a directory: choose another {flag}")
            return


def check_given(flag: str, value: str | None, fix: str) -> None:
    """A flag given an empty value, as an unset shell variable gives it."""
    if value is not None and not value.strip():
        raise UsageError(f"{flag} is empty (an unset shell variable?): {fix}")
