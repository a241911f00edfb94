"""The KV-cache policy protocol: what a compressed cache stores and how a layer attends through it.

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

:class:`PolicyCache` is the pytree that crosses ``jit``: the stacked state,
``lengths [B]`` (tokens seen per row, i.e. the next position) and the policy
as static metadata.  ``init_cache(policy, spec, batch, max_len)`` builds one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from memlab.memory.bytes import tree_bytes

__all__ = ["Dims", "KVPolicy", "PolicyCache", "StepCtx", "attend", "init_cache", "cache_bytes",
           "write_tokens", "prompt_positions", "MAX_POS"]

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


class StepCtx(NamedTuple):
    """What a layer knows about the step (built inside the model; never crosses jit)."""
    positions: jax.Array          # [B, T] absolute positions of the new tokens
    n_new: jax.Array              # [B] valid new tokens per row
    lengths: jax.Array            # [B] tokens in the cache before this step
    layer: jax.Array              # scalar int32 layer index (traced under scan)
    k_pre: jax.Array              # [B, T, Hkv, D] keys before RoPE
    rope: Callable                # rope(x [B, T, h, D], positions [B, T]) -> rotated x


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
        """Exact bytes of the whole model's state (``dims.n_layers`` layers)."""
        return dims.n_layers * self.nbytes(dims)

    def __call__(self, *a, **k):  # pragma: no cover - guard against a common slip
        raise TypeError(f"{type(self).__name__} is a KV policy, not a pass: use "
                        "ml.passes.kv_compress(policy).")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PolicyCache:
    """A model's whole cache under a policy: state stacked over layers."""
    state: Any
    lengths: jax.Array
    policy: KVPolicy = dataclasses.field(metadata=dict(static=True))
    dims: Dims = dataclasses.field(metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        return self.dims.max_len

    def _replace(self, **kw) -> "PolicyCache":
        return dataclasses.replace(self, **kw)


def init_cache(policy: KVPolicy, spec, batch: int, max_len: int, dtype: Any = None) -> PolicyCache:
    """An empty cache for a Llama-family ``spec`` (LlamaConfig)."""
    dims = Dims(batch=int(batch), max_len=int(max_len), n_heads=spec.n_heads,
                n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim,
                dtype=jnp.dtype(dtype or spec.dtype).name, n_layers=spec.n_layers)
    policy.validate(dims)
    if policy.cross_layer:      # the policy lays out all layers itself
        return PolicyCache(policy.init_stacked(dims), jnp.zeros((batch,), jnp.int32), policy, dims)
    one = policy.init(dims)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (spec.n_layers,) + a.shape).copy(), one)
    return PolicyCache(stacked, jnp.zeros((batch,), jnp.int32), policy, dims)


def cache_bytes(cache: PolicyCache) -> int:
    """Exact bytes of a cache pytree (sub-byte types counted packed)."""
    return tree_bytes(cache)


def attend(q, k, v, q_positions, kv_positions, *, impl: Optional[str] = None):
    """Causal attention of new queries over stored keys at explicit positions (MAX_POS = empty)."""
    from memlab.nn.attention import attention
    return attention(q, k.astype(q.dtype), v.astype(q.dtype), causal=True,
                     q_positions=q_positions, kv_positions=kv_positions, impl=impl)


def write_tokens(buf, new, slots):
    """Scatter ``new [B, T, ...]`` into ``buf [B, S, ...]`` at ``slots [B, T]`` (out of range: dropped)."""
    b, t = slots.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
    return buf.at[rows, slots].set(new.astype(buf.dtype), mode="drop")


def prompt_positions(ctx: StepCtx):
    """Key positions of a right-padded prompt: padding at MAX_POS."""
    t = ctx.positions.shape[1]
    valid = jnp.arange(t)[None, :] < ctx.n_new[:, None]
    return jnp.where(valid, ctx.positions, MAX_POS)


def make_cache(model, batch: int, max_len: int, lengths: int = 0):
    """The cache a model generates with: its ``kv_policy`` extra (set by the kv_compress
    pass) as a :class:`PolicyCache`, else the dense ``KVCache``.  ``lengths`` pre-fills
    the per-row lengths (for profiling a decode step)."""
    policy = model.extra("kv_policy") if hasattr(model, "extra") else None
    if policy is None:
        from memlab.models.llama import KVCache
        c = KVCache.zeros(model.spec, batch, max_len)
        return c._replace(lengths=jnp.full((batch,), lengths, jnp.int32))
    cache = init_cache(policy, model.spec, batch, max_len)
    return cache._replace(lengths=jnp.full((batch,), lengths, jnp.int32))


def parse(text: str) -> KVPolicy:
    """A policy from a short string: ``dense``, ``kivi2``, ``kivi4``, ``snapkv:budget=512,window=32``.

    ``name<digits>`` sets ``bits`` (``kivi2`` = ``kivi:bits=2``); values parse as
    int, float, bool or string.  ``eviction+storage`` composes two policies
    (:func:`memlab.kv.compose.compose`), e.g. ``snapkv:budget=64+kivi:bits=2``;
    a last part ``+room=N`` sets the composition's decode room.
    """
    import re
    from memlab.kv import POLICIES
    text = text.strip()
    if "+" in text:
        from memlab.kv.compose import parse_composition
        return parse_composition(text, parse)
    name, _, args = text.partition(":")
    kwargs = {}
    m = re.fullmatch(r"([a-z_]+?)(\d+)", name)
    if m and m.group(1) in POLICIES and name not in POLICIES:
        name, kwargs["bits"] = m.group(1), int(m.group(2))
    for item in filter(None, args.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"kv policy {text!r}: argument {item!r} must be key=value")
        kwargs[key.strip()] = _parse_value(val.strip())
    cls = POLICIES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"kv policy {text!r}: {e}") from None


def _parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v
