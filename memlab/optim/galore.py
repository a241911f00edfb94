"""GaLore: gradient low-rank projection (Zhao et al., "GaLore: Memory-Efficient LLM
Training by Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507).

Each weight matrix ``G`` of shape ``[..., m, n]`` (leading axes, as under
``nn.scan``, are a batch of matrices) is projected onto its top-``r`` singular
vectors: ``R = Pᵀ G`` with ``P = U[:, :r]`` (``[..., m, r]``) when ``m <= n``,
else ``R = G P`` with ``P = V[:, :r]`` (``[..., n, r]``).  ``P`` is recomputed
from the current gradient every ``update_proj_gap`` steps (an SVD under
``lax.cond`` on the step count, so the update stays jit-able).  Any base optax
optimizer (Adam by default, or a memlab optimizer such as ``adamw8bit``) runs on
the projected gradients; its update ``N`` is projected back and scaled,
``scale * P N`` (or ``scale * N Pᵀ``).  Parameters that are not matrices (norm
scales, biases) or whose path matches ``exclude`` (embeddings and the output
head by default; the paper projects attention and MLP weights only) go through
the base optimizer at full size.

State: an int32 step count, one projector per projected matrix, and the base
optimizer's state over the tree of projected gradients.  :func:`galore_state_bytes`
gives its exact size.  A step whose gradients are not all finite changes no
state and returns a zero update.

The module also holds the helpers the other low-rank optimizers share
(:func:`matrix_plan`, :func:`skip_nonfinite`).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import re
import warnings
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax
from jax import lax

from memlab.facts import measured
from memlab.model import path_str
from memlab.optim.base import register
from memlab.optim.adamw import with_state_dtype

DEFAULT_INCLUDE = r"kernel"
# int32 step count that saturates instead of wrapping (newer optax names it safe_increment)
_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment
DEFAULT_EXCLUDE = r"embed|lm_head"


# ----------------------------------------------------------------------------- shared helpers
@dataclasses.dataclass(frozen=True)
class MatrixLeaf:
    """How one parameter is treated: ``rank == 0`` means full size."""

    path: str
    shape: tuple
    rank: int = 0

    @property
    def projected(self) -> bool:
        return self.rank > 0

    @property
    def left(self) -> bool:
        """Project from the left (``Pᵀ G``) when the matrix has no more rows than columns."""
        return self.shape[-2] <= self.shape[-1]

    @property
    def batch(self) -> tuple:
        return tuple(self.shape[:-2])

    @property
    def side(self) -> int:
        """Length of the projected side: ``min(m, n)``."""
        return min(self.shape[-2], self.shape[-1])

    @property
    def low_shape(self) -> tuple:
        """Shape of the projected gradient: ``[..., r, n]`` or ``[..., m, r]``."""
        m, n = self.shape[-2:]
        return self.batch + ((self.rank, n) if self.left else (m, self.rank))

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _compile(pattern: Optional[str], argname: str, where: str):
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: {argname} must be a regex string or None, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {argname}={pattern!r} is not a valid regex ({e})") from None


def check_rank(rank: Optional[int], where: str) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"{where}: rank must be a positive int or None, got {rank!r}")


def matrix_plan(tree: Any, rank: Optional[int], default_rank: int, include: Optional[str],
                exclude: Optional[str], where: str) -> tuple:
    """One :class:`MatrixLeaf` per leaf of ``tree`` (arrays or ShapeDtypeStructs).

    A leaf is projected when it has at least two axes, its path matches
    ``include`` and does not match ``exclude``.  Its rank is ``rank``, or
    ``min(default_rank, m, n)`` when ``rank`` is None; a rank above ``min(m, n)``
    raises a ValueError naming the parameter and its largest possible rank.
    """
    check_rank(rank, where)
    inc = _compile(include, "include", where)
    exc = _compile(exclude, "exclude", where)
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = path_str(path)
        shape = tuple(leaf.shape)
        matrix = (len(shape) >= 2 and (inc is None or inc.search(name) is not None)
                  and (exc is None or exc.search(name) is None))
        if not matrix:
            out.append(MatrixLeaf(name, shape, 0))
            continue
        side = min(shape[-2:])
        r = min(default_rank, side) if rank is None else rank
        if r > side:
            raise ValueError(
                f"{where}: rank={r} is larger than parameter {name!r} of shape {shape} allows "
                f"(max rank min(m, n) = {side}); lower rank, or exclude the parameter with "
                f"exclude=")
        out.append(MatrixLeaf(name, shape, r))
    return tuple(out)


def warn_if_nothing_projected(plan: Sequence[MatrixLeaf], include, exclude, where: str) -> None:
    """A typo in ``include`` would otherwise silently turn the optimizer into its full-size base."""
    if plan and not any(lf.projected for lf in plan):
        warnings.warn(f"{where}: no parameter is projected (include={include!r}, "
                      f"exclude={exclude!r} matched no matrix); every parameter is optimized "
                      f"at full size", stacklevel=3)


def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def skip_nonfinite(step):
    """Wrap ``step(grads, state, params) -> (updates, state)``: when any gradient is
    not finite, return zero updates and the state unchanged (one ``lax.cond``, so
    the step itself never runs on NaN/inf inputs)."""
    def update(grads, state, params=None):
        def skip(operands):
            g, s, _ = operands
            return jax.tree_util.tree_map(jnp.zeros_like, g), s

        return lax.cond(all_finite(grads), lambda ops: step(*ops), skip, (grads, state, params))
    return update


# ----------------------------------------------------------------------------- GaLore
class GaLoreState(NamedTuple):
    count: jax.Array  # int32 steps taken
    projectors: tuple  # per leaf: [..., min(m, n), r] or None (full size)
    base: Any  # the base optimizer's state over the projected gradients


def _projector(g: jax.Array, leaf: MatrixLeaf, dtype) -> jax.Array:
    """Top-r singular vectors of ``g`` on its shorter side, ``[..., min(m, n), r]``."""
    u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    p = u[..., :, :leaf.rank] if leaf.left else jnp.swapaxes(vh, -1, -2)[..., :, :leaf.rank]
    return p.astype(dtype)


def project(p: jax.Array, g: jax.Array, leaf: MatrixLeaf) -> jax.Array:
    """``Pᵀ G`` (``[..., r, n]``) or ``G P`` (``[..., m, r]``)."""
    if leaf.left:
        return jnp.einsum("...mr,...mn->...rn", p, g.astype(p.dtype))
    return jnp.einsum("...mn,...nr->...mr", g.astype(p.dtype), p)


def project_back(p: jax.Array, n: jax.Array, leaf: MatrixLeaf) -> jax.Array:
    """``P N`` or ``N Pᵀ``: a projected update back at full shape ``[..., m, n]``."""
    if leaf.left:
        return jnp.einsum("...mr,...rn->...mn", p, n.astype(p.dtype))
    return jnp.einsum("...mr,...nr->...mn", n.astype(p.dtype), p)


def _resolve_base(base, learning_rate, base_kwargs=None) -> optax.GradientTransformation:
    if base_kwargs is not None and not isinstance(base, str):
        raise ValueError("galore: base_kwargs only applies to a named base (base='adamw8bit'); "
                         "build a GradientTransformation base yourself instead")
    if base is None:
        return optax.adam(learning_rate)
    if isinstance(base, str):
        from memlab import optim
        kwargs = dict(base_kwargs or {})
        factory = optim.OPTIMIZERS.get(base)
        try:
            accepts_wd = "weight_decay" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepts_wd = False
        if accepts_wd:  # GaLore applies weight decay at full size, never in the projected space
            kwargs.setdefault("weight_decay", 0.0)
        return factory(learning_rate=learning_rate, **kwargs)
    if isinstance(base, optax.GradientTransformation) or (
            hasattr(base, "init") and hasattr(base, "update")):
        return base
    raise TypeError(f"galore: base must be None, an optimizer name or an "
                    f"optax.GradientTransformation, got {type(base).__name__}")


def _check_common(update_proj_gap, scale, where):
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) \
            or update_proj_gap <= 0:
        raise ValueError(f"{where}: update_proj_gap must be a positive int (steps between "
                         f"projector refreshes), got {update_proj_gap!r}")
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{where}: scale must be a positive finite number, got {scale!r}")


def galore_state_bytes(params: Any, learning_rate: float = 1e-3, rank: Optional[int] = None,
                       update_proj_gap: int = 200, scale: float = 0.25,
                       base: Union[None, str, optax.GradientTransformation] = None,
                       weight_decay: float = 0.0, include: Optional[str] = DEFAULT_INCLUDE,
                       exclude: Optional[str] = DEFAULT_EXCLUDE,
                       state_dtype: Any = "float32", base_kwargs: Optional[dict] = None,
                       **_) -> int:
    """Exact bytes of ``galore(...).init(params)``.

    count (4) + projectors ``prod(batch) * min(m, n) * r`` in ``state_dtype`` +
    the base optimizer's state over the projected tree: Adam's ``2 * N * itemsize
    + 4`` by default, the registered formula for a named base, and
    ``tree_bytes(eval_shape(base.init, ...))`` for a GradientTransformation.
    """
    from memlab.memory.bytes import tree_bytes
    plan = matrix_plan(params, rank, 128, include, exclude, "galore")
    dt = jnp.dtype(state_dtype)
    proj = sum(math.prod(lf.batch) * lf.side * lf.rank for lf in plan if lf.projected)
    low = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params),
        [jax.ShapeDtypeStruct(lf.low_shape if lf.projected else lf.shape, dt) for lf in plan])
    if base is None:
        n_low = sum(math.prod(lf.low_shape) if lf.projected else lf.size for lf in plan)
        base_bytes = 2 * n_low * dt.itemsize + 4
    elif isinstance(base, str):
        from memlab import optim
        base_bytes = optim.state_bytes(base, low, **dict(base_kwargs or {}))
    else:
        base_bytes = tree_bytes(jax.eval_shape(_resolve_base(base, learning_rate).init, low))
    return 4 + proj * dt.itemsize + base_bytes


def _galore_core(learning_rate, rank, update_proj_gap, scale, inner, weight_decay, include,
                 exclude) -> optax.GradientTransformation:

    def low_tree(tree, plan, projectors=None):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        out = []
        for x, lf, p in zip(leaves, plan, projectors or (None,) * len(plan)):
            if not lf.projected:
                out.append(x)
            elif p is None:  # init: zeros of the projected shape
                out.append(jnp.zeros(lf.low_shape, x.dtype))
            else:
                out.append(project(p, x, lf))
        return jax.tree_util.tree_unflatten(treedef, out)

    def init(params):
        plan = matrix_plan(params, rank, 128, include, exclude, "galore")
        warn_if_nothing_projected(plan, include, exclude, "galore")
        leaves = jax.tree_util.tree_leaves(params)
        projectors = tuple(jnp.zeros(lf.batch + (lf.side, lf.rank), x.dtype) if lf.projected
                           else None for x, lf in zip(leaves, plan))
        return GaLoreState(jnp.zeros([], jnp.int32), projectors,
                           inner.init(low_tree(params, plan)))

    def update(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("galore: weight_decay needs params; call update(grads, state, params)")
        plan = matrix_plan(updates, rank, 128, include, exclude, "galore")
        grads = updates
        leaves, treedef = jax.tree_util.tree_flatten(grads)

        def refresh(old):
            return tuple(_projector(g, lf, p.dtype) if lf.projected else None
                         for g, lf, p in zip(leaves, plan, old))

        projectors = lax.cond(state.count % update_proj_gap == 0, refresh, lambda old: old,
                              state.projectors)
        low_updates, base_state = inner.update(low_tree(grads, plan, projectors), state.base, None)
        out = []
        for u, lf, p, g in zip(jax.tree_util.tree_leaves(low_updates), plan, projectors, leaves):
            full = (scale * project_back(p, u, lf)) if lf.projected else u
            out.append(full.astype(g.dtype))
        if weight_decay:
            out = [u - learning_rate * weight_decay * w
                   for u, w in zip(out, jax.tree_util.tree_leaves(params))]
        new_state = GaLoreState(_increment(state.count), projectors, base_state)
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformation(init, skip_nonfinite(update))


@register("galore", state_bytes=galore_state_bytes, plan=("train",),
          quality_loss=measured(), update_bytes=measured(), fused_update_bytes=measured())
def galore(learning_rate: float = 1e-3, rank: Optional[int] = None, update_proj_gap: int = 200,
           scale: float = 0.25, base: Union[None, str, optax.GradientTransformation] = None,
           weight_decay: float = 0.0, include: Optional[str] = DEFAULT_INCLUDE,
           exclude: Optional[str] = DEFAULT_EXCLUDE, state_dtype: Any = "float32",
           base_kwargs: Optional[dict] = None) -> optax.GradientTransformation:
    """GaLore over any base optimizer.

    Args:
      learning_rate: the default Adam base's learning rate (and a named base's);
        also scales ``weight_decay``. A GradientTransformation ``base`` carries its own.
      rank: projection rank for every projected matrix; None: ``min(128, m, n)`` each.
        A rank above ``min(m, n)`` of some matrix raises a ValueError naming it.
      update_proj_gap: steps between projector refreshes (the paper's ``T``).
      scale: the paper's ``alpha``, applied to projected-back updates only.
      base: None (``optax.adam(learning_rate)``), a registered optimizer name
        (``"adamw8bit"`` for 8-bit GaLore), or a GradientTransformation. It sees
        the projected gradients and no params: weight decay belongs here, not in base.
      base_kwargs: extra arguments of a named base (``{"block_size": 256}``); a named
        base that takes ``weight_decay`` is built with ``weight_decay=0``.
      weight_decay: decoupled, ``- learning_rate * weight_decay * w`` at full size.
      include / exclude: regexes on parameter paths (``layers/attn/q_proj/kernel``)
        choosing the matrices to project; the others use the base at full size.
      state_dtype: dtype of projectors and of the base's inputs (see ``with_state_dtype``).
    """
    check_rank(rank, "galore")
    _check_common(update_proj_gap, scale, "galore")
    inner = _resolve_base(base, learning_rate, base_kwargs)
    _compile(include, "include", "galore")
    _compile(exclude, "exclude", "galore")
    return with_state_dtype(_galore_core(learning_rate, rank, update_proj_gap, float(scale), inner,
                                         weight_decay, include, exclude), state_dtype)


__all__: Sequence[str] = ("galore", "galore_state_bytes", "GaLoreState", "matrix_plan",
                          "MatrixLeaf", "project", "project_back", "skip_nonfinite")
