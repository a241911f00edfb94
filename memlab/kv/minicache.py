"""MiniCache: merge the KV caches of adjacent layers in the depth dimension (Liu et al. 2024,
"MiniCache: KV Cache Compression in Depth Dimension for Large Language Models",
arXiv:2405.14366).

``MiniCache(start=None, retain=0.05, threshold=None, t=0.5, dtype=None)``.  From
layer ``start`` (default ``n_layers // 2``, the middle of the model) on, the
layer pairs ``(start, start+1), (start+2, start+3), ...`` share one cache; a
last layer left without a partner (odd ``n_layers - start``) and the layers
below ``start`` keep an ordinary dense cache.  Per token and KV head, and
separately for keys and values, the two layers' vectors ``x_l, x_r`` are split
into magnitudes ``|x|`` and directions ``e = x / |x|``; the directions are
merged by SLERP::

    W = arccos(e_l . e_r),   m = sin((1-t) W) / sin(W) e_l + sin(t W) / sin(W) e_r

(``t = 0.5`` by default; when ``sin W < 1e-6`` the linear blend, renormalized)
and stored once, with each layer's magnitude kept, and each layer reconstructs
``x_hat = |x| m``.  The angular distance ``d = W / pi`` in ``[0, 1]`` says how
far apart the two layers' directions are; distant tokens are **retained**:
both layers' exact vectors are kept and used instead of ``|x| m``.

Retention (fixed capacity, so shapes are static).  Every (row, pair, KV head)
has ``R = ceil(retain * max_len)`` retention slots.  At prefill the top
``ceil(retain * n)`` of the row's ``n`` prompt tokens by distance are retained
(ties: lower position, ``lax.top_k`` order) -- only those with ``d >
threshold`` when a ``threshold`` is given.  A decode token is retained when
its distance exceeds both ``threshold`` and the largest distance among the
prompt tokens that were merged (stored as ``thr``; ``-inf`` when every prompt
token was retained), while free slots remain; once they are full, tokens are
merged.  ``retain=1`` (with ``threshold=None``) retains every token: the cache
then equals the dense one exactly.  ``retain`` and ``threshold`` are the two
selection rules of the paper's "retention threshold" in a static-shape form
(the paper's exact rule selects by the distance range of each merge).

Steps (the layers run in order under ``nn.scan``; this is a ``cross_layer``
policy, see :mod:`memlab.kv.base`, so every step sees the whole state and
dispatches on the traced ``ctx.layer`` with ``lax.switch``):

* dense layers: the :mod:`memlab.kv.dense` behaviour on their own slice.
* first layer of a pair: writes its raw K, V (storage dtype) into the pair's
  direction buffer at the new positions -- no extra buffer; at decode it then
  attends over its reconstruction of the earlier tokens plus its own new
  token exactly.
* second layer of a pair: reads the partner's raw vectors back from the
  direction buffer, merges them with its own, picks the retained tokens,
  overwrites the buffer with the merged directions and writes both layers'
  magnitudes; at decode it attends over its reconstruction of the earlier
  tokens plus its own new token exactly.

Prompts attend to themselves uncompressed, as with every policy here.

State (``L`` layers, ``P = (L - start) // 2`` pairs, ``Ld = L - 2P`` dense
layers, ``B`` rows, ``S = max_len``, ``Hkv`` KV heads, ``D`` head dim, storage
dtype ``it`` bytes)::

    dense/k, dense/v   [Ld, B, S, Hkv, D]     storage dtype
    k/dir, v/dir       [P, B, S, Hkv, D]      storage dtype (merged directions)
    k/mag, v/mag       [P, 2, B, S, Hkv]      storage dtype (per-layer magnitudes)
    k/ret, v/ret       [P, 2, B, R, Hkv, D]   storage dtype (retained exact vectors)
    k/ret_pos, v/...   [P, B, Hkv, R]         int32 position of each retained token, MAX_POS = free
    k/thr, v/thr       [P, B, Hkv]            float32 decode retention threshold

Bytes (:meth:`MiniCache.stacked_nbytes`, the whole model)::

    2 B S Hkv D it Ld + 2 P (B S Hkv D it + 2 B S Hkv it + 2 B R Hkv D it + 4 B Hkv R + 4 B Hkv)

against ``2 L B S Hkv D it`` dense: each merged pair costs ``1 + 2/D + 2 R/S``
dense layers' worth instead of 2 (plus the int32 positions).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from memlab.kv import POLICIES
from memlab.kv._budget import check_dtype, gather_tokens
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions, write_tokens

__all__ = ["MiniCache", "slerp_merge", "ceil_frac"]

_EPS = 1e-12


def ceil_frac(fraction: float, n):
    """``ceil(fraction * n)`` in exact integer arithmetic (``fraction`` read as its decimal
    string, so 0.1 * 10 is 1, not 2); ``n`` an int or an int array."""
    f = Fraction(str(fraction)).limit_denominator(10_000)
    num, den = f.numerator, f.denominator
    if isinstance(n, numbers.Integral):
        return -(-int(n) * num // den)
    return -(-(n.astype(jnp.int32) * num) // den)


def slerp_merge(xl, xr, t: float = 0.5):
    """SLERP of the directions of ``xl, xr [..., D]``: ``(m [..., D], |xl|, |xr|, d)`` in float32,
    ``d = angle / pi`` the angular distance in ``[0, 1]``."""
    xl, xr = xl.astype(jnp.float32), xr.astype(jnp.float32)
    nl = jnp.sqrt(jnp.sum(xl * xl, axis=-1))
    nr = jnp.sqrt(jnp.sum(xr * xr, axis=-1))
    el = xl / jnp.maximum(nl, _EPS)[..., None]
    er = xr / jnp.maximum(nr, _EPS)[..., None]
    cos = jnp.clip(jnp.sum(el * er, axis=-1), -1.0, 1.0)
    w = jnp.arccos(cos)
    sw = jnp.sin(w)
    small = sw < 1e-6
    safe = jnp.where(small, 1.0, sw)
    ca = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * w) / safe)
    cb = jnp.where(small, t, jnp.sin(t * w) / safe)
    m = ca[..., None] * el + cb[..., None] * er
    m = m / jnp.maximum(jnp.sqrt(jnp.sum(m * m, axis=-1)), _EPS)[..., None]
    return m, nl, nr, w / np.float32(np.pi)


def _rows(b):
    return jnp.arange(b)[:, None]


def _set_index(full, i, new):
    """``full[i] = new`` for a traced leading index ``i``."""
    return jax.lax.dynamic_update_index_in_dim(full, new.astype(full.dtype), i, 0)


def _get_index(full, i):
    return jax.lax.dynamic_index_in_dim(full, i, 0, keepdims=False)


@POLICIES.register("minicache")
@dataclasses.dataclass(frozen=True)
class MiniCache(KVPolicy):
    """Adjacent deep layers share SLERP-merged KV directions; per-layer magnitudes; distant
    tokens retained exactly (see the module doc)."""

    name = "minicache"
    cross_layer = True
    start: Optional[int] = None     # first merged layer; None = n_layers // 2
    retain: float = 0.05            # retained fraction (capacity ceil(retain * max_len) per pair/head)
    threshold: Optional[float] = None   # also require angular distance > threshold to retain
    t: float = 0.5                  # SLERP interpolation parameter
    dtype: Optional[str] = None     # storage dtype; None = the model's compute dtype

    def __post_init__(self):
        if self.start is not None and (isinstance(self.start, bool)
                                       or not isinstance(self.start, numbers.Integral)
                                       or self.start < 0):
            raise ValueError(f"MiniCache: start={self.start!r} must be an int >= 0 (the first "
                             "merged layer) or None (n_layers // 2).")
        for name, lo in (("retain", 0.0), ("t", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not lo <= v <= 1:
                raise ValueError(f"MiniCache: {name}={v!r} must be a number in [0, 1].")
        th = self.threshold
        if th is not None and (isinstance(th, bool) or not isinstance(th, numbers.Real)
                               or not 0 <= th <= 1):
            raise ValueError(f"MiniCache: threshold={th!r} must be None or an angular distance "
                             "in [0, 1] (angle / pi).")
        check_dtype("MiniCache", self.dtype)

    # -- layout ----------------------------------------------------------------
    def layout(self, n_layers: int):
        """``(start, pairs, kind [L], index [L])``: kind 0 dense, 1 first of a pair, 2 second;
        index = the dense slice or the pair."""
        start = n_layers // 2 if self.start is None else self.start
        pairs = max(n_layers - start, 0) // 2
        kind, index = np.zeros(n_layers, np.int32), np.zeros(n_layers, np.int32)
        for layer in range(n_layers):
            if start <= layer < start + 2 * pairs:
                kind[layer] = 1 + (layer - start) % 2
                index[layer] = (layer - start) // 2
            else:
                index[layer] = layer if layer < start else layer - 2 * pairs
        return start, pairs, kind, index

    def capacity(self, max_len: int) -> int:
        """Retention slots per (row, pair, KV head): ``ceil(retain * max_len)``."""
        return ceil_frac(self.retain, max_len)

    def validate(self, dims: Dims) -> None:
        start, pairs, _, _ = self.layout(dims.n_layers)
        if start >= dims.n_layers or pairs < 1:
            raise ValueError(
                f"MiniCache: start={start} leaves no pair of adjacent layers to merge in a "
                f"{dims.n_layers}-layer model; use start <= {dims.n_layers - 2}.")

    def _dtype(self, dims):
        return jnp.dtype(self.dtype or dims.dtype)

    # -- state -----------------------------------------------------------------
    def init(self, dims: Dims):
        raise TypeError("MiniCache is a cross-layer policy: its state is built whole by "
                        "init_stacked(dims) (ml.kv.init_cache does this).")

    def nbytes(self, dims: Dims) -> int:
        raise TypeError("MiniCache is a cross-layer policy with no per-layer state; use "
                        "stacked_nbytes(dims) for the whole model's bytes.")

    def init_stacked(self, dims: Dims):
        self.validate(dims)
        _, p, _, _ = self.layout(dims.n_layers)
        ld = dims.n_layers - 2 * p
        b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
        r, dt = self.capacity(s), self._dtype(dims)
        z = jnp.zeros

        def merged():
            return {"dir": z((p, b, s, h, d), dt), "mag": z((p, 2, b, s, h), dt),
                    "ret": z((p, 2, b, r, h, d), dt),
                    "ret_pos": jnp.full((p, b, h, r), MAX_POS, jnp.int32),
                    "thr": jnp.full((p, b, h), -jnp.inf, jnp.float32)}
        return {"dense": {"k": z((ld, b, s, h, d), dt), "v": z((ld, b, s, h, d), dt)},
                "k": merged(), "v": merged()}

    def stacked_nbytes(self, dims: Dims) -> int:
        _, p, _, _ = self.layout(dims.n_layers)
        ld = dims.n_layers - 2 * p
        b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
        r, it = self.capacity(s), self._dtype(dims).itemsize
        per_kind = b * s * h * d * it + 2 * b * s * h * it + 2 * b * r * h * d * it + 4 * b * h * r + 4 * b * h
        return 2 * ld * b * s * h * d * it + 2 * p * per_kind

    # -- helpers ---------------------------------------------------------------
    def _shape_info(self, state):
        ld = state["dense"]["k"].shape[0]
        p = state["k"]["dir"].shape[0]
        return self.layout(ld + 2 * p)

    @staticmethod
    def reconstruct(part, pair, role):
        """Float32 ``[B, S, Hkv, D]``: layer ``role`` (0/1) of ``pair`` from the merged part --
        ``|x| m`` everywhere, the retained exact vectors at their positions."""
        dirs = _get_index(part["dir"], pair).astype(jnp.float32)
        mag = _get_index(_get_index(part["mag"], pair), role).astype(jnp.float32)
        x = mag[..., None] * dirs
        ret = _get_index(_get_index(part["ret"], pair), role).astype(jnp.float32)   # [B, R, Hkv, D]
        pos = _get_index(part["ret_pos"], pair)                                      # [B, Hkv, R]
        b, _, h, _ = x.shape
        if pos.shape[-1] == 0:
            return x
        rows = jnp.arange(b)[:, None, None]
        heads = jnp.arange(h)[None, None, :]
        return x.at[rows, jnp.swapaxes(pos, 1, 2), heads].set(ret, mode="drop")

    def _merge_prompt(self, part, pair, x_r, ctx):
        """Second layer of ``pair`` at prefill: merge with the partner's raw vectors."""
        t = x_r.shape[1]
        slots = prompt_positions(ctx)                                 # [B, T], padding MAX_POS
        raw = _get_index(part["dir"], pair)                           # partner's raw, slot = pos
        idx = jnp.clip(ctx.positions, 0, raw.shape[1] - 1)
        x_l = jnp.take_along_axis(raw, idx[:, :, None, None], axis=1)  # [B, T, Hkv, D]
        m, nl, nr, dist = slerp_merge(x_l, x_r, self.t)
        new = dict(part)
        new["dir"] = _set_index(part["dir"], pair, write_tokens(raw, m, slots))
        mags = _get_index(part["mag"], pair)
        mags = jnp.stack([write_tokens(mags[0], nl, slots), write_tokens(mags[1], nr, slots)])
        new["mag"] = _set_index(part["mag"], pair, mags)
        r = part["ret_pos"].shape[-1]
        valid = (jnp.arange(t)[None, :] < ctx.n_new[:, None])[:, None, :]       # [B, 1, T]
        prio = jnp.where(valid, jnp.swapaxes(dist, 1, 2), -jnp.inf)             # [B, Hkv, T]
        if r == 0:
            thr = jnp.max(prio, axis=-1)
        else:
            pad = max(r - t, 0)
            vals, top = jax.lax.top_k(jnp.pad(prio, ((0, 0), (0, 0), (0, pad)),
                                              constant_values=-jnp.inf), r)     # [B, Hkv, R]
            k = ceil_frac(self.retain, ctx.n_new)                               # [B]
            keep = (jnp.arange(r)[None, None, :] < k[:, None, None]) & (vals > -jnp.inf)
            if self.threshold is not None:
                keep &= vals > self.threshold
            top = jnp.where(keep, top, 0).astype(jnp.int32)
            pos = jnp.take_along_axis(jnp.broadcast_to(ctx.positions[:, None, :], prio.shape),
                                      jnp.minimum(top, t - 1), axis=-1)
            new["ret_pos"] = _set_index(part["ret_pos"], pair, jnp.where(keep, pos, MAX_POS))
            ret = jnp.stack([gather_tokens(x_l, top, keep, part["ret"].dtype),
                             gather_tokens(x_r, top, keep, part["ret"].dtype)])
            new["ret"] = _set_index(part["ret"], pair, ret)
            hit = (jnp.arange(t)[None, None, None, :] == top[..., None]) & keep[..., None]
            thr = jnp.max(jnp.where(hit.any(-2), -jnp.inf, prio), axis=-1)     # [B, Hkv]
        new["thr"] = _set_index(part["thr"], pair, thr)
        return new

    def _merge_token(self, part, pair, x_r, ctx):
        """Second layer of ``pair`` at decode: merge the new token, retain it if distant."""
        b = x_r.shape[0]
        p = ctx.positions[:, 0]
        raw = _get_index(part["dir"], pair)
        x_l = raw[jnp.arange(b), jnp.clip(p, 0, raw.shape[1] - 1)]            # [B, Hkv, D]
        x_r = x_r[:, 0]
        m, nl, nr, dist = slerp_merge(x_l, x_r, self.t)                      # dist [B, Hkv]
        new = dict(part)
        new["dir"] = _set_index(part["dir"], pair, write_tokens(raw, m[:, None], p[:, None]))
        mags = _get_index(part["mag"], pair)
        mags = jnp.stack([write_tokens(mags[0], nl[:, None], p[:, None]),
                          write_tokens(mags[1], nr[:, None], p[:, None])])
        new["mag"] = _set_index(part["mag"], pair, mags)
        if part["ret_pos"].shape[-1]:
            rpos = _get_index(part["ret_pos"], pair)                          # [B, Hkv, R]
            free = rpos == MAX_POS
            slot = jnp.argmax(free, axis=-1)                                  # [B, Hkv]
            bar = _get_index(part["thr"], pair)
            if self.threshold is not None:
                bar = jnp.maximum(bar, self.threshold)
            want = free.any(-1) & (dist > bar)
            h = rpos.shape[1]
            rows, heads = jnp.arange(b)[:, None], jnp.arange(h)[None, :]
            slot = jnp.where(want, slot, rpos.shape[-1])                      # out of range: dropped
            rpos = rpos.at[rows, heads, slot].set(jnp.broadcast_to(p[:, None], (b, h)), mode="drop")
            new["ret_pos"] = _set_index(part["ret_pos"], pair, rpos)
            ret = _get_index(part["ret"], pair)                               # [2, B, R, Hkv, D]
            ret = jnp.stack([ret[0].at[rows, slot, heads].set(x_l.astype(ret.dtype), mode="drop"),
                             ret[1].at[rows, slot, heads].set(x_r.astype(ret.dtype), mode="drop")])
            new["ret"] = _set_index(part["ret"], pair, ret)
        return new

    @staticmethod
    def _write_raw(part, pair, x, slots):
        raw = _get_index(part["dir"], pair)
        return {**part, "dir": _set_index(part["dir"], pair, write_tokens(raw, x, slots))}

    # -- protocol ----------------------------------------------------------------
    def prefill(self, state, q, k, v, ctx):
        _, _, kind, index = self._shape_info(state)
        out = attend(q, k, v, ctx.positions, prompt_positions(ctx))
        slots = prompt_positions(ctx)
        i = jnp.asarray(index)[ctx.layer]

        def dense(st):
            d = st["dense"]
            new = {"k": _set_index(d["k"], i, write_tokens(_get_index(d["k"], i), k, slots)),
                   "v": _set_index(d["v"], i, write_tokens(_get_index(d["v"], i), v, slots))}
            return {**st, "dense": new}

        def first(st):
            return {**st, "k": self._write_raw(st["k"], i, k, slots),
                    "v": self._write_raw(st["v"], i, v, slots)}

        def second(st):
            return {**st, "k": self._merge_prompt(st["k"], i, k, ctx),
                    "v": self._merge_prompt(st["v"], i, v, ctx)}

        if state["dense"]["k"].shape[0] == 0:     # no dense layer: that branch never runs
            dense = lambda st: st  # noqa: E731
        state = jax.lax.switch(jnp.asarray(kind)[ctx.layer], [dense, first, second], state)
        return out, state

    def decode(self, state, q, k, v, ctx):
        if q.shape[1] != 1:
            raise ValueError(f"MiniCache.decode takes one token per row, got T={q.shape[1]}.")
        _, _, kind, index = self._shape_info(state)
        i = jnp.asarray(index)[ctx.layer]
        p = ctx.positions[:, 0]

        def attend_all(keys, values, kx, vx):
            """Attend over slots <= p with this step's own token exact (storage-rounded)."""
            b, s = keys.shape[:2]
            rows = jnp.arange(b)
            keys = keys.at[rows, p].set(kx[:, 0].astype(keys.dtype), mode="drop")
            values = values.at[rows, p].set(vx[:, 0].astype(values.dtype), mode="drop")
            slot = jnp.arange(s, dtype=jnp.int32)[None, :]
            kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
            return attend(q, keys, values, ctx.positions, kv_pos)

        def own(st, x):          # this token as stored (storage dtype), float32 for attention
            return x.astype(st["dense"]["k"].dtype).astype(jnp.float32)

        def dense(st):
            d = st["dense"]
            kk = write_tokens(_get_index(d["k"], i), k, ctx.positions)
            vv = write_tokens(_get_index(d["v"], i), v, ctx.positions)
            st = {**st, "dense": {"k": _set_index(d["k"], i, kk), "v": _set_index(d["v"], i, vv)}}
            return attend_all(kk.astype(jnp.float32), vv.astype(jnp.float32),
                              own(st, k), own(st, v)), st

        def pair_step(st, role):
            keys = self.reconstruct(st["k"], i, role)
            values = self.reconstruct(st["v"], i, role)
            out = attend_all(keys, values, own(st, k), own(st, v))
            if role == 0:
                st = {**st, "k": self._write_raw(st["k"], i, k, ctx.positions),
                      "v": self._write_raw(st["v"], i, v, ctx.positions)}
            else:
                st = {**st, "k": self._merge_token(st["k"], i, k, ctx),
                      "v": self._merge_token(st["v"], i, v, ctx)}
            return out, st

        if state["dense"]["k"].shape[0] == 0:     # no dense layer: that branch never runs
            dense = lambda st: (jnp.zeros_like(q), st)  # noqa: E731
        branches = [dense, lambda st: pair_step(st, 0), lambda st: pair_step(st, 1)]
        return jax.lax.switch(jnp.asarray(kind)[ctx.layer], branches, state)
