"""Memory-aware optax optimizers, one module each, registered by name.

Every optimizer is an ``optax.GradientTransformation`` factory registered with
:func:`register`, together with an exact state-bytes formula::

    @register("adam8bit", state_bytes=adam8bit_state_bytes)
    def adam8bit(learning_rate=1e-3, ...): ...

``get(name, **kwargs)`` builds one; ``state_bytes(name, params, **kwargs)`` gives
the analytic optimizer-state bytes for a params pytree (arrays or
``jax.ShapeDtypeStruct``; an int parameter count is accepted by element-wise
optimizers), which the profiler checks against ``tree_bytes(tx.init(params))``.
A new optimizer is one module in this folder plus its test; nothing else is edited.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import optax

from memlab.registry import Registry, discover

OPTIMIZERS = Registry("optimizer")
_STATE_BYTES: dict[str, Callable[..., int]] = {}


def register(name: str, state_bytes: Optional[Callable[..., int]] = None):
    """Register an optimizer factory by name, with its exact ``state_bytes(params, **kw)``."""
    def deco(fn):
        OPTIMIZERS.register(name)(fn)
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


discover(__name__, __path__)
from memlab.optim.adamw import adamw, sgd, with_state_dtype  # noqa: E402,F401
