"""APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level
Performance", MLSys 2025, arXiv:2412.05270).

For each weight matrix ``G`` of shape ``[..., m, n]`` (leading axes are a batch of
matrices, as under ``nn.scan``), a Gaussian random projection ``P`` (entries
``N(0, 1/r)``) maps the gradient to rank ``r`` along its shorter side:
``R = P G`` (``[..., r, n]``) when ``m <= n``, else ``R = G Pᵀ`` (``[..., m, r]``).
``P`` is never stored: it is regenerated from the stored PRNG key, the
parameter's index and ``step // update_proj_gap`` (:func:`random_projections`),
so it changes every ``update_proj_gap`` steps.  AdamW moments live in the
projected space; the bias-corrected Adam direction ``R̃ = m̂ / (sqrt(v̂) + eps)``
only yields a gradient scaling factor

* APOLLO: channel-wise, ``s_j = ||R̃[:, j]|| / ||R[:, j]||`` over the longer side;
* APOLLO-Mini: rank 1 and tensor-wise, ``s = ||R̃|| / ||R||``,

applied to the full-rank gradient, ``G̃ = G diag(s)``.  Fira's norm-growth limiter
bounds ``||G̃_t|| <= gamma ||G̃_{t-1}||``.  The update is ``-lr (scale G̃ + wd W)``.
Parameters that are not projected matrices (norms, embeddings, the output head)
use plain AdamW.  State: int32 count, the PRNG key, projected moments, one
limiter norm per matrix and full moments for the rest; see
:func:`apollo_state_bytes`.  Non-finite gradients: no state change, zero update.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from memlab.facts import measured
from memlab.optim.base import register
from memlab.optim.adamw import with_state_dtype
from memlab.optim.galore import (DEFAULT_EXCLUDE, DEFAULT_INCLUDE, MatrixLeaf, _check_common,
                                 _compile, _increment, check_rank, matrix_plan, skip_nonfinite,
                                 warn_if_nothing_projected)

SCALE_TYPES = ("channel", "tensor")
DEFAULT_RANK = 256


class ApolloState(NamedTuple):
    count: jax.Array  # int32 steps taken
    key: jax.Array  # the PRNG key the projections are drawn from
    mu: tuple  # per leaf: projected [..., r, n] / [..., m, r], or full size
    nu: tuple
    norm: tuple  # per projected leaf: limiter's previous ||G̃|| per matrix [...]; else None


def _key_bytes() -> int:
    from memlab.memory.bytes import tree_bytes
    return tree_bytes(jax.eval_shape(lambda: jax.random.PRNGKey(0)))


def random_projections(key: jax.Array, period: jax.Array, plan: Sequence[MatrixLeaf],
                       dtype=jnp.float32) -> tuple:
    """The Gaussian ``[..., r, min(m, n)]`` projections (entries ``N(0, 1/r)``) of every
    projected leaf of ``plan`` in ``period = step // update_proj_gap`` (None elsewhere).

    One draw per leaf, from ``fold_in(fold_in(key, period), leaf index)``: XLA can
    create and consume them one at a time, so only one lives in the step's temp.
    """
    k = jax.random.fold_in(key, period)
    return tuple(
        (jax.random.normal(jax.random.fold_in(k, i), lf.batch + (lf.rank, lf.side), jnp.float32)
         / math.sqrt(lf.rank)).astype(dtype) if lf.projected else None
        for i, lf in enumerate(plan))


def apollo_state_bytes(params: Any, learning_rate: float = 1e-3, rank: Optional[int] = None,
                       update_proj_gap: int = 200, scale: float = 1.0,
                       scale_type: str = "channel", include: Optional[str] = DEFAULT_INCLUDE,
                       exclude: Optional[str] = DEFAULT_EXCLUDE, state_dtype: Any = "float32",
                       **_) -> int:
    """Exact bytes of ``apollo(...).init(params)``.

    count (4) + key + ``itemsize * (2 * prod(low_shape) + prod(batch))`` per
    projected matrix + ``itemsize * 2 * size`` per other parameter.
    """
    plan = matrix_plan(params, rank, DEFAULT_RANK, include, exclude, "apollo")
    it = jnp.dtype(state_dtype).itemsize
    n = sum(2 * math.prod(lf.low_shape) + math.prod(lf.batch) if lf.projected else 2 * lf.size
            for lf in plan)
    return 4 + _key_bytes() + n * it


def apollo_mini_state_bytes(params: Any, learning_rate: float = 1e-3, update_proj_gap: int = 200,
                            scale: float = 128 ** 0.5, include: Optional[str] = DEFAULT_INCLUDE,
                            exclude: Optional[str] = DEFAULT_EXCLUDE,
                            state_dtype: Any = "float32", **_) -> int:
    """Exact bytes of ``apollo_mini(...).init(params)``: rank-1 moments per matrix."""
    return apollo_state_bytes(params, rank=1, include=include, exclude=exclude,
                              state_dtype=state_dtype)


def _apollo_core(learning_rate, rank, default_rank, update_proj_gap, scale, scale_type, b1, b2,
                 eps, weight_decay, limiter, seed, include, exclude, where):
    def plan_of(tree):
        return matrix_plan(tree, rank, default_rank, include, exclude, where)

    def init(params):
        plan = plan_of(params)
        warn_if_nothing_projected(plan, include, exclude, where)
        leaves = jax.tree_util.tree_leaves(params)
        zeros = tuple(jnp.zeros(lf.low_shape if lf.projected else lf.shape, x.dtype)
                      for x, lf in zip(leaves, plan))
        norm = tuple(jnp.zeros(lf.batch, x.dtype) if lf.projected else None
                     for x, lf in zip(leaves, plan))
        return ApolloState(jnp.zeros([], jnp.int32), jax.random.PRNGKey(seed), zeros,
                           tuple(jnp.zeros_like(z) for z in zeros), norm)

    def update(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError(f"{where}: weight_decay needs params; "
                             f"call update(grads, state, params)")
        plan = plan_of(updates)
        grads = updates
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        wleaves = jax.tree_util.tree_leaves(params) if params is not None else [None] * len(leaves)
        t = _increment(state.count)
        bc1 = 1 - b1 ** t.astype(jnp.float32)
        bc2 = 1 - b2 ** t.astype(jnp.float32)
        projections = random_projections(state.key, state.count // update_proj_gap, plan)
        out, mus, nus, norms = [], [], [], []
        for g, lf, mu, nu, prev, w, p in zip(leaves, plan, state.mu, state.nu, state.norm, wleaves,
                                             projections):
            if lf.projected:
                p = p.astype(g.dtype)
                r = (jnp.einsum("...rm,...mn->...rn", p, g) if lf.left
                     else jnp.einsum("...mn,...rn->...mr", g, p))
            else:
                r = g
            mu = b1 * mu + (1 - b1) * r
            nu = b2 * nu + (1 - b2) * jnp.square(r)
            direction = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
            if lf.projected:
                if scale_type == "channel":
                    axis = -2 if lf.left else -1
                    s = (jnp.linalg.norm(direction, axis=axis, keepdims=True)
                         / (jnp.linalg.norm(r, axis=axis, keepdims=True) + 1e-8))
                else:
                    s = (jnp.sqrt(jnp.sum(jnp.square(direction), axis=(-2, -1), keepdims=True))
                         / (jnp.sqrt(jnp.sum(jnp.square(r), axis=(-2, -1), keepdims=True)) + 1e-8))
                direction = g * s
                gnorm = jnp.sqrt(jnp.sum(jnp.square(direction), axis=(-2, -1)))
                if limiter is not None:
                    lim = jnp.maximum(gnorm / (prev + 1e-8), limiter) / limiter
                    lim = jnp.where(state.count > 0, lim, jnp.ones_like(lim))
                    direction = direction / lim[..., None, None]
                    gnorm = gnorm / lim
                direction = scale * direction
                norms.append(gnorm.astype(prev.dtype))
            else:
                norms.append(None)
            u = -learning_rate * direction
            if weight_decay:
                u = u - learning_rate * weight_decay * w
            out.append(u.astype(g.dtype))
            mus.append(mu.astype(g.dtype))
            nus.append(nu.astype(g.dtype))
        new_state = ApolloState(t, state.key, tuple(mus), tuple(nus), tuple(norms))
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init, skip_nonfinite(update))


def _check(learning_rate, update_proj_gap, scale, scale_type, limiter, include, exclude, where):
    _check_common(update_proj_gap, scale, where)
    if scale_type not in SCALE_TYPES:
        raise ValueError(f"{where}: scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
    if limiter is not None and (not isinstance(limiter, (int, float)) or limiter < 1):
        raise ValueError(f"{where}: limiter (norm-growth gamma) must be >= 1 or None, "
                         f"got {limiter!r}")
    _compile(include, "include", where)
    _compile(exclude, "exclude", where)


@register("apollo", state_bytes=apollo_state_bytes, plan=("train",),
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def apollo(learning_rate: float = 1e-3, rank: Optional[int] = None, update_proj_gap: int = 200,
           scale: float = 1.0, scale_type: str = "channel", b1: float = 0.9, b2: float = 0.999,
           eps: float = 1e-8, weight_decay: float = 0.0, limiter: Optional[float] = 1.01,
           seed: int = 0, include: Optional[str] = DEFAULT_INCLUDE,
           exclude: Optional[str] = DEFAULT_EXCLUDE,
           state_dtype: Any = "float32") -> optax.GradientTransformation:
    """APOLLO: rank-``r`` random-projection AdamW moments scale the full gradient.

    Args:
      rank: projection rank of every projected matrix; None: ``min(256, m, n)``
        each (the paper's 7B setting is 256). Above ``min(m, n)``: ValueError.
      update_proj_gap: steps between projection redraws (``T``).
      scale: multiplies the scaled gradient (the paper's ``alpha``).
      scale_type: ``"channel"`` (APOLLO) or ``"tensor"``.
      limiter: norm-growth limiter's ``gamma`` (1.01 in the paper); None disables it.
      seed: the PRNG key stored in the state.
      include / exclude: regexes on parameter paths choosing the projected matrices;
        the rest get plain AdamW.
    """
    check_rank(rank, "apollo")
    _check(learning_rate, update_proj_gap, scale, scale_type, limiter, include, exclude, "apollo")
    return with_state_dtype(_apollo_core(learning_rate, rank, DEFAULT_RANK, update_proj_gap,
                                         float(scale), scale_type, b1, b2, eps, weight_decay,
                                         limiter, seed, include, exclude, "apollo"), state_dtype)


@register("apollo_mini", state_bytes=apollo_mini_state_bytes, plan=("train",),
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def apollo_mini(learning_rate: float = 1e-3, update_proj_gap: int = 200,
                scale: float = 128 ** 0.5, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                weight_decay: float = 0.0, limiter: Optional[float] = 1.01, seed: int = 0,
                include: Optional[str] = DEFAULT_INCLUDE, exclude: Optional[str] = DEFAULT_EXCLUDE,
                state_dtype: Any = "float32") -> optax.GradientTransformation:
    """APOLLO-Mini: rank-1 projection, one tensor-wise scaling factor per matrix
    (``scale = sqrt(128)`` as in the paper)."""
    _check(learning_rate, update_proj_gap, scale, "tensor", limiter, include, exclude,
           "apollo_mini")
    return with_state_dtype(_apollo_core(learning_rate, 1, 1, update_proj_gap, float(scale),
                                         "tensor", b1, b2, eps, weight_decay, limiter, seed,
                                         include, exclude, "apollo_mini"), state_dtype)
