"""The errors a user can fix, apart from the bugs.

`UserError` is the base of every error caused by the user's input: a config value, a command-line argument, a
file, a model or run directory, a reward that fails on the user's side. The command line prints its message as
one line and exits 2 (docs/reliability.md); any other exception (a bug in mixgrpo, or a ValueError raised by torch
or diffusers) shows its traceback, because the traceback is what is needed to fix it. Internal invariants (a
tensor of the wrong shape between two of mixgrpo's own functions) stay plain ValueError / RuntimeError.

This module imports nothing, so that every layer may raise these.
"""

from __future__ import annotations

from typing import Any, Iterable


class UserError(Exception):
    """An error in the user's input; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A value the user gave is wrong (a config field, a command-line argument, the contents of a file or a model
    directory); the message names the field and the fix. A ValueError too, for callers that catch those."""


class UsageError(ConfigError):
    """A command-line argument is wrong (a flag's value, a path, a combination of flags); the message names the
    flag and the fix."""


def check_values(checks: Iterable[tuple[bool, str, Any, str]]) -> None:
    """Raise ConfigError for the first failed check (ok, name, value, want): "NAME = VALUE is invalid: use WANT".

    The one form of every command's range checks (train's config, sample, eval, export, preprocess). Write `ok`
    so that NaN fails it (`0 < x < inf`, not `not x <= 0`)."""
    for ok, name, value, want in checks:
        if not ok:
            raise ConfigError(f"{name} = {value!r} is invalid: use {want}")
