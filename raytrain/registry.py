"""One registry class for every kind of variant: backbones, fusions, RoI schedules, converters.

    BACKBONES = Registry("backbone")

    @BACKBONES.register("resnet50")
    def resnet50(): ...

    BACKBONES.get("resnet50")      # the entry; an unknown name raises one line listing the known ones
    BACKBONES.names()              # sorted names, what config validation checks against
"""
from __future__ import annotations

from typing import Any


class Registry:
    """Name -> entry for one kind of variant."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Register `entry` under `name`; without `entry`, a decorator that registers its argument."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def problem(self, name: object) -> str | None:
        """Why `name` is not a valid choice (one phrase after the name), None when it is."""
        if name in self._entries:
            return None
        return f"{name!r} is not a registered {self.kind} (registered: {', '.join(self.names())})"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def lookup(kind: str) -> Registry:
    """The registry of `kind` ('backbone', 'fusion', 'schedule', 'converter'), imported on demand
    so that the config module can validate names without importing the model at start-up."""
    import importlib

    module, attribute = _HOMES[kind]
    return getattr(importlib.import_module(module), attribute)


_HOMES: dict[str, tuple[str, str]] = {
    "backbone": ("raytrain.model.backbones", "BACKBONES"),
    "fusion": ("raytrain.model.fusion", "FUSIONS"),
    "schedule": ("raytrain.geometry.rois", "SCHEDULES"),
    "converter": ("raytrain.data.convert.sources", "CONVERTERS"),
}
