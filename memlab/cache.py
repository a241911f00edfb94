"""The KV-cache protocol: what a compressed cache stores and how a layer attends through it.

A policy is a frozen dataclass (hashable, so static under ``jit``) with four
methods, all about **one layer**; the model stacks ``n_layers`` copies of the
state on a leading axis and its ``nn.scan`` hands each layer its slice:

``init(dims) -> state``
    An empty state pytree for one layer (arrays only; shapes fixed by ``dims``).
``prefill(state, q, k, v, ctx) -> (out, state)``
    The prompt: ``q [B, T, H, D]``, ``k, v [B, T, Hkv, D]`` (keys after RoPE;
    ``ctx.k_pre`` holds them before RoPE), ``ctx.n_new [B]`` valid tokens per
    row (prompts are right-padded).  The cache is empty.  Returns the prompt's
    attention output (policies attend to the uncompressed prompt, as the
    papers do, unless they say otherwise) and the compressed state.
``decode(state, q, k, v, ctx) -> (out, state)``
    One token per row (``T == 1``) at ``ctx.positions``; ``ctx.lengths`` tokens
    came before it.  Stores the token, then attends over what the state keeps.
``nbytes(dims) -> int``
    The exact bytes of one layer's state (data + scales + metadata), checked
    against the real pytree in the tests.

Cross-layer policies (an additive extension, for caches shared between layers
such as MiniCache's merged layer pairs): a policy with ``cross_layer = True``
is *not* stacked per layer.  ``init_stacked(dims)`` builds the whole model's
state (``dims.n_layers`` says how many layers), and ``prefill`` / ``decode``
receive that whole state plus the traced ``ctx.layer`` and return it whole
(the model does no slicing; the policy indexes its own pieces, e.g. with
``lax.switch`` / dynamic indexing on ``ctx.layer``).  ``stacked_nbytes(dims)``
is the exact bytes of the whole state; for ordinary policies it is
``dims.n_layers * nbytes(dims)``.

Sliding-window layers (Mistral; Gemma's local layers): a policy with
``attention_options = True`` applies the layer's window, scale and soft-cap from
``ctx``.  When the window ``W`` is shorter than the cache, the state is laid out in
two groups (:func:`layer_groups`): the global layers' stack of ``max_len`` positions
under the policy, and the sliding layers' stack of ``W`` positions, a ring
(``ctx.ring``: position ``p`` in slot ``p % W``) kept by the policy if it applies
windows, else by :class:`Dense` (a window already bounds those layers to ``W``
tokens).  ``stacked_nbytes`` counts each group at its own length and policy.

:class:`PolicyCache` is the pytree that crosses ``jit``: the stacked state,
``lengths [B]`` (tokens seen per row, i.e. the next position) and the policy
as static metadata.  ``init_cache(policy, spec, batch, max_len)`` builds one.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memlab import dispatch
from memlab.memory.bytes import tree_bytes
from memlab.nn.attention import DECODE_IMPLS, attention, decode_attention

_IN_PLACE = contextvars.ContextVar("memlab_in_place_decode", default=True)


def in_place_decode() -> bool:
    """Whether decode steps traced now may write into the ``[L, ...]`` layer stack in place
    (a policy's ``decode_stacked``); False inside :func:`sliced_decode`."""
    return _IN_PLACE.get()


@contextlib.contextmanager
def sliced_decode():
    """Trace the enclosed decode steps with each layer's cache sliced out and written back
    (the policy's ``decode``) instead of written into the stack in place.  For layer
    runners other than the model's own scan: :mod:`memlab.offload` streams layers in
    blocks, and there XLA copies the whole stack for the in-place write."""
    token = _IN_PLACE.set(False)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)

__all__ = ["Dims", "Dense", "KVPolicy", "MAX_POS", "PolicyCache", "StepCtx", "attend",
           "attend_decode", "attend_prompt", "cache_bytes", "decode_impl", "init_cache",
           "cache_dims", "layer_groups", "ring_positions",
           "prompt_positions", "write_tokens"]

MAX_POS = np.iinfo(np.int32).max   # position of an empty slot: causality hides it


@dataclasses.dataclass(frozen=True)
class Dims:
    """Shapes of one layer's cache."""
    batch: int
    max_len: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    n_layers: int = 1
    layer_budget: Optional[tuple] = None   # per-layer token budgets, for policies that vary them
    sliding: tuple = ()                     # per layer: a sliding-window layer? (): none
    window: Optional[int] = None            # their window (a query at p sees (p - W, p])

    @property
    def n_sliding(self) -> int:
        return sum(bool(x) for x in self.sliding)


class StepCtx(NamedTuple):
    """What a layer knows about the step (built inside the model; never crosses jit)."""
    positions: jax.Array          # [B, T] absolute positions of the new tokens
    n_new: jax.Array              # [B] valid new tokens per row
    lengths: jax.Array            # [B] tokens in the cache before this step
    layer: jax.Array              # scalar int32 layer index (traced under scan)
    k_pre: jax.Array              # [B, T, Hkv, D] keys before RoPE
    rope: Callable                # rope(x [B, T, h, D], positions [B, T]) -> rotated x
    impl: Optional[str] = None    # the model's attention implementation (None: auto)
    fresh: bool = True            # static: the cache holds nothing yet (PolicyCache.fresh)
    # static attention options of the layer (policies with ``attention_options = True``)
    window: Optional[int] = None  # a query at p sees keys in (p - window, p]
    scale: Optional[float] = None  # softmax scale (None: head_dim ** -0.5)
    softcap: Optional[float] = None  # scores -> softcap * tanh(scores / softcap)
    ring: bool = False            # static: the state is a ring of W slots (position p at p % W)


class KVPolicy:
    """Base class; subclasses are ``@dataclasses.dataclass(frozen=True)``."""

    name = "policy"

    def init(self, dims: Dims):
        raise NotImplementedError

    def prefill(self, state, q, k, v, ctx: StepCtx):
        raise NotImplementedError

    def decode(self, state, q, k, v, ctx: StepCtx):
        raise NotImplementedError

    def nbytes(self, dims: Dims) -> int:
        raise NotImplementedError

    def validate(self, dims: Dims) -> None:
        """Raise a clear error if this policy cannot serve ``dims`` (override as needed).

        A short cache is never an error: when ``dims.max_len`` is below a policy's
        window, buffer or budget, ``init`` / ``nbytes`` lay the state out so that it
        holds every token (e.g. an eviction budget is capped at ``max_len``, KIVI keeps
        its float residual), as :mod:`tests.test_kv_short` checks for every policy."""

    cross_layer = False   # True: one state for all layers, built by init_stacked (module doc)

    def init_stacked(self, dims: Dims):
        """The whole model's empty state; only cross-layer policies define it."""
        raise NotImplementedError

    def stacked_nbytes(self, dims: Dims) -> int:
        """Exact bytes of the whole model's state (``dims.n_layers`` layers; with a ring
        layout, each group of layers at its own length, :func:`layer_groups`)."""
        groups = layer_groups(self, dims)
        if groups is None:
            return dims.n_layers * self.nbytes(dims)
        return sum(len(idx) * pol.nbytes(d) for pol, d, idx in groups.values())

    attention_options = False  # True: applies ctx.window / scale / softcap (and rings)

    def __call__(self, *a, **k):  # pragma: no cover - guard against a common slip
        raise TypeError(f"{type(self).__name__} is a KV policy, not a pass: use "
                        "ml.passes.kv_compress(policy).")


def layer_groups(policy: KVPolicy, dims: Dims) -> Optional[dict]:
    """``{"full": (policy, dims, layers), "sliding": (ring policy, ring dims, layers)}``
    (empty groups left out) when the sliding layers' window is shorter than the cache;
    None when every layer keeps ``max_len`` positions.  The ring policy is ``policy`` if
    it applies windows (``attention_options``), else :class:`Dense`."""
    if not (dims.n_sliding and dims.window is not None and dims.window < dims.max_len):
        return None
    if policy.cross_layer:
        raise NotImplementedError(
            f"KV policy {type(policy).__name__} shares state across layers and cannot serve "
            f"a model with sliding-window layers (window {dims.window}); use another policy")
    kinds = dims.sliding
    out = {}
    full = tuple(i for i, sl in enumerate(kinds) if not sl)
    ring = tuple(i for i, sl in enumerate(kinds) if sl)
    if full:
        out["full"] = (policy, dataclasses.replace(dims, n_layers=len(full), sliding=(),
                                                   window=None), full)
    if ring:
        ring_policy = policy if policy.attention_options else Dense(
            getattr(policy, "dtype", None) if isinstance(policy, Dense) else None)
        out["sliding"] = (ring_policy, dataclasses.replace(
            dims, max_len=dims.window, n_layers=len(ring), sliding=()), ring)
    return out


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyCache:
    """A model's whole cache under a policy: state stacked over layers.

    ``fresh`` (static) is True for a cache that nothing has been written to yet
    (:func:`init_cache`); the model returns every cache with ``fresh=False``.  It
    lets a prefill on an empty cache run plain causal attention at trace time.
    """
    state: Any
    lengths: jax.Array
    policy: KVPolicy = dataclasses.field(metadata=dict(static=True))
    dims: Dims = dataclasses.field(metadata=dict(static=True))
    fresh: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        return self.dims.max_len

    def _replace(self, **kw) -> "PolicyCache":
        return dataclasses.replace(self, **kw)


def cache_dims(spec, batch: int, max_len: int, dtype: Any = None) -> Dims:
    """The :class:`Dims` of a decoder ``spec``'s cache (its sliding layers and window)."""
    sliding = tuple(spec.sliding_layers()) if hasattr(spec, "sliding_layers") else ()
    window = getattr(spec, "sliding_window", None) if any(sliding) else None
    return Dims(batch=int(batch), max_len=int(max_len), n_heads=spec.n_heads,
                n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                dtype=jnp.dtype(dtype or spec.dtype).name, n_layers=spec.n_layers,
                sliding=sliding if any(sliding) else (), window=window)


def init_cache(policy: KVPolicy, spec, batch: int, max_len: int, dtype: Any = None) -> PolicyCache:
    """An empty cache for a decoder ``spec`` (LlamaConfig): one stack of ``n_layers`` states,
    or the two groups of :func:`layer_groups` (``state = {"full": ..., "sliding": ...}``)."""
    dims = cache_dims(spec, batch, max_len, dtype)
    policy.validate(dims)
    lengths = jnp.zeros((batch,), jnp.int32)
    groups = layer_groups(policy, dims)   # raises for a cross-layer policy over rings
    if policy.cross_layer:      # the policy lays out all layers itself
        return PolicyCache(policy.init_stacked(dims), lengths, policy, dims)

    def stack(pol, d, n):
        one = pol.init(d)
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape).copy(), one)

    if groups is None:
        return PolicyCache(stack(policy, dims, spec.n_layers), lengths, policy, dims)
    state = {g: stack(pol, d, len(idx)) for g, (pol, d, idx) in groups.items()}
    return PolicyCache(state, lengths, policy, dims)


def group_index(dims: Dims, sliding: bool):
    """``(group name, [n_layers] table of each layer's index in its group)`` of the ring
    layout, for the group of sliding or global layers."""
    kinds = dims.sliding
    table, counts = [], {True: 0, False: 0}
    for sl in kinds:
        table.append(counts[bool(sl)])
        counts[bool(sl)] += 1
    return ("sliding" if sliding else "full"), np.asarray(table, np.int32)


def cache_bytes(cache: PolicyCache) -> int:
    """Exact bytes of a cache pytree (sub-byte types counted packed)."""
    return tree_bytes(cache)


def _window(window, s):
    """A window no shorter than the keys masks nothing: None (the kernels require w <= S)."""
    return window if window is not None and window < s else None


def attend(q, k, v, q_positions, kv_positions, *, impl: Optional[str] = None, window=None,
           scale=None, softcap=None):
    """Causal attention of new queries over stored keys at explicit positions (MAX_POS = empty)."""
    return attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True,
                     q_positions=q_positions, kv_positions=kv_positions, impl=impl,
                     window=_window(window, k.shape[1]), scale=scale, softcap=softcap)


def attend_prompt(q, k, v, *, impl: Optional[str] = None, window=None, scale=None,
                  softcap=None):
    """A prompt over its own keys on an empty cache: plain causal attention, no positions.

    Query ``i`` sees keys ``0..i``.  A right-padded row's padding keys sit after
    every valid query, so the causal mask already hides them.  With default
    positions the flash kernels skip the blocks above the diagonal and cuDNN
    can run the call.
    """
    return attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True, impl=impl,
                     window=_window(window, k.shape[1]), scale=scale, softcap=softcap)


def attend_decode(q, k, v, lengths, *, impl: Optional[str] = None, scale=None):
    """One new query per row, ``q [B, 1, H, D]``, over cache slots ``0 .. lengths[b]-1``.

    Runs :func:`memlab.nn.decode_attention`: the split-K (flash-decoding) kernel on
    GPU/TPU, a masked softmax elsewhere.  ``impl`` is the model's attention choice,
    mapped onto the decode implementations.
    """
    out = decode_attention(q[:, 0], k.astype(q.dtype), v.astype(q.dtype), lengths,
                           impl=decode_impl(impl), scale=scale)
    return out[:, None]


def decode_impl(impl: Optional[str]) -> str:
    """The decode kernel for a model's attention ``impl`` (None: the model's static
    ``Dispatch.attention``, :func:`memlab.dispatch.resolve`): the Pallas backends and
    ``auto`` carry over; the plain-JAX choices (``naive``, ``chunked``, ``xla``) decode
    with the masked softmax (``xla``), ``cudnn`` with the split-K kernel."""
    if impl is None:
        impl = dispatch.resolve("attention", None, "auto")
    if impl in ("auto", "cudnn"):
        return "auto"
    if impl in DECODE_IMPLS:
        return impl
    return "xla"


def write_tokens(buf, new, slots):
    """Scatter ``new [B, T, ...]`` into ``buf [B, S, ...]`` at ``slots [B, T]`` (out of range: dropped)."""
    b, t = slots.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


def ring_positions(filled, s: int):
    """Positions held by a ring of ``s`` slots after ``filled [B]`` tokens were written
    (slot ``i`` holds the latest ``p < filled`` with ``p % s == i``; MAX_POS if none)."""
    n = jnp.asarray(filled, jnp.int32)[:, None]
    i = jnp.arange(s, dtype=jnp.int32)[None, :]
    p = n - 1 - jnp.mod(n - 1 - i, s)
    return jnp.where(p >= 0, p, MAX_POS)


def prompt_positions(ctx: StepCtx):
    """Key positions of a right-padded prompt: padding at MAX_POS."""
    t = ctx.positions.shape[1]
    valid = jnp.arange(t)[None, :] < ctx.n_new[:, None]
    return jnp.where(valid, ctx.positions, MAX_POS)


@dataclasses.dataclass(frozen=True)
class Dense(KVPolicy):
    """The uncompressed cache, the default policy and the baseline every other policy is
    measured against: every token's K and V in the cache dtype; slot index = position.

    Prefill on a fresh cache is plain causal attention over the prompt's own keys (no
    positions: the kernels' causal block skipping and cuDNN apply); a prefill that
    continues a written cache (chunked prefill) attends over the cache at explicit
    positions.  Decode writes the token and runs the split-K decode kernel over the
    row's ``lengths + 1`` slots.  A layer's window, scale and soft-cap (``StepCtx``)
    are applied: decode with a window or a soft-cap attends at explicit positions.
    """

    name = "dense"
    attention_options = True
    dtype: Optional[str] = None      # storage dtype; None = the model's compute dtype

    def _dtype(self, dims):
        return jnp.dtype(self.dtype or dims.dtype)

    def init(self, dims: Dims):
        shape = (dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim)
        return {"k": jnp.zeros(shape, self._dtype(dims)), "v": jnp.zeros(shape, self._dtype(dims))}

    def nbytes(self, dims: Dims) -> int:
        return 2 * dims.batch * dims.max_len * dims.n_kv_heads * dims.head_dim * self._dtype(dims).itemsize

    def prefill(self, state, q, k, v, ctx):
        if ctx.ring:
            return self._ring_prefill(state, q, k, v, ctx)
        slots = prompt_positions(ctx)                  # padding -> MAX_POS -> dropped
        state = {"k": write_tokens(state["k"], k, slots), "v": write_tokens(state["v"], v, slots)}
        opts = dict(window=ctx.window, scale=ctx.scale, softcap=ctx.softcap)
        if ctx.fresh:
            return attend_prompt(q, k, v, impl=ctx.impl, **opts), state
        return self._attend_written(q, state, ctx, ctx.lengths + ctx.n_new, opts), state

    @staticmethod
    def _attend_written(q, state, ctx, filled, opts):
        s = state["k"].shape[1]                        # over every written slot
        slot = jnp.arange(s, dtype=jnp.int32)[None, :]
        kv_pos = jnp.where(slot < filled[:, None], slot, MAX_POS)
        return attend(q, state["k"], state["v"], ctx.positions, kv_pos, impl=ctx.impl, **opts)

    # -- a sliding layer's ring of W slots: position p lives in slot p % W ----------------
    @staticmethod
    def _ring_write(state, k, v, positions, keep):
        s = state["k"].shape[1]
        slots = jnp.where(keep, positions % s, MAX_POS)
        return {"k": write_tokens(state["k"], k, slots), "v": write_tokens(state["v"], v, slots)}

    def _ring_prefill(self, state, q, k, v, ctx):
        s = state["k"].shape[1]
        opts = dict(window=ctx.window, scale=ctx.scale, softcap=ctx.softcap)
        end = ctx.lengths + ctx.n_new
        pos = prompt_positions(ctx)                    # padding at MAX_POS
        if ctx.fresh:
            out = attend_prompt(q, k, v, impl=ctx.impl, **opts)
        else:  # the ring's earlier tokens and the chunk's own, at their positions
            kk = jnp.concatenate([state["k"].astype(k.dtype), k], axis=1)
            vv = jnp.concatenate([state["v"].astype(v.dtype), v], axis=1)
            kv_pos = jnp.concatenate([ring_positions(ctx.lengths, s), pos], axis=1)
            out = attend(q, kk, vv, ctx.positions, kv_pos, impl=ctx.impl, **opts)
        keep = (pos != MAX_POS) & (ctx.positions >= (end - s)[:, None])  # the last s tokens
        return out, self._ring_write(state, k, v, ctx.positions, keep)

    def _ring_decode(self, state, q, k, v, ctx):
        s = state["k"].shape[1]
        state = self._ring_write(state, k, v, ctx.positions, jnp.ones(ctx.positions.shape, bool))
        kv_pos = ring_positions(ctx.lengths + 1, s)
        out = attend(q, state["k"], state["v"], ctx.positions, kv_pos, impl=ctx.impl,
                     window=ctx.window, scale=ctx.scale, softcap=ctx.softcap)
        return out, state

    def decode_stacked(self, stacked, index, q, k, v, ctx):
        """:meth:`decode` on the whole ``[L, B, S, Hkv, D]`` stack for layer ``index``: the
        token is written into the stack in place (a scatter of ``B`` rows), so the layer's
        slots are read once for attention and never written back whole.  Plain decode
        only (no ring, window or soft-cap: the model routes those through :meth:`decode`)."""
        rows = jnp.arange(q.shape[0])
        pos = ctx.positions[:, 0]
        new = {}
        for name, x in (("k", k), ("v", v)):
            new[name] = stacked[name].at[index, rows, pos].set(
                x[:, 0].astype(stacked[name].dtype), mode="drop")
        layer = {n: jax.lax.dynamic_index_in_dim(a, index, 0, keepdims=False)
                 for n, a in new.items()}
        out = attend_decode(q, layer["k"], layer["v"], ctx.lengths + 1, impl=ctx.impl,
                            scale=ctx.scale)
        return out, new

    def decode(self, state, q, k, v, ctx):
        if ctx.ring:
            return self._ring_decode(state, q, k, v, ctx)
        state = {"k": write_tokens(state["k"], k, ctx.positions),
                 "v": write_tokens(state["v"], v, ctx.positions)}
        if ctx.window is not None or ctx.softcap is not None:
            opts = dict(window=ctx.window, scale=ctx.scale, softcap=ctx.softcap)
            return self._attend_written(q, state, ctx, ctx.lengths + 1, opts), state
        return attend_decode(q, state["k"], state["v"], ctx.lengths + 1, impl=ctx.impl,
                             scale=ctx.scale), state
