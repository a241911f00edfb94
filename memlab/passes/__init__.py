"""Passes: Model -> Model transforms, one module each, registered by name.

Every module here registers its factory with ``PASSES.register(name)``; they are
reachable as ``memlab.passes.<name>(...)`` and ``memlab.passes.get(name)``.
"""
from memlab.registry import Registry, discover

PASSES = Registry("pass")
discover(__name__, __path__)
# Each module's name is its pass's name: expose the factory, not the module.
globals().update({name: PASSES.get(name) for name in PASSES.names()})


def get(name: str):
    return PASSES.get(name)


def names() -> list[str]:
    return PASSES.names()


def __getattr__(name: str):
    if name in PASSES:
        return PASSES.get(name)
    raise AttributeError(f"memlab.passes has no pass {name!r}; registered: {PASSES.names()}")
