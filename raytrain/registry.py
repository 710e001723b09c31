"""One registry type for every kind of variant: name -> entry, with one-line errors.

    CONVERTERS = Registry("converter")

    @CONVERTERS.register("coco")
    def coco(): ...

    CONVERTERS.get("coco")      # the entry
    CONVERTERS.get("cocoa")     # ValueError: unknown converter 'cocoa'; known: coco, ...
"""
from __future__ import annotations

from typing import Any


class Registry:
    """Named entries of one kind (``kind`` appears in error messages)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, obj: Any = None):
        """Register ``obj`` under ``name``; without ``obj``, a decorator that does."""
        if obj is not None:
            self._add(name, obj)
            return obj

        def decorator(entry):
            self._add(name, entry)
            return entry
        return decorator

    def _add(self, name: str, obj: Any) -> None:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj

    def get(self, name: str) -> Any:
        """The entry ``name``; ValueError naming the known names if there is none."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
