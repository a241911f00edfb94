"""Memory-aware optax optimizers, each with an exact state-bytes formula.

``state_bytes(name, param_count)`` gives the analytic optimizer-state bytes the
profiler checks against the real state pytree.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class _StateDtypeState(NamedTuple):
    inner: Any


def with_state_dtype(tx: optax.GradientTransformation, dtype: Any) -> optax.GradientTransformation:
    """Run ``tx`` with its state in ``dtype`` whatever the params' dtype.

    The usual bf16-weights / fp32-moments setup: params and gradients are upcast
    to ``dtype`` inside the update; updates come back in the params' dtype.
    """
    dt = jnp.dtype(dtype)

    def up(tree):
        return jax.tree_util.tree_map(
            lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return _StateDtypeState(tx.init(up(params)))

    def update(updates, state, params=None):
        like = updates
        new, inner = tx.update(up(updates), state.inner, None if params is None else up(params))
        new = jax.tree_util.tree_map(lambda n, u: n.astype(u.dtype), new, like)
        return new, _StateDtypeState(inner)

    return optax.GradientTransformation(init, update)


def adamw(learning_rate: float = 1e-4, weight_decay: float = 0.0, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, state_dtype: Any = "float32"):
    """AdamW (Loshchilov & Hutter) with both moments stored in ``state_dtype``."""
    return with_state_dtype(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay), state_dtype)


def sgd(learning_rate: float = 1e-2):
    return optax.sgd(learning_rate)


OPTIMIZERS = {"adamw": adamw, "sgd": sgd}


def get(name: str, **kwargs) -> optax.GradientTransformation:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](**kwargs)


def state_bytes(name: str, param_count: int, state_dtype: Any = "float32") -> int:
    """Exact optimizer-state bytes for ``param_count`` parameters."""
    item = jnp.dtype(state_dtype).itemsize
    if name == "adamw":
        return 2 * param_count * item + 4  # mu, nu, and an int32 step count
    if name == "sgd":
        return 0
    raise ValueError(f"no state-bytes formula for optimizer {name!r}")
