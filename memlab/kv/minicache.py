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
selects its role from the traced ``ctx.layer``: every layer computes the
dense and the pair update of its slices and writes only its own with a
slice-sized ``where`` -- a ``lax.switch`` over the whole state made XLA copy the
state at every layer, many times slower on SmolLM2):

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

from memlab.kv.base import POLICIES
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
        """Second layer of ``pair`` at prefill: the new slices of ``pair`` after merging the
        partner's raw vectors (read back from the direction buffer) with ``x_r``."""
        t = x_r.shape[1]
        slots = prompt_positions(ctx)                                 # [B, T], padding MAX_POS
        raw = _get_index(part["dir"], pair)                           # partner's raw, slot = pos
        idx = jnp.clip(ctx.positions, 0, raw.shape[1] - 1)
        x_l = jnp.take_along_axis(raw, idx[:, :, None, None], axis=1)  # [B, T, Hkv, D]
        m, nl, nr, dist = slerp_merge(x_l, x_r, self.t)
        mags = _get_index(part["mag"], pair)
        new = {"dir": write_tokens(raw, m, slots),
               "mag": jnp.stack([write_tokens(mags[0], nl, slots), write_tokens(mags[1], nr, slots)])}
        r = part["ret_pos"].shape[-1]
        valid = (jnp.arange(t)[None, :] < ctx.n_new[:, None])[:, None, :]       # [B, 1, T]
        prio = jnp.where(valid, jnp.swapaxes(dist, 1, 2), -jnp.inf)             # [B, Hkv, T]
        if r == 0:
            new["thr"] = jnp.max(prio, axis=-1)
            return new
        pad = max(r - t, 0)
        vals, top = jax.lax.top_k(jnp.pad(prio, ((0, 0), (0, 0), (0, pad)),
                                          constant_values=-jnp.inf), r)         # [B, Hkv, R]
        k = ceil_frac(self.retain, ctx.n_new)                                   # [B]
        keep = (jnp.arange(r)[None, None, :] < k[:, None, None]) & (vals > -jnp.inf)
        if self.threshold is not None:
            keep &= vals > self.threshold
        top = jnp.where(keep, top, 0).astype(jnp.int32)
        pos = jnp.take_along_axis(jnp.broadcast_to(ctx.positions[:, None, :], prio.shape),
                                  jnp.minimum(top, t - 1), axis=-1)
        new["ret_pos"] = jnp.where(keep, pos, MAX_POS).astype(jnp.int32)
        new["ret"] = jnp.stack([gather_tokens(x_l, top, keep, part["ret"].dtype),
                                gather_tokens(x_r, top, keep, part["ret"].dtype)])
        hit = (jnp.arange(t)[None, None, None, :] == top[..., None]) & keep[..., None]
        new["thr"] = jnp.max(jnp.where(hit.any(-2), -jnp.inf, prio), axis=-1)  # [B, Hkv]
        return new

    def _merge_token(self, part, pair, x_r, ctx):
        """Second layer of ``pair`` at decode: the new slices after merging the new token and
        retaining it if it is distant."""
        b = x_r.shape[0]
        p = ctx.positions[:, 0]
        raw = _get_index(part["dir"], pair)
        x_l = raw[jnp.arange(b), jnp.clip(p, 0, raw.shape[1] - 1)]            # [B, Hkv, D]
        x_r = x_r[:, 0]
        m, nl, nr, dist = slerp_merge(x_l, x_r, self.t)                      # dist [B, Hkv]
        mags = _get_index(part["mag"], pair)
        new = {"dir": write_tokens(raw, m[:, None], p[:, None]),
               "mag": jnp.stack([write_tokens(mags[0], nl[:, None], p[:, None]),
                                 write_tokens(mags[1], nr[:, None], p[:, None])])}
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
            new["ret_pos"] = rpos.at[rows, heads, slot].set(jnp.broadcast_to(p[:, None], (b, h)),
                                                            mode="drop")
            ret = _get_index(part["ret"], pair)                               # [2, B, R, Hkv, D]
            new["ret"] = jnp.stack([
                ret[0].at[rows, slot, heads].set(x_l.astype(ret.dtype), mode="drop"),
                ret[1].at[rows, slot, heads].set(x_r.astype(ret.dtype), mode="drop")])
        return new

    @staticmethod
    def _commit(part, pair, new, cond):
        """Write the slices ``new`` at ``pair`` where ``cond`` (traced bool), else keep the old
        ones: slice-sized selects, so the stacked arrays are updated in place (no lax.cond,
        which would copy the whole state every layer)."""
        out = dict(part)
        for f, sl in new.items():
            old = _get_index(part[f], pair)
            out[f] = _set_index(part[f], pair, jnp.where(cond, sl.astype(old.dtype), old))
        return out

    def _pair_update(self, part, pair, role, x, ctx, slots, merge):
        """Both pair roles at once: role 0 writes its raw vectors into the direction buffer,
        role 1 merges (``merge``); only the active layer's slices are written."""
        raw = _get_index(part["dir"], pair)
        first = write_tokens(raw, x, slots)
        second = merge(part, pair, x, ctx)
        second["dir"] = jnp.where(role == 1, second["dir"], first)
        is_pair, is_second = role >= 0, role == 1
        out = self._commit(part, pair, {"dir": second.pop("dir")}, is_pair)
        return self._commit(out, pair, second, is_second)

    def _indices(self, state, layer):
        _, _, kind, index = self._shape_info(state)
        kind_l = jnp.asarray(kind)[layer]
        i = jnp.asarray(index)[layer]
        ld = state["dense"]["k"].shape[0]
        di = jnp.clip(i, 0, max(ld - 1, 0))
        pi = jnp.clip(i, 0, state["k"]["dir"].shape[0] - 1)
        role = kind_l - 1                                            # -1 dense, 0 first, 1 second
        return ld, di, pi, role

    # -- protocol ----------------------------------------------------------------
    def prefill(self, state, q, k, v, ctx):
        out = attend(q, k, v, ctx.positions, prompt_positions(ctx))
        slots = prompt_positions(ctx)
        ld, di, pi, role = self._indices(state, ctx.layer)
        new = dict(state)
        if ld:
            d = state["dense"]
            new["dense"] = {n: _set_index(d[n], di, jnp.where(
                role < 0, write_tokens(_get_index(d[n], di), x, slots), _get_index(d[n], di)))
                for n, x in (("k", k), ("v", v))}
        for n, x in (("k", k), ("v", v)):
            new[n] = self._pair_update(state[n], pi, role, x, ctx, slots, self._merge_prompt)
        return out, new

    def decode(self, state, q, k, v, ctx):
        if q.shape[1] != 1:
            raise ValueError(f"MiniCache.decode takes one token per row, got T={q.shape[1]}.")
        ld, di, pi, role = self._indices(state, ctx.layer)
        p = ctx.positions[:, 0]
        sdt = state["dense"]["k"].dtype
        new, kv = dict(state), {}
        for n, x in (("k", k), ("v", v)):
            rec = self.reconstruct(state[n], pi, jnp.maximum(role, 0))          # pair layers
            if ld:
                d = state["dense"][n]
                old = _get_index(d, di)
                written = write_tokens(old, x, ctx.positions)
                new.setdefault("dense", {})[n] = _set_index(d, di, jnp.where(role < 0, written, old))
                rec = jnp.where(role < 0, written.astype(jnp.float32), rec)
            b = rec.shape[0]
            # this step's own token exactly as stored (storage dtype), at its slot
            kv[n] = rec.at[jnp.arange(b), p].set(x[:, 0].astype(sdt).astype(jnp.float32), mode="drop")
            new[n] = self._pair_update(state[n], pi, role, x, ctx, ctx.positions, self._merge_token)
        s = kv["k"].shape[1]
        slot = jnp.arange(s, dtype=jnp.int32)[None, :]
        kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
        return attend(q, kv["k"], kv["v"], ctx.positions, kv_pos), new
