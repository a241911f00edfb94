"""AdamW and SGD, the full-state baselines every memory-efficient optimizer is measured against."""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from memlab.facts import measured
from memlab.optim.base import param_count, register


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


def adamw_state_bytes(params, state_dtype: Any = "float32", **_) -> int:
    """mu and nu in ``state_dtype`` plus optax's int32 step count."""
    return 2 * param_count(params) * jnp.dtype(state_dtype).itemsize + 4


@register("adamw", state_bytes=adamw_state_bytes, plan=("train", "finetune"),
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def adamw(learning_rate: float = 1e-4, weight_decay: float = 0.0, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, state_dtype: Any = "float32"):
    """AdamW (Loshchilov & Hutter) with both moments stored in ``state_dtype``."""
    return with_state_dtype(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay), state_dtype)


@register("sgd", state_bytes=lambda params, **_: 0,
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def sgd(learning_rate: float = 1e-2):
    return optax.sgd(learning_rate)
