"""Sharding strategies over a ``jax.sharding.Mesh``: data parallel, FSDP / ZeRO-3,
Megatron tensor parallel, sequence (context) parallel, and their combinations.

* Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models" (SC 2020): stage 3 (FSDP) splits params, gradients and
  optimizer state over the data-parallel devices.
* Shoeybi et al., "Megatron-LM" (2019): column-parallel q/k/v/gate/up (output
  features split), row-parallel o/down (input features split), vocab-parallel
  embedding and head.
* Li et al., "Sequence Parallelism: Long Sequence Training from System
  Perspective" (2021) and Liu et al., "Ring Attention with Blockwise
  Transformers" (2023): activations split over the sequence, attention by
  passing KV blocks around a ring (:mod:`memlab.nn.ring_attention`).

A :class:`Strategy` is a small frozen dataclass naming mesh axes; the rules
that turn it into a ``PartitionSpec`` per parameter are pure functions of the
parameter path and shape (:func:`param_spec`), so params, gradients and
optimizer state (also memlab's 8-bit states and quantized ``QArray`` params)
get shardings without any model change.  Everything runs through GSPMD: a
``NamedSharding`` on each input and ``with_sharding_constraint`` on
activations; XLA inserts the collectives.  Build meshes for this with
:func:`mesh` (``AxisType.Auto`` axes; jax >= 0.9 defaults to Explicit).

    mesh = ml.shard.mesh((4, 2), ("data", "model"))
    model = ml.passes.shard(mesh, ml.shard.fsdp_tp("data", "model"))(model)

KV caches follow the same rules (:func:`cache_specs`): rows over the batch axes,
KV heads over the tensor axis (Megatron: each device attends with, and caches,
its own heads).  A policy's state is laid out per leaf; :func:`cache_roles`
finds each leaf's row and head axes by probing the policy's ``init`` at doubled
batch and doubled head counts, so codes, scales, zero points, positions,
low-rank factors and head-group latents all split with their rows and heads,
and leaves shared by all heads (KVQuant's per-row codebooks, fill counts) or by
all rows stay whole along that mesh axis.  The sequence (context) axis never
splits a cache.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memlab.model import path_str

__all__ = ["Strategy", "dp", "fsdp", "tp", "fsdp_tp", "sp", "mesh", "param_spec",
           "param_specs", "state_specs", "shardings", "put", "per_device_bytes",
           "shard_bytes", "check_strategy", "batch_spec", "cache_roles", "cache_specs",
           "check_cache_policy"]

COLUMN = (r"(^|/)(q|k|v|gate|up)_proj/kernel$", r"(^|/)lm_head/kernel$")
ROW = (r"(^|/)(o|down)_proj/kernel$",)
VOCAB = (r"(^|/)embed/embedding$",)
STACKED = r"^layers/"  # nn.scan params: a leading layer axis [L, ...] that is never split


def _axes(x) -> tuple:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    if isinstance(x, (tuple, list)) and all(isinstance(a, str) for a in x):
        return tuple(x)
    raise TypeError(f"mesh axes must be a name or a tuple of names, got {x!r}")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """Which mesh axes split what.

    * ``batch``: axes the batch dimension of activations is split over;
    * ``fsdp``: axes params / gradients / optimizer state are split over (ZeRO-3): each
      leaf of at least ``min_size`` elements on its largest dimension divisible by the
      axes' size (never the stacked layer axis of scanned params); smaller leaves stay
      replicated;
    * ``tensor``: the Megatron axis: ``column`` paths split their last (output) axis,
      ``row`` paths their input axis, ``vocab`` paths their first (vocab) axis;
    * ``context``: the sequence axis of activations (sequence / context parallelism;
      attention through :func:`memlab.nn.ring_attention.ring_attention`).
    """

    name: str
    batch: tuple = ()
    fsdp: tuple = ()
    tensor: Optional[str] = None
    context: Optional[str] = None
    min_size: int = 1024
    column: tuple = COLUMN
    row: tuple = ROW
    vocab: tuple = VOCAB
    stacked: str = STACKED

    def __post_init__(self):
        for f in ("batch", "fsdp"):
            object.__setattr__(self, f, _axes(getattr(self, f)))
        for f in ("column", "row", "vocab"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
            for rx in getattr(self, f):
                try:
                    re.compile(rx)
                except re.error as e:
                    raise ValueError(f"Strategy.{f}: regex {rx!r} does not compile ({e})") from None
        for f in ("tensor", "context"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, str):
                raise TypeError(f"Strategy.{f} must be a mesh axis name or None, got {v!r}")
        m = self.min_size
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"Strategy.min_size must be a non-negative int, got {self.min_size!r}")
        used = list(self.fsdp) + [a for a in (self.tensor,) if a]
        if len(set(used)) != len(used):
            raise ValueError(f"Strategy {self.name}: an axis is used twice for params "
                             f"(fsdp={self.fsdp}, tensor={self.tensor!r})")
        if self.context is not None and (self.context in self.batch or self.context == self.tensor):
            raise ValueError(f"Strategy {self.name}: the context axis {self.context!r} is also "
                             "the batch or tensor axis; give sequence parallelism its own axis")

    @property
    def axes(self) -> tuple:
        """Every mesh axis the strategy names."""
        out = list(self.batch) + list(self.fsdp) + [a for a in (self.tensor, self.context) if a]
        return tuple(dict.fromkeys(out))


def dp(data="data") -> Strategy:
    """Data parallel: batch split over ``data``, params replicated."""
    return Strategy("dp", batch=data)


def fsdp(data="data", min_size: int = 1024) -> Strategy:
    """FSDP / ZeRO-3: batch and every leaf of >= ``min_size`` elements split over ``data``."""
    return Strategy("fsdp", batch=data, fsdp=data, min_size=min_size)


def tp(model="model", data=None) -> Strategy:
    """Megatron tensor parallel over ``model`` (optionally data parallel over ``data``)."""
    return Strategy("tp", batch=data, tensor=model)


def fsdp_tp(data="data", model="model", min_size: int = 1024) -> Strategy:
    """2-D: Megatron over ``model``, FSDP (and the batch) over ``data``."""
    return Strategy("fsdp_tp", batch=data, fsdp=data, tensor=model, min_size=min_size)


def sp(context="context", data=None, fsdp: bool = False, min_size: int = 1024) -> Strategy:
    """Sequence / context parallel: sequence over ``context`` (ring attention), batch over
    ``data``; ``fsdp=True`` also splits params over ``data`` and ``context`` (ZeRO-3)."""
    data_axes = _axes(data)
    return Strategy("sp", batch=data_axes, context=context,
                    fsdp=(data_axes + _axes(context)) if fsdp else (), min_size=min_size)


def mesh(shape: Sequence[int], names: Sequence[str], devices=None) -> Mesh:
    """``jax.make_mesh`` with ``AxisType.Auto`` axes (GSPMD), over ``devices`` if given."""
    from jax.sharding import AxisType
    shape, names = tuple(shape), tuple(names)
    if len(shape) != len(names):
        raise ValueError(f"mesh: shape {shape} and names {names} differ in length")
    n = math.prod(shape)
    avail = len(jax.devices()) if devices is None else len(devices)
    if n != avail:
        raise ValueError(f"mesh: shape {shape} needs {n} devices, {avail} are available; "
                         f"choose axis sizes whose product is {avail}")
    kw = {} if devices is None else {"devices": devices}
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), **kw)


def check_strategy(mesh: Mesh, strategy: Strategy) -> None:
    """A clear error when ``strategy`` names an axis ``mesh`` lacks."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"shard: mesh must be a jax.sharding.Mesh (ml.shard.mesh(...)), got "
                        f"{type(mesh).__name__}")
    if not isinstance(strategy, Strategy):
        raise TypeError(f"shard: strategy must be a memlab.shard.Strategy (ml.shard.dp(), "
                        f"fsdp(), tp(), fsdp_tp(), sp()), got {type(strategy).__name__}")
    from jax.sharding import AxisType
    types = getattr(mesh, "axis_types", None) or ()
    if any(t != AxisType.Auto for t in types):
        raise ValueError(f"shard: the mesh has axis types {tuple(types)}; the shard pass is "
                         "GSPMD code and needs AxisType.Auto axes: build the mesh with "
                         "ml.shard.mesh(shape, names) or jax.make_mesh(..., "
                         "axis_types=(AxisType.Auto,) * n)")
    missing = [a for a in strategy.axes if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"shard: strategy {strategy.name} uses mesh axis {missing[0]!r} but the "
                         f"mesh has axes {tuple(mesh.axis_names)}; build the mesh with that axis "
                         f"name or pass the strategy the mesh's names")


def _size(mesh: Mesh, axes) -> int:
    return math.prod(mesh.shape[a] for a in _axes(axes))


def _feasible(dims: Sequence[int], size: int) -> str:
    """The axis sizes nearest to ``size`` that divide one of ``dims``."""
    ok = sorted({n for n in range(1, 2 * size + 1) if any(d % n == 0 for d in dims)})
    below = max(n for n in ok if n <= size)
    above = [n for n in ok if n > size]
    return f"{below}" + (f" or {above[0]}" if above else "")


def _role(strategy: Strategy, path: str) -> Optional[str]:
    for role in ("column", "row", "vocab"):
        if any(re.search(rx, path) for rx in getattr(strategy, role)):
            return role
    return None


def _tensor_axis(role: Optional[str], ndim: int) -> Optional[int]:
    if role == "column" and ndim >= 2:
        return ndim - 1
    if role == "row" and ndim >= 2:
        return ndim - 2
    if role == "vocab" and ndim >= 1:
        return 0
    return None


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, strategy: Strategy,
               strict: bool = True) -> P:
    """The ``PartitionSpec`` of the parameter at ``path``.

    ``strict`` (plain float params) raises a ValueError naming the parameter, the axis
    and the nearest feasible axis size when the mesh does not divide the dimension a
    rule needs; non-strict (quantized storage, optimizer state) falls back to fewer
    splits.
    """
    shape = tuple(int(s) for s in shape)
    spec: list = [None] * len(shape)
    stacked = bool(re.search(strategy.stacked, path)) and len(shape) >= 2
    if strategy.tensor is not None:
        ax = _tensor_axis(_role(strategy, path), len(shape))
        if ax is not None and not (stacked and ax == 0):
            n = mesh.shape[strategy.tensor]
            if shape[ax] % n == 0:
                spec[ax] = strategy.tensor
            elif strict:
                raise ValueError(
                    f"shard: parameter {path!r} has dimension {shape[ax]} (axis {ax} of "
                    f"{list(shape)}), not divisible by the tensor-parallel mesh axis "
                    f"{strategy.tensor!r} of size {n}; the nearest feasible "
                    f"{strategy.tensor!r} size is {_feasible([shape[ax]], n)}")
    if strategy.fsdp and math.prod(shape) >= strategy.min_size:
        n = _size(mesh, strategy.fsdp)
        cands = [i for i in range(len(shape)) if spec[i] is None and not (stacked and i == 0)]
        ok = [i for i in cands if shape[i] % n == 0]
        if ok:
            best = max(ok, key=lambda i: (shape[i], -i))
            spec[best] = strategy.fsdp[0] if len(strategy.fsdp) == 1 else strategy.fsdp
        elif strict and n > 1:
            raise ValueError(
                f"shard: FSDP cannot split parameter {path!r} of shape {list(shape)}: no "
                f"dimension {[shape[i] for i in cands]} is divisible by mesh axes "
                f"{strategy.fsdp} of size {n}; the nearest feasible size is "
                f"{_feasible([shape[i] for i in cands] or [1], n)} (or raise min_size above "
                f"{math.prod(shape)} to keep it replicated)")
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _is_qarray(x) -> bool:
    from memlab.quant.qarray import QArray
    return isinstance(x, QArray)


def _storage_spec(path: str, x, logical: tuple, lspec: P, mesh: Mesh, strategy: Strategy) -> P:
    """A QArray storage array (codes, scales) inherits its kernel's split where the
    shapes line up and the mesh divides them; everything else is replicated or FSDP-split."""
    shape = tuple(x.shape)
    lspec = tuple(lspec) + (None,) * (len(logical) - len(tuple(lspec)))
    spec: list = [None] * len(shape)
    if len(shape) == len(logical):
        for i, ax in enumerate(lspec):
            if ax is not None and shape[i] % _size(mesh, ax) == 0:
                spec[i] = ax
    elif len(shape) == len(logical) - 1 and lspec and lspec[-1] is not None:
        # per-output-channel vectors [..., N]
        if shape and shape[-1] == logical[-1] and shape[-1] % _size(mesh, lspec[-1]) == 0:
            spec[-1] = lspec[-1]
    used = {a for s in spec if s is not None for a in _axes(s)}
    if (strategy.fsdp and not used.intersection(strategy.fsdp)
            and math.prod(shape) >= strategy.min_size):
        rest = Strategy("storage", fsdp=strategy.fsdp, min_size=strategy.min_size,
                        stacked=strategy.stacked)
        extra = tuple(param_spec(path, shape, mesh, rest, strict=False))
        for i, ax in enumerate(extra):
            if ax is not None and spec[i] is None:
                spec[i] = ax
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def param_specs(params, mesh: Mesh, strategy: Strategy):
    """``PartitionSpec`` per leaf of ``params`` (QArray storage arrays included)."""
    check_strategy(mesh, strategy)

    def one(path, x):
        name = path_str(path)
        if _is_qarray(x):
            logical = tuple(x.shape)
            lspec = param_spec(name, logical, mesh, strategy, strict=False)
            return jax.tree_util.tree_map(
                lambda a: _storage_spec(name, a, logical, lspec, mesh, strategy), x)
        if not hasattr(x, "shape"):
            return None
        floating = jnp.issubdtype(x.dtype, jnp.floating)
        return param_spec(name, x.shape, mesh, strategy, strict=floating)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_qarray)


def _leading_split(shape, axes_options, mesh, min_size) -> P:
    """Split the leading dimension over the first axis group in ``axes_options`` that
    divides it (optimizer-state blocks ``[n_blocks, ...]``)."""
    if not shape or math.prod(shape) < min_size:
        return P()
    for axes in axes_options:
        if axes and shape[0] % _size(mesh, axes) == 0:
            return P(axes[0] if len(axes) == 1 else axes)
    return P()


def _spec_axes(spec: P) -> tuple:
    out = []
    for s in tuple(spec):
        out += list(_axes(s)) if s is not None else []
    return tuple(out)


def state_specs(state, params, mesh: Mesh, strategy: Strategy):
    """``PartitionSpec`` per leaf of an optimizer state for ``params``.

    Every subtree shaped like ``params`` (Adam's ``mu``/``nu``; memlab's 8-bit and
    4-bit states, whose per-parameter nodes are ``QBlocks``/``QRank1`` tuples) is
    matched parameter by parameter: a leaf with the parameter's shape takes its spec;
    other leaves (quantized blocks) split their leading dimension over the axes the
    parameter is split over, when divisible, else stay replicated; scalars (step
    counts) are replicated.
    """
    pspecs = param_specs(params, mesh, strategy)
    pflat, ptree = jax.tree_util.tree_flatten(params, is_leaf=_is_qarray)
    sflat = ptree.flatten_up_to(pspecs)
    min_size = strategy.min_size

    def matches(node) -> bool:
        if isinstance(node, (jax.Array, jax.ShapeDtypeStruct)) or node is None:
            return False
        try:
            ptree.flatten_up_to(node)
            return True
        except (ValueError, TypeError):
            return False

    def for_param(sub, p, spec):
        axes = _spec_axes(spec) if not _is_qarray(p) else ()
        options = [axes] + ([strategy.fsdp] if strategy.fsdp and axes != strategy.fsdp else [])

        def leaf(x):
            if not hasattr(x, "shape"):
                return None
            if not _is_qarray(p) and tuple(x.shape) == tuple(p.shape):
                return spec
            return _leading_split(tuple(x.shape), options, mesh, min_size)
        return jax.tree_util.tree_map(leaf, sub)

    def visit(node):
        if matches(node):
            subs = ptree.flatten_up_to(node)
            return ptree.unflatten([for_param(s, p, sp_) for s, p, sp_ in zip(subs, pflat, sflat)])
        if hasattr(node, "shape"):
            if node.ndim == 0:
                return P()
            rest = Strategy("state", fsdp=strategy.fsdp, min_size=min_size)
            return param_spec("", node.shape, mesh, rest, strict=False)
        return node

    return jax.tree_util.tree_map(visit, state, is_leaf=lambda n: matches(n) or hasattr(n, "shape"))


def shardings(specs, mesh: Mesh):
    """``NamedSharding`` per ``PartitionSpec`` leaf."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, P))


def put(tree, specs, mesh: Mesh):
    """``jax.device_put`` every leaf with its spec (arrays), or attach the sharding
    (``jax.ShapeDtypeStruct``)."""
    def one(x, s):
        sh = NamedSharding(mesh, s)
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
        if not sh.is_fully_addressable:  # multi-host: every process holds the same value
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, sh, lambda idx: host[idx])
        return jax.device_put(x, sh)
    flat_s, _ = jax.tree_util.tree_flatten(specs, is_leaf=lambda s: isinstance(s, P))
    flat_x, treedef = jax.tree_util.tree_flatten(tree)
    if len(flat_s) != len(flat_x):
        raise ValueError(f"put: {len(flat_x)} leaves but {len(flat_s)} specs")
    return treedef.unflatten([one(x, s) for x, s in zip(flat_x, flat_s)])


def shard_bytes(x, spec: P, mesh: Mesh) -> int:
    """Bytes of one device's shard of ``x`` under ``spec`` (sub-byte dtypes packed)."""
    from memlab.memory.bytes import array_bytes
    shape = NamedSharding(mesh, spec).shard_shape(tuple(x.shape))
    return array_bytes(jax.ShapeDtypeStruct(shape, x.dtype))


def per_device_bytes(tree, specs, mesh: Mesh) -> int:
    """Exact bytes one device holds of ``tree`` under ``specs``."""
    flat_s = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
    flat_x = jax.tree_util.tree_leaves(tree)
    if len(flat_s) != len(flat_x):
        raise ValueError(f"per_device_bytes: {len(flat_x)} leaves but {len(flat_s)} specs")
    return sum(shard_bytes(x, s, mesh) for x, s in zip(flat_x, flat_s))


def batch_spec(mesh: Mesh, strategy: Strategy, shape: Sequence[int], what: str = "tokens",
               seq_axis: bool = True) -> P:
    """``P(batch axes, context axis)`` for an activation ``[B, T, ...]``, with a clear
    error when the mesh does not divide B or T."""
    shape = tuple(shape)
    spec: list = [None] * min(len(shape), 2)
    if strategy.batch and shape:
        n = _size(mesh, strategy.batch)
        if shape[0] % n:
            raise ValueError(f"shard: {what} batch {shape[0]} is not divisible by the data "
                             f"axes {strategy.batch} of size {n}; use a batch that is a "
                             f"multiple of {n} (nearest: {n * max(1, round(shape[0] / n))})")
        spec[0] = strategy.batch[0] if len(strategy.batch) == 1 else strategy.batch
    if seq_axis and strategy.context and len(shape) >= 2:
        n = mesh.shape[strategy.context]
        if shape[1] % n:
            raise ValueError(f"shard: {what} length {shape[1]} is not divisible by the context "
                             f"axis {strategy.context!r} of size {n}; use a sequence length "
                             f"that is a multiple of {n} "
                             f"(nearest: {n * max(1, round(shape[1] / n))})")
        spec[1] = strategy.context
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


@dataclasses.dataclass(frozen=True)
class Sharded:
    """A mesh and a strategy, as recorded on a sharded model (``model.extra("shard")``):
    shardings and exact per-device bytes for params, optimizer states and batches."""

    mesh: Mesh
    strategy: Strategy

    def param_specs(self, params):
        return param_specs(params, self.mesh, self.strategy)

    def state_specs(self, state, params):
        return state_specs(state, params, self.mesh, self.strategy)

    def put_params(self, params):
        return put(params, self.param_specs(params), self.mesh)

    def constrain(self, tree, specs):
        """``with_sharding_constraint`` of every leaf of ``tree`` to its spec (under jit)."""
        flat_s = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
        flat_x, treedef = jax.tree_util.tree_flatten(tree)
        return treedef.unflatten([jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, s))
                                  for x, s in zip(flat_x, flat_s)])

    def put_state(self, state, params):
        """Shard an optimizer state of ``params`` (``tx.init(params)``)."""
        return put(state, self.state_specs(state, params), self.mesh)

    def batch_spec(self, shape, what: str = "tokens", seq_axis: bool = True) -> P:
        return batch_spec(self.mesh, self.strategy, shape, what, seq_axis)

    def put_batch(self, tokens, seq_axis: bool = False):
        """Tokens ``[B, T(+1)]`` split over the batch axes (and the context axis when
        ``seq_axis``)."""
        spec = self.batch_spec(tokens.shape, seq_axis=seq_axis)
        return put(tokens, spec, self.mesh)

    def param_bytes(self, params) -> int:
        return per_device_bytes(params, self.param_specs(params), self.mesh)

    def state_bytes(self, state, params) -> int:
        return per_device_bytes(state, self.state_specs(state, params), self.mesh)

    def batch_bytes(self, tokens, seq_axis: bool = False) -> int:
        return per_device_bytes(tokens, self.batch_spec(tokens.shape, seq_axis=seq_axis), self.mesh)

    def cache_specs(self, cache):
        """``PartitionSpec`` per leaf of a KV cache (:func:`cache_specs`)."""
        return cache_specs(cache, self.mesh, self.strategy)

    def put_cache(self, cache):
        """Place a KV cache (``memlab.generate.make_cache(model, batch, max_len)``): rows over the
        batch axes, KV heads over the tensor axis (``ShapeDtypeStruct`` leaves get the
        sharding attached)."""
        return put(cache, self.cache_specs(cache), self.mesh)

    def make_cache(self, model, batch: int, max_len: int, lengths: int = 0):
        """``memlab.generate.make_cache(model, batch, max_len, lengths)`` allocated in its shards: each
        device creates only its own part (no device ever holds the whole cache)."""
        from memlab.generate import make_cache

        def fn():
            return make_cache(model, batch, max_len, lengths)
        out = shardings(self.cache_specs(jax.eval_shape(fn)), self.mesh)
        return jax.jit(fn, out_shardings=out)()

    def cache_bytes(self, cache) -> int:
        """Exact bytes one device holds of ``cache`` under :meth:`cache_specs`."""
        return per_device_bytes(cache, self.cache_specs(cache), self.mesh)


# ---------------------------------------------------------------------------
# KV caches: batch over the data axes, KV heads over the tensor axis
# ---------------------------------------------------------------------------
BATCH, HEADS = "batch", "heads"   # axis roles of a cache leaf


def _probe_dims(dims, **kw):
    import dataclasses as dc
    return dc.replace(dims, **kw)


def _state_shapes(policy, dims):
    """The stacked state of ``policy`` for ``dims`` as ``ShapeDtypeStruct`` leaves."""
    if policy.cross_layer:
        return jax.eval_shape(lambda: policy.init_stacked(dims))
    one = jax.eval_shape(lambda: policy.init(dims))
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((dims.n_layers,) + tuple(a.shape), a.dtype), one)


def _axis_of(base, probed, size_ok) -> Optional[int]:
    """The one axis that doubled between shapes ``base`` and ``probed`` (all others equal)
    and whose base size passes ``size_ok``; None when the shape did not change or changed
    any other way (e.g. a flattened axis: never split)."""
    if len(base) != len(probed):
        return None
    changed = [i for i, (a, b) in enumerate(zip(base, probed)) if a != b]
    if len(changed) == 1 and probed[changed[0]] == 2 * base[changed[0]] \
            and size_ok(base[changed[0]]):
        return changed[0]
    return None


def _paged_roles(policy, dims):
    """PagedAttention: the page pools ``[L, Hkv, pages, page, D]`` have no batch axis (the
    allocator hands any page to any row and rows share prefix pages), so they split over
    KV heads only and stay whole over the data axes; block tables ``[L, B, pages]`` split
    by row."""
    state = _state_shapes(policy, dims)
    return {k: ((None, HEADS, None, None, None) if k in ("k_pages", "v_pages")
                else (None, BATCH) + (None,) * (len(state[k].shape) - 2)) for k in state}


def check_cache_policy(policy) -> None:
    """A clear error for a KV policy whose cache the shard pass cannot place: HeadInfer in
    host memory streams its head groups through one device (its own schedule of transfers
    between one host buffer and one device), which a mesh does not split."""
    from memlab.kv.headinfer import HeadInfer
    if isinstance(policy, HeadInfer) and policy.memory_kind != "device":
        raise ValueError(
            f"shard: the headinfer KV policy keeps the cache in host memory "
            f"(memory_kind={policy.memory_kind!r}) and streams its head groups through one "
            "device, which the shard pass does not split; use HeadInfer(memory_kind='device'), "
            "the dense cache or another policy (kivi, kvquant, snapkv, ...) with the shard pass")


def _policy_roles(policy, dims):
    """Per leaf of a policy's stacked state, the role of each axis (``"batch"``, ``"heads"``
    or None), found by probing the state's shapes: the axis of size ``batch`` that doubles
    when the batch doubles is the row axis; the axis dividing ``n_kv_heads`` that doubles
    when the head counts double is the head axis (a head-group axis, e.g. Palu's latents
    per group, counts as one when ``n_kv_heads`` is a multiple of it).  A leaf that does not
    change is shared (replicated over that mesh axis: e.g. KVQuant's per-row k-means
    codebooks are shared by every head); a leaf that changes with no such axis also stays
    whole over that mesh axis (never split along an axis that is not rows or heads)."""
    from memlab.kv.paged import Paged
    check_cache_policy(policy)
    if isinstance(policy, Paged):
        return _paged_roles(policy, dims)
    try:
        return _probed_roles(policy, dims)
    except TypeError:   # an unhashable policy: probe without the memo
        return _probed_roles.__wrapped__(policy, dims)


def _probe(policy, dims, base, **kw):
    """The state's shapes at changed dims; ``base`` (no axis found) where the policy
    refuses them (its validate), so that dimension then splits nothing."""
    try:
        return _state_shapes(policy, _probe_dims(dims, **kw))
    except (ValueError, TypeError):
        return base


@functools.lru_cache(maxsize=256)
def _probed_roles(policy, dims):
    base = _state_shapes(policy, dims)
    by_b = _probe(policy, dims, base, batch=2 * dims.batch)
    by_h = _probe(policy, dims, base, n_kv_heads=2 * dims.n_kv_heads, n_heads=2 * dims.n_heads)
    hkv = dims.n_kv_heads

    def roles(x, xb, xh):
        spec = [None] * len(x.shape)
        b = _axis_of(x.shape, xb.shape, lambda s: s == dims.batch)
        h = _axis_of(x.shape, xh.shape, lambda s: hkv % s == 0)
        if b is not None:
            spec[b] = BATCH
        if h is not None and h != b:
            spec[h] = HEADS
        return tuple(spec)
    return jax.tree_util.tree_map(roles, base, by_b, by_h)


def cache_roles(cache):
    """The axis roles of every leaf of a KV cache (a tree like ``cache`` with a tuple of
    ``"batch"`` / ``"heads"`` / None per leaf): a :class:`memlab.cache.PolicyCache` by its
    policy's layout (the dense one: ``k, v [L, B, S, Hkv, D]``) and ``lengths [B]``."""
    from memlab.cache import PolicyCache
    if isinstance(cache, PolicyCache):
        state = _policy_roles(cache.policy, cache.dims)
        return cache._replace(state=state, lengths=(BATCH,))
    raise TypeError(f"shard: cache must be a memlab.cache.PolicyCache "
                    f"(memlab.generate.make_cache(model, batch, max_len)), got "
                    f"{type(cache).__name__}")


def _roles_leaves(roles):
    return jax.tree_util.tree_leaves(
        roles, is_leaf=lambda r: isinstance(r, tuple) and all(a in (None, BATCH, HEADS) for a in r))


def cache_specs(cache, mesh: Mesh, strategy: Strategy):
    """``PartitionSpec`` per leaf of a KV cache: the row axis over the strategy's batch
    axes, the KV-head axis over its tensor axis (Megatron: each device keeps the cache of
    its own heads), everything else whole.  Raises a ValueError naming the nearest
    feasible size when the mesh does not divide the batch or the heads."""
    check_strategy(mesh, strategy)
    roles = cache_roles(cache)
    flat_r = _roles_leaves(roles)
    flat_x, treedef = jax.tree_util.tree_flatten(cache)
    if len(flat_r) != len(flat_x):  # pragma: no cover - a policy whose init lies about shapes
        raise ValueError(f"shard: the cache has {len(flat_x)} leaves but its layout {len(flat_r)}")
    n_b = _size(mesh, strategy.batch) if strategy.batch else 1
    n_t = mesh.shape[strategy.tensor] if strategy.tensor else 1
    batch_ax = (strategy.batch[0] if len(strategy.batch) == 1 else strategy.batch) \
        if strategy.batch else None
    what = getattr(getattr(cache, "policy", None), "name", "dense")
    hkv = cache.dims.n_kv_heads if hasattr(cache, "dims") else cache.k.shape[3]
    names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(cache)[0]]
    specs = []
    for name, x, r in zip(names, flat_x, flat_r):
        spec = [None] * len(x.shape)
        for i, role in enumerate(r):
            if role == BATCH and batch_ax is not None:
                if x.shape[i] % n_b:
                    b = x.shape[i]
                    raise ValueError(
                        f"shard: the {what} KV cache has batch {b} ({name!r}), not divisible by "
                        f"the data axes {strategy.batch} of size {n_b}; use a batch that is a "
                        f"multiple of {n_b} (nearest: {n_b * max(1, round(b / n_b))})")
                spec[i] = batch_ax
            elif role == HEADS and strategy.tensor is not None:
                if x.shape[i] % n_t:
                    h = x.shape[i]
                    heads = "KV heads" if h == hkv else f"KV head groups (of {hkv} KV heads)"
                    raise ValueError(
                        f"shard: the {what} KV cache has {h} {heads} ({name!r} axis {i} of "
                        f"{list(x.shape)}), not divisible by the tensor-parallel mesh axis "
                        f"{strategy.tensor!r} of size {n_t} (Megatron splits whole heads: each "
                        f"device keeps the cache of its own heads); the nearest feasible "
                        f"{strategy.tensor!r} size is {_feasible([h], n_t)}")
                spec[i] = strategy.tensor
        while spec and spec[-1] is None:
            spec.pop()
        specs.append(P(*spec))
    return treedef.unflatten(specs)
