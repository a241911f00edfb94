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

from memlab.optim.base import (  # noqa: F401
    _STATE_BYTES, OPTIMIZERS, get, names, param_count, register, state_bytes,
)
from memlab.registry import discover

discover(__name__, __path__)
from memlab.optim.adamw import adamw, sgd, with_state_dtype  # noqa: E402,F401
