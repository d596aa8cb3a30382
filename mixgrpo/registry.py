"""A name -> factory registry, used for the open-ended sets: base models and rewards."""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a name to a factory. `get` also accepts "package.module:attribute" for user code."""

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

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
                raise ValueError(f"{self.kind} {name!r}: cannot import module {module_name!r} ({e}); "
                                 f"check that it is on PYTHONPATH") from None
            if not hasattr(module, attr):
                raise ValueError(f"{self.kind} {name!r}: module {module_name!r} has no attribute {attr!r}")
            return getattr(module, attr)
        close = difflib.get_close_matches(name, self.names(), n=1) or [n for n in self.names() if n.startswith(name)]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.names())}; "
                         f"or give a Python callable as 'package.module:function'.")
