"""The optimizer registry: factories by name with their exact state-bytes formulas
(:mod:`memlab.optim` re-exports it; optimizer modules register here)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import optax

from memlab.registry import Registry

OPTIMIZERS = Registry("optimizer")
_STATE_BYTES: dict[str, Callable[..., int]] = {}


def register(name: str, state_bytes: Optional[Callable[..., int]] = None, **facts):
    """Register an optimizer factory by name, with its exact ``state_bytes(params, **kw)``
    and the planner's facts (:mod:`memlab.facts`; :mod:`memlab.planner.cost` lists them)."""
    def deco(fn):
        OPTIMIZERS.register(name, **facts)(fn)
        if state_bytes is not None:
            _STATE_BYTES[name] = state_bytes
        return fn
    return deco


def get(name: str, **kwargs) -> optax.GradientTransformation:
    """The optimizer registered as ``name``, built with ``kwargs``."""
    return OPTIMIZERS.get(name)(**kwargs)


def names() -> list[str]:
    return OPTIMIZERS.names()


def state_bytes(name: str, params: Any, *args, **kwargs) -> int:
    """Exact optimizer-state bytes of ``get(name, **kwargs)`` for ``params``.

    ``params`` is a pytree of arrays / ``jax.ShapeDtypeStruct`` (or, for
    element-wise optimizers, an int parameter count).
    """
    OPTIMIZERS.get(name)  # unknown names raise the registry's error
    if name not in _STATE_BYTES:
        raise ValueError(f"no state-bytes formula for optimizer {name!r}")
    return _STATE_BYTES[name](params, *args, **kwargs)


def param_count(params: Any) -> int:
    """Number of parameters in a pytree (or ``params`` itself when it is an int)."""
    if isinstance(params, int):
        return params
    import math

    import jax
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
