"""A name -> factory registry, used for the open-ended sets: base models and rewards."""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path
from typing import Callable, Generic, TypeVar

from mixgrpo.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a factory. `get` also accepts "package.module:attribute" for user code."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}
        self._modules: dict[str, tuple[str, ...]] = {}

    def register(self, name: str, modules: tuple[str, ...] = ()) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """A decorator registering `factory` as `name`. modules: the Python modules beyond the core that the factory's
        object imports when built or called, which the pre-flight names with their pip command (`modules`)."""
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            self._modules[name] = tuple(modules)
            return factory

        return decorator

    def modules(self, name: str) -> tuple[str, ...]:
        """The Python modules beyond the core that `name` needs (none for a user's "package.module:attribute")."""
        return self._modules.get(name, ())

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __iter__(self):
        """The registered names, in registration order."""
        return iter(self._factories)

    def __contains__(self, name: object) -> bool:
        """Whether `name` is registered (a "package.module:attribute" name is not)."""
        return name in self._factories

    def get(self, name: str) -> Callable[..., T]:
        if name in self._factories:
            return self._factories[name]
        if ":" in name:
            module_name, _, attr = name.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise ConfigError(f"{self.kind} {name!r}: cannot import module {module_name!r} ({e}); "
                                  f"{_import_hint(module_name)}") from None
            if not hasattr(module, attr):
                raise ConfigError(f"{self.kind} {name!r}: module {module_name!r} has no attribute {attr!r}")
            return getattr(module, attr)
        close = difflib.get_close_matches(name, self.names(), n=1) or [n for n in self.names() if n.startswith(name)]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}; "
                          f"or give a Python callable as 'package.module:function'.")


def _import_hint(module_name: str) -> str:
    """How to make a user's module importable: the `mixgrpo` command does not search the working directory
    (`python -m mixgrpo` and `torchrun -m mixgrpo` do)."""
    top = module_name.split(".")[0]
    cwd = Path.cwd()
    if ((cwd / top).is_dir() or (cwd / f"{top}.py").is_file()) and not ({"", ".", str(cwd)} & set(sys.path)):
        return (f"{top} is in the working directory, which the mixgrpo command does not search: prefix the command "
                f"with PYTHONPATH=. (or run python -m mixgrpo)")
    return ("put the directory that holds it on PYTHONPATH (PYTHONPATH=DIR mixgrpo ...), or pip install its "
            "package")
