"""A small generic registry with aliases, lazy ``module:object`` placeholders and entry points.

Modelled on EleutherAI lm-evaluation-harness ``lm_eval/api/registry.py``: objects register by name
through a decorator, third-party packages add objects through an entry-point group, and looking up an
unknown name raises an error that lists every known name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from ctkd_bench.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object, filled by ``@registry.register("name")``, entry points and lazy placeholders.

    ``discover`` is a callable run once before the first lookup (e.g. importing the built-in modules
    so that their decorators run); ``entry_point_group`` names the ``importlib.metadata`` group that
    third-party packages use.
    """

    def __init__(
        self, kind: str, *, entry_point_group: str | None = None, discover: Callable[[], None] | None = None
    ) -> None:
        self.kind = kind
        self._objects: dict[str, T | str] = {}
        self._aliases: dict[str, str] = {}
        self._entry_point_group = entry_point_group
        self._discover = discover
        self._discovered = False

    def register(self, name: str, *, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return decorator

    def add(self, name: str, obj: T | str, *, aliases: Iterable[str] = ()) -> None:
        """Register ``obj`` (or a lazy ``"module:attr"`` placeholder) under ``name``."""
        existing = self._objects.get(name)
        if existing is not None and existing is not obj and not isinstance(existing, str):
            raise ValueError(f"{self.kind} {name!r} is registered twice ({existing!r} and {obj!r})")
        self._objects[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def _ensure_discovered(self) -> None:
        if self._discovered:
            return
        self._discovered = True
        if self._discover is not None:
            self._discover()
        if self._entry_point_group:
            for ep in entry_points(group=self._entry_point_group):
                if ep.name not in self._objects:
                    self._objects[ep.name] = ep.value  # lazy "module:attr"

    def names(self) -> list[str]:
        self._ensure_discovered()
        return sorted(self._objects)

    def __contains__(self, name: str) -> bool:
        self._ensure_discovered()
        return name in self._objects or name in self._aliases

    def get(self, name: str) -> T:
        self._ensure_discovered()
        canonical = self._aliases.get(name, name)
        if canonical not in self._objects:
            raise UserError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        obj = self._objects[canonical]
        if isinstance(obj, str):  # lazy placeholder "module:attr", resolved on first use
            module_name, _, attr = obj.partition(":")
            module = importlib.import_module(module_name)
            obj = getattr(module, attr) if attr else module
            self._objects[canonical] = obj
        return obj  # type: ignore[return-value]
