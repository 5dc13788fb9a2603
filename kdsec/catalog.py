"""A tiny name -> component registry, one per kind of component (datasets, models, losses)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from kdsec.errors import ConfigError

T = TypeVar("T")


class Catalog(Generic[T]):
    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(component: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = component
            return component

        return decorator

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries))
            raise ConfigError(f"unknown {self.kind} '{name}' in {self.config_key} (known: {known})") from None

    def names(self) -> list[str]:
        return sorted(self._entries)
