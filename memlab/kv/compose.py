"""Composition of KV policies: a prefill-time eviction policy chooses which prompt tokens are
kept, a storage policy stores just those (e.g. SnapKV + KIVI-2bit, the combination studied
in SnapKV's and KIVI's follow-ups and in "KV cache compression, but what must we give in
return?", Yuan et al. 2024, arXiv:2407.01527).

    policy = ml.kv.compose(SnapKV(budget=64), KIVI(bits=2), room=256)
    policy = ml.kv.parse("snapkv:budget=64+kivi:bits=2+room=256")      # the same

``Compose(eviction, storage, room=None)``:

* **prefill**: the prompt attends to itself uncompressed (as every policy
  here); the eviction policy's own selection
  (:meth:`memlab.kv._budget.BudgetPolicy.prefill_priority` then
  :func:`memlab.kv._budget.select_top`, unchanged) picks, per row and KV head,
  the kept prompt tokens; they are gathered **in position order** (keys after
  RoPE at their original positions) into slots ``0 .. kept-1`` and handed to the
  storage policy's ``prefill`` as a prompt of ``kept`` tokens.
* **decode**: the new token is appended to the storage (``storage.decode`` at
  slot ``count``, the number of tokens stored so far) and the query attends
  over everything stored.  Nothing is evicted during decode: the composition
  keeps the prefill selection plus every generated token (SnapKV itself only
  compresses the prompt; the stand-alone :class:`memlab.kv.snapkv.SnapKV`
  policy slides a window over the generated tokens instead).

Because the storage sees the kept tokens at slot indices, not at their
original positions, only storage policies that store keys *after* RoPE and
need positions just for causality compose: ``dense``, ``kivi`` (both key
modes) and ``gear``.  ``kvquant`` and ``palu`` re-apply RoPE at the slot
position and ``paged``/``think``/``minicache`` are not token stores of this
kind; they raise.  Eviction policies that compose are those whose selection is
made once at prefill: ``snapkv``, ``pyramidkv`` (its per-layer budget indexed
by the traced layer) and ``streaming`` (sinks + the most recent tokens *of the
prompt*).  ``h2o`` raises: it needs every decode step's attention probabilities
over a dense store to re-select its heavy hitters.

Capacity.  The storage is built for ``min(budget + room, max_len)`` tokens
(``budget``: the eviction's largest per-layer budget capped at ``max_len``,
``eviction.slots(dims)``); ``room`` is the number of decode tokens reserved,
``None`` = ``max_len - budget`` (always enough, since a prompt of ``n`` tokens
leaves ``max_len - n`` decode steps and keeps ``min(n, budget)``).  The cap at
``max_len`` loses nothing: a sequence never outgrows the cache, so a cache
shorter than ``budget + room`` keeps every token it sees.  A token past the
capacity is dropped by the storage (and then not attended to): choose
``room >= `` the decode length.

State (one layer): ``store`` (the storage's state at ``max_len = min(budget +
room, max_len)``), ``count [B]`` int32 (tokens stored) and the eviction's extra state
(PyramidKV's ``layer_budgets``).  Bytes:
``storage.nbytes(dims at that capacity) + 4 B + eviction.extra_bytes(dims)``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Optional

import jax.numpy as jnp

from memlab.kv._budget import BudgetPolicy, SnapKVBase, gather_tokens, select_top
from memlab.kv.base import POLICIES, Dims, KVPolicy, StepCtx, attend, prompt_positions
from memlab.kv.dense import Dense
from memlab.kv.gear import GEAR
from memlab.kv.kivi import KIVI
from memlab.kv.streaming import StreamingLLM

__all__ = ["Compose", "compose", "parse_composition", "EVICTIONS", "STORAGES"]

EVICTIONS = (SnapKVBase, StreamingLLM)      # SnapKV, PyramidKV, StreamingLLM
STORAGES = (Dense, KIVI, GEAR)


def _check(eviction, storage, room):
    if not isinstance(eviction, KVPolicy) or not isinstance(storage, KVPolicy):
        raise TypeError(f"compose: eviction and storage must be memlab.kv policies, got "
                        f"{type(eviction).__name__} and {type(storage).__name__}.")
    if not isinstance(eviction, EVICTIONS):
        why = (" H2O re-selects its heavy hitters from every decode step's attention over a dense "
               "store, which a quantized store does not provide." if eviction.name == "h2o" else "")
        raise ValueError(
            f"compose: eviction={eviction.name!r} cannot be composed.{why} Use a prefill-time "
            "selection: 'snapkv', 'pyramidkv' or 'streaming'.")
    if eviction.dtype is not None:
        raise ValueError(f"compose: eviction {eviction.name!r} has dtype={eviction.dtype!r}, but in "
                         "a composition the storage decides how tokens are stored; leave the "
                         "eviction's dtype None and set it on the storage (e.g. "
                         "'dense:dtype=bfloat16').")
    if not isinstance(storage, STORAGES):
        raise ValueError(
            f"compose: storage={storage.name!r} cannot be composed: it stores keys at their slot "
            "position (re-applying RoPE) or is not a token store; use 'dense', 'kivi' or 'gear'.")
    if room is not None and (isinstance(room, bool) or not isinstance(room, numbers.Integral)
                             or room < 1):
        raise ValueError(f"compose: room={room!r} must be a positive int (decode tokens reserved "
                         "after the kept prompt) or None (max_len - budget).")


@POLICIES.register("compose")
@dataclasses.dataclass(frozen=True)
class Compose(KVPolicy):
    """Eviction at prefill, then storage of the kept tokens (see the module doc)."""

    name = "compose"
    eviction: KVPolicy
    storage: KVPolicy
    room: Optional[int] = None

    def __post_init__(self):
        _check(self.eviction, self.storage, self.room)

    # -- sizes -------------------------------------------------------------------
    def capacity(self, dims: Dims) -> int:
        """Tokens the storage holds: the eviction's slots + ``room``, at most ``max_len``."""
        if self.room is None:
            return dims.max_len
        return min(self.eviction.slots(dims) + self.room, dims.max_len)

    def storage_dims(self, dims: Dims) -> Dims:
        return dataclasses.replace(dims, max_len=self.capacity(dims))

    def validate(self, dims: Dims) -> None:
        self.eviction.validate(dims)
        self.storage.validate(self.storage_dims(dims))

    def init(self, dims: Dims):
        self.validate(dims)
        return {"store": self.storage.init(self.storage_dims(dims)),
                "count": jnp.zeros((dims.batch,), jnp.int32), **self.eviction.extra_state(dims)}

    def nbytes(self, dims: Dims) -> int:
        return (self.storage.nbytes(self.storage_dims(dims)) + 4 * dims.batch
                + self.eviction.extra_bytes(dims))

    # -- selection -----------------------------------------------------------------
    def select(self, state, q, k, ctx, s: int):
        """The eviction's prefill selection: token indices ``[B, G, s]`` in position order and
        whether each slot keeps one (``G`` = Hkv, or 1 for a per-row selection); kept
        tokens come first."""
        evict_state = {kk: val for kk, val in state.items() if kk not in ("store", "count")}
        limit = self.eviction.layer_limit(evict_state, ctx)
        if limit is None:
            limit = self.eviction.budget
        priority, _, _ = self.eviction.prefill_priority(q, k, ctx, limit)
        idx, keep = select_top(priority, s, limit)
        big = jnp.iinfo(jnp.int32).max
        order = jnp.sort(jnp.where(keep, idx, big), axis=-1)       # position order, dropped last
        keep = order != big
        return jnp.where(keep, order, 0), keep

    def _storage_slots(self, store) -> int:
        """Static token capacity of the storage state (the gather never exceeds it)."""
        if isinstance(self.storage, KIVI):
            v = store.v_codes if self.storage.key_mode == "channel" else store["v_codes"]
            r = store.k_res if self.storage.key_mode == "channel" else store["k_res"]
            return int(v.shape[1] + r.shape[1])
        if isinstance(self.storage, GEAR):
            return int(store["k"]["codes"].shape[1])
        return int(store["k"].shape[1])

    # -- protocol ------------------------------------------------------------------
    def prefill(self, state, q, k, v, ctx):
        out = attend(q, k, v, ctx.positions, prompt_positions(ctx))
        b, t, h, d = q.shape
        s = min(t, self._storage_slots(state["store"]))
        idx, keep = self.select(state, q, k, ctx, s)
        count = keep[:, 0].sum(-1).astype(jnp.int32)              # same for every head
        take = lambda x: gather_tokens(x, idx, keep, x.dtype)     # noqa: E731  [B, s, Hkv, D]
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (b, s))
        sctx = ctx._replace(positions=pos, n_new=count, lengths=jnp.zeros_like(count),
                            k_pre=take(ctx.k_pre), fresh=True)
        # the storage's own prompt attention is unused (XLA drops it): zero queries
        _, store = self.storage.prefill(state["store"], jnp.zeros((b, s, h, d), q.dtype),
                                        take(k), take(v), sctx)
        return out, {**state, "store": store, "count": count}

    def decode(self, state, q, k, v, ctx):
        if q.shape[1] != 1:
            raise ValueError(f"Compose.decode takes one token per row, got T={q.shape[1]}.")
        count = state["count"]
        sctx = ctx._replace(positions=count[:, None], n_new=jnp.ones_like(count), lengths=count)
        out, store = self.storage.decode(state["store"], q, k, v, sctx)
        return out, {**state, "store": store, "count": count + 1}


def compose(eviction: KVPolicy | str, storage: KVPolicy | str, room: Optional[int] = None) -> Compose:
    """``Compose(eviction, storage, room)``; either policy may be a string for ``ml.kv.parse``."""
    if isinstance(eviction, str):
        eviction = parse(eviction)
    if isinstance(storage, str):
        storage = parse(storage)
    return Compose(eviction, storage, room)


def parse_composition(text: str, parse) -> Compose:
    """``"eviction+storage[+room=N]"`` -> :class:`Compose` (``parse`` parses each part)."""
    parts = [p.strip() for p in text.split("+")]
    room = None
    if len(parts) == 3 and ":" not in parts[2] and parts[2].startswith("room="):
        try:
            room = int(parts[2][len("room="):])
        except ValueError:
            raise ValueError(f"kv policy {text!r}: room must be an int, e.g. '+room=256'.") from None
        parts = parts[:2]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"kv policy {text!r}: a composition is 'eviction+storage[+room=N]', e.g. "
                         "'snapkv:budget=64+kivi:bits=2+room=256'.")
    return compose(parse(parts[0]), parse(parts[1]), room)


def parse(text: str) -> KVPolicy:
    """A policy from a short string: ``dense``, ``kivi2``, ``kivi4``, ``snapkv:budget=512,window=32``.

    ``name<digits>`` sets ``bits`` (``kivi2`` = ``kivi:bits=2``); values parse as
    int, float, bool or string.  ``eviction+storage`` composes two policies
    (:func:`memlab.kv.compose.compose`), e.g. ``snapkv:budget=64+kivi:bits=2``;
    a last part ``+room=N`` sets the composition's decode room.
    """
    import re
    text = text.strip()
    if "+" in text:
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
