"""Name registries for models, datasets, attacks and defenses."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories; unknown or duplicate names raise errors that list the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers ``factory`` under ``name``."""

        def decorator(factory: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered.")
            self._entries[name] = factory
            return factory

        return decorator

    def get(self, name: str) -> T:
        """Returns the factory registered under ``name``.

        Raises:
          ValueError: ``name`` is unknown; the message lists the known names.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}.") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
