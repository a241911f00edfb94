"""Registries by name, filled by importing every module of a package.

A new method is one module that calls ``REGISTRY.register("name")`` on its
factory; the package's ``__init__`` discovers modules with :func:`discover`, so
nothing else is edited to add one.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable, Dict


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}
        self._facts: Dict[str, dict] = {}

    def register(self, name: str, **facts):
        """Register ``fn`` as ``name``, with the facts the planner reads about it
        (:mod:`memlab.facts`: values, functions, or ``measured()``)."""
        def deco(fn):
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            if facts:
                self._facts[name] = dict(facts)
            return fn
        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` and its facts (tests that register a throwaway entry)."""
        self._items.pop(name, None)
        self._facts.pop(name, None)

    def has_fact(self, name: str, fact: str) -> bool:
        return fact in self._facts.get(name, {})

    def fact(self, name: str, fact: str, *default):
        """The fact ``fact`` registered with ``name`` (:class:`memlab.facts.Measured`
        read from the results file); ``default`` if given and the fact is absent, else
        :class:`memlab.facts.MissingFact` naming the registration."""
        from memlab import facts as F
        fn = self.get(name)
        where = getattr(fn, "__module__", None)
        if fact not in self._facts.get(name, {}):
            if default:
                return default[0]
            raise F.MissingFact(self.kind, name, fact, where)
        return F.resolve(self.kind, name, fact, self._facts[name][fact], where)

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {sorted(self._items)}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items


def discover(package_name: str, package_path) -> None:
    """Import every non-private module of a package so that it registers itself."""
    for info in pkgutil.iter_modules(package_path):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
