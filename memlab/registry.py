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

    def register(self, name: str):
        def deco(fn):
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn
        return deco

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
