"""CAME: confidence-guided adaptive memory efficient optimization (Luo et al.,
"CAME: Confidence-guided Adaptive Memory Efficient Optimization", ACL 2023,
arXiv:2307.02047).

For a factored parameter ``W`` of shape ``[..., m, n]`` (leading axes are a batch
of matrices, as under ``nn.scan``), with ``G`` its gradient:

* second moment, factored as in Adafactor: ``r ← β2 r + (1-β2) mean_n(G² + ε1)``,
  ``c ← β2 c + (1-β2) mean_m(G² + ε1)``, ``v = r cᵀ / mean(r)``;
* ``U = G / sqrt(v)``, clipped: ``U ← U / max(1, RMS(U) / d)`` (RMS per matrix);
* first moment ``m ← β1 m + (1-β1) U``;
* instability ``I = (U - m)² + ε2``, factored the same way with ``β3``:
  ``R ← β3 R + (1-β3) mean_n(I)``, ``C ← β3 C + (1-β3) mean_m(I)``,
  ``S = R Cᵀ / mean(R)``;
* update ``-lr (m / sqrt(S) + wd W)``.

Parameters that are not factored (fewer than two axes, or a path not matching
``factored``, e.g. stacked norm scales ``[L, d]``) keep a full second moment and
step with the clipped first moment, as in the reference implementation.  No
bias correction, no step count.  State bytes: :func:`came_state_bytes`.
Non-finite gradients: no state change, zero update.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import optax

from memlab.facts import measured
from memlab.model import path_str
from memlab.optim.base import register
from memlab.optim.adamw import with_state_dtype
from memlab.optim.galore import _compile, skip_nonfinite

DEFAULT_FACTORED = r"kernel|embed"


class FactoredState(NamedTuple):
    mu: jax.Array  # [..., m, n]
    row: jax.Array  # [..., m] second-moment row means
    col: jax.Array  # [..., n]
    res_row: jax.Array  # [..., m] instability row means
    res_col: jax.Array  # [..., n]


class FullState(NamedTuple):
    mu: jax.Array
    nu: jax.Array


class CameState(NamedTuple):
    leaves: tuple  # FactoredState or FullState per parameter


def _factored_mask(tree: Any, factored: Optional[str]) -> Tuple[bool, ...]:
    pat = _compile(factored, "factored", "came")
    return tuple(
        len(leaf.shape) >= 2 and (pat is None or pat.search(path_str(path)) is not None)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0])


def came_state_bytes(params: Any, learning_rate: float = 2e-4, factored: Optional[str] =
                     DEFAULT_FACTORED, state_dtype: Any = "float32", **_) -> int:
    """Exact bytes of ``came(...).init(params)``: per factored ``[..., m, n]`` leaf
    ``size + 2 * prod(batch) * (m + n)`` elements, per other leaf ``2 * size``."""
    it = jnp.dtype(state_dtype).itemsize
    n = 0
    for leaf, fac in zip(jax.tree_util.tree_leaves(params), _factored_mask(params, factored)):
        shape = tuple(leaf.shape)
        size = math.prod(shape)
        n += size + 2 * math.prod(shape[:-2]) * (shape[-2] + shape[-1]) if fac else 2 * size
    return n * it


def _rms(x: jax.Array, axes) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def _approx(row: jax.Array, col: jax.Array) -> jax.Array:
    """``1 / sqrt(r cᵀ / mean(r))`` from factored row / column means."""
    r = jax.lax.rsqrt(row / jnp.mean(row, axis=-1, keepdims=True))
    return r[..., :, None] * jax.lax.rsqrt(col)[..., None, :]


def _came_core(learning_rate, b1, b2, b3, eps1, eps2, clip_threshold, weight_decay, factored):
    def init(params):
        out = []
        for x, fac in zip(jax.tree_util.tree_leaves(params), _factored_mask(params, factored)):
            if fac:
                b, (m, n) = x.shape[:-2], x.shape[-2:]
                z = lambda *s: jnp.zeros(b + s, x.dtype)  # noqa: E731
                out.append(FactoredState(jnp.zeros_like(x), z(m), z(n), z(m), z(n)))
            else:
                out.append(FullState(jnp.zeros_like(x), jnp.zeros_like(x)))
        return CameState(tuple(out))

    def update(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("came: weight_decay needs params; call update(grads, state, params)")
        grads = updates
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        wleaves = jax.tree_util.tree_leaves(params) if params is not None else [None] * len(leaves)
        out, new = [], []
        for g, st, w in zip(leaves, state.leaves, wleaves):
            sq = jnp.square(g) + eps1
            if isinstance(st, FactoredState):
                row = b2 * st.row + (1 - b2) * jnp.mean(sq, axis=-1)
                col = b2 * st.col + (1 - b2) * jnp.mean(sq, axis=-2)
                u = _approx(row, col) * g
                u = u / jnp.maximum(_rms(u, (-2, -1)) / clip_threshold, 1.0)
                mu = b1 * st.mu + (1 - b1) * u
                res = jnp.square(u - mu) + eps2
                res_row = b3 * st.res_row + (1 - b3) * jnp.mean(res, axis=-1)
                res_col = b3 * st.res_col + (1 - b3) * jnp.mean(res, axis=-2)
                step = _approx(res_row, res_col) * mu
                new.append(FactoredState(mu, row, col, res_row, res_col))
            else:
                nu = b2 * st.nu + (1 - b2) * sq
                u = jax.lax.rsqrt(nu) * g
                u = u / jnp.maximum(_rms(u, None) / clip_threshold, 1.0)
                mu = b1 * st.mu + (1 - b1) * u
                step = mu
                new.append(FullState(mu, nu))
            upd = -learning_rate * step
            if weight_decay:
                upd = upd - learning_rate * weight_decay * w
            out.append(upd.astype(g.dtype))
        new_state = CameState(tuple(new))
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init, skip_nonfinite(update))


@register("came", state_bytes=came_state_bytes, plan=("train",),
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def came(learning_rate: float = 2e-4, b1: float = 0.9, b2: float = 0.999, b3: float = 0.9999,
         eps1: float = 1e-30, eps2: float = 1e-16, clip_threshold: float = 1.0,
         weight_decay: float = 0.0, factored: Optional[str] = DEFAULT_FACTORED,
         state_dtype: Any = "float32") -> optax.GradientTransformation:
    """CAME with the paper's defaults (β1, β2, β3) = (0.9, 0.999, 0.9999), ε = (1e-30, 1e-16).

    Args:
      clip_threshold: the update-clipping threshold ``d``.
      factored: regex on parameter paths; matching leaves with two or more axes
        get factored moments over their last two axes (None: every such leaf).
      state_dtype: dtype of all moments (see ``with_state_dtype``).
    """
    for name, v in (("b1", b1), ("b2", b2), ("b3", b3)):
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise ValueError(f"came: {name} must be in [0, 1), got {v!r}")
    for name, v in (("eps1", eps1), ("eps2", eps2), ("clip_threshold", clip_threshold)):
        if not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"came: {name} must be a positive number, got {v!r}")
    _compile(factored, "factored", "came")
    return with_state_dtype(_came_core(learning_rate, b1, b2, b3, eps1, eps2, clip_threshold,
                                       weight_decay, factored), state_dtype)
