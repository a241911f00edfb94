"""KVQuant: pre-RoPE per-channel keys, non-uniform levels and dense-and-sparse outliers, as a KV policy.

Hooper et al. 2024, "KVQuant: Towards 10 Million Context Length LLM Inference
with KV Cache Quantization" (NeurIPS 2024).  Its ingredients, and what this
policy implements of each:

1. **Per-channel key quantization** (keys have outlier channels) and
   **per-token value quantization**.  Here: one (center, scale) pair per key
   channel per KV head per row, and one pair per value token per group of
   ``group_size`` channels (``None``: the whole head, the paper's per-token).
2. **Pre-RoPE keys**: RoPE mixes channel pairs with a position-dependent
   rotation, which smears the channel structure; KVQuant quantizes keys before
   RoPE and applies RoPE on the fly.  Here the cache stores ``ctx.k_pre`` and
   every attention step dequantizes all stored keys and applies ``ctx.rope``
   with each slot's position (slot index = token position).
3. **Non-uniform datatype** (``nuqX``): the paper derives per-layer levels
   offline by sensitivity-weighted (Fisher) k-means on calibration data.
   Stand-ins (no calibration set, no gradients), chosen by ``levels``:

   * ``"nf"``: the k-means (Lloyd-Max) codebook of a standard normal, i.e.
     what unweighted k-means converges to on Gaussian data, started from the
     normal-float quantiles ``Phi^-1((i + 1/2) / 2**bits)`` and iterated to
     convergence, applied as ``x = mean + std * level`` with the statistics
     of the group being quantized (so entries beyond the outermost level,
     2.73 std at 4 bits, are clamped).
   * ``"uniform"``: ``2**bits`` evenly spaced levels on ``[-1, 1]`` applied as
     ``x = mid + half_range * level`` (asymmetric min/max integer quantization).
   * ``"kmeans"``: closest to the paper: entries are normalized to ``[-1, 1]``
     by the range (as "uniform"), and each row fits its own 1-D k-means
     codebook (25 Lloyd iterations from the uniform levels, no sensitivity
     weights) per layer at prefill, one for keys and one for values, over the
     prompt's normalized non-outlier, non-sink entries; decode tokens use it.
     The codebooks are state (``k_levels``, ``v_levels`` float32 ``[B, 2**bits]``).

   The fixed codebooks are :func:`levels`.
4. **Dense-and-sparse**: the largest ``outlier_fraction`` of entries are kept
   exactly in a sparse side buffer and excluded from the quantization range.
   Here, so that shapes are static, every token row of every KV head keeps a
   fixed count ``n_out = ceil(outlier_fraction * head_dim)`` (0 when the fraction
   is 0) of entries: value outliers are the row's largest ``|v|`` (the paper's
   online per-token thresholds); key outliers are the row's largest
   *normalized* deviations ``|k - center_c| / scale_c`` (the paper calibrates
   per-channel key thresholds offline; normalizing by the channel statistics
   keeps the budget off channels whose magnitude the per-channel scale already
   absorbs).  Sparse storage: channel indices (uint8, uint16 past 256
   channels) and exact values in the cache dtype.
5. **Calibration**: the paper calibrates key statistics offline.  Here the
   "online" variant: per-channel key statistics are computed at prefill from
   the row's valid prompt tokens (pre-RoPE, outliers removed: a first pass
   with mean/std picks each token's outliers, the statistics are then
   recomputed over the remaining entries) and kept for every decode token.
   Decode tokens are quantized immediately with those statistics (no float
   residual), so a key outside the prompt's range is clamped to the outermost
   level unless it is among the row's sparse outliers.  Prompts should have
   more than a handful of tokens: a one-token prompt gives zero spread, and
   decode keys then collapse to the channel's center apart from their
   outliers.
6. **Attention-sink awareness** (KVQuant v2): the first ``sink`` tokens
   (default 1) are also kept in the cache dtype (``k_sink`` pre-RoPE,
   ``v_sink``) and left out of the key statistics and codebooks; their codes
   are still written (the slots exist) but dequantization overwrites them.
   Not implemented: Q-Norm, per-layer offline calibration, sensitivity weights.

Measured (SmolLM2-135M, two 384-token prompts of the CPython LICENSE text +
128 teacher-forced decode steps, float32, mean KL(dense || policy) of the
next-token distribution; dense NLL 1.670), 1% outliers, sink 1:

=======  ======  ========  =======  ============================
bits     "nf"    "uniform" "kmeans" bytes / dense (float32 cache)
=======  ======  ========  =======  ============================
4        0.105   0.036     0.033    0.164
3        0.214   0.174     0.122    0.133
2        0.737   0.948     0.495    0.102
=======  ======  ========  =======  ============================

Without the sink token (sink=0) "nf" is much worse (KL 0.45 at 4 bits, 0.71 at
3) and "uniform" slightly (0.051 at 4, 0.193 at 3); 3-bit "uniform" without
outliers: 0.255, with 5% outliers: 0.117.

Layout of one layer's state (``B`` rows, ``S = max_len`` slots, ``Hkv`` heads,
head dim ``D``, ``Gv`` value group, ``cb = D * bits / 8`` code bytes per row,
``O = n_out``):

==================  =====================  ==================================================
leaf                shape                  content
==================  =====================  ==================================================
``k_codes`` uint8   ``[B, S, Hkv, cb]``    pre-RoPE key codes, :func:`pack_bits` along channels
``k_center``        ``[B, Hkv, D]``        per-channel key center (scale dtype)
``k_scale``         ``[B, Hkv, D]``        per-channel key scale
``k_idx``           ``[B, S, Hkv, O]``     outlier channel indices (uint8 / uint16)
``k_val``           ``[B, S, Hkv, O]``     outlier exact pre-RoPE values (cache dtype)
``v_codes`` uint8   ``[B, S, Hkv, cb]``    value codes
``v_center``        ``[B, S, Hkv, D/Gv]``  per-token-group value center
``v_scale``         ``[B, S, Hkv, D/Gv]``  per-token-group value scale
``v_idx``, ``v_val`` ``[B, S, Hkv, O]``    value outliers
``k_sink``          ``[B, n_s, Hkv, D]``   first ``n_s = min(sink, S)`` pre-RoPE keys, float
``v_sink``          ``[B, n_s, Hkv, D]``   first ``n_s`` values, float (both only if sink > 0)
``k_levels``        ``[B, 2**bits]``       k-means key codebook, float32 (only "kmeans")
``v_levels``        ``[B, 2**bits]``       k-means value codebook, float32 (only "kmeans")
==================  =====================  ==================================================

Codes: the nearest level (``code = #{midpoints m_i < t}`` with ``t = (x - center) /
scale``, ``scale == 0`` gives ``t = 0``); packed by :func:`memlab.kv.kivi.pack_bits`
(a little-endian bit stream: code ``i`` in stream bits ``[i*bits, (i+1)*bits)``,
so 3-bit codes fill 3 bytes per 8 channels).  Dequantization:
``x = center + scale * levels[code]`` (float32), then the ``O`` outliers
overwrite their channels and the sink buffers their slots.  Empty slots are masked by position (slot ``p`` is
visible to a query at position ``q`` iff ``p <= q``).

Bytes (``ss``, ``fs``, ``is`` the itemsizes of scales, cache dtype, indices)::

    B*S*Hkv*(2*cb + 2*(D/Gv)*ss + 2*O*(is + fs)) + 2*B*Hkv*D*ss
      + 2*B*n_s*Hkv*D*fs + (2*B*2**bits*4 if levels == "kmeans")
"""
from __future__ import annotations

import dataclasses
import functools
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np

from memlab.kv.base import POLICIES
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions, write_tokens
from memlab_kernels._packing import pack_bits, unpack_bits

__all__ = ["KVQuant", "levels"]

_BITS = (2, 3, 4)
_LEVELS = ("nf", "uniform", "kmeans")
_SCALE_DTYPES = ("float32", "bfloat16")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=None)
def levels(bits: int, kind: str = "nf") -> np.ndarray:
    """The ``2**bits`` sorted float32 levels of a codebook ("nf" or "uniform").

    "nf": the Lloyd-Max (k-means) quantizer of N(0, 1), in units of standard
    deviations, started from the normal-float quantiles ``Phi^-1((i + 1/2) / n)``:
    thresholds are midpoints of neighbouring levels, each level the mean of the
    normal restricted to its cell, ``(phi(a) - phi(b)) / (Phi(b) - Phi(a))``.
    (2 bits: +-0.4528, +-1.5104.)  "uniform": ``-1 + 2 i / (n - 1)``.
    """
    n = 2 ** bits
    if kind == "uniform":
        return np.linspace(-1.0, 1.0, n).astype(np.float32)
    if kind != "nf":
        raise ValueError(f"levels: kind={kind!r}; use 'nf' or 'uniform'.")
    nd = NormalDist()
    lv = [nd.inv_cdf((i + 0.5) / n) for i in range(n)]
    for _ in range(500):
        th = [-math.inf] + [(a + b) / 2 for a, b in zip(lv[:-1], lv[1:])] + [math.inf]
        pdf = [0.0 if math.isinf(t) else nd.pdf(t) for t in th]
        cdf = [0.0 if t == -math.inf else 1.0 if t == math.inf else nd.cdf(t) for t in th]
        new = [(pdf[i] - pdf[i + 1]) / (cdf[i + 1] - cdf[i]) for i in range(n)]
        if max(abs(a - b) for a, b in zip(new, lv)) < 1e-12:
            lv = new
            break
        lv = new
    return np.asarray(lv, np.float32)


def _n_outliers(fraction: float, d: int) -> int:
    return 0 if fraction <= 0 else min(d, math.ceil(fraction * d - 1e-9))


def _nearest(t, cb):
    """Index of the nearest level: the number of midpoints below ``t``.

    ``t [B, ...]``; ``cb [B or 1, n]`` sorted codebooks, one per row.
    """
    mids = (cb[:, 1:] + cb[:, :-1]) / 2
    mids = mids.reshape((mids.shape[0],) + (1,) * (t.ndim - 1) + (mids.shape[-1],))
    return jnp.sum(t[..., None] > mids, axis=-1).astype(jnp.uint8)


def _lookup(codes, cb):
    """``cb[b, codes[b, ...]]`` as float32 (``cb [B or 1, n]``)."""
    b = codes.shape[0]
    cb = jnp.broadcast_to(cb.astype(jnp.float32), (b, cb.shape[-1]))
    flat = codes.reshape(b, -1).astype(jnp.int32)
    return jnp.take_along_axis(cb, flat, axis=1).reshape(codes.shape)


def _kmeans(t, mask, n, iters=25):
    """Per-row 1-D k-means (Lloyd) codebooks ``[B, n]`` of the entries ``t[b]`` where ``mask[b]``.

    Started from ``n`` uniform levels on ``[-1, 1]`` (the range the entries are
    normalized to); a level whose cell is empty keeps its value.
    """
    b = t.shape[0]
    tf = t.reshape(b, -1).astype(jnp.float32)
    mf = mask.reshape(b, -1).astype(jnp.float32)
    row = jnp.arange(b, dtype=jnp.int32)[:, None] * n

    def step(_, cb):
        seg = (_nearest(tf, cb).astype(jnp.int32) + row).reshape(-1)
        sums = jax.ops.segment_sum((tf * mf).reshape(-1), seg, num_segments=b * n).reshape(b, n)
        cnt = jax.ops.segment_sum(mf.reshape(-1), seg, num_segments=b * n).reshape(b, n)
        new = jnp.where(cnt > 0, sums / jnp.maximum(cnt, 1.0), cb)
        return jnp.sort(new, axis=-1)

    init = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32), (b, n))
    return jax.lax.fori_loop(0, iters, step, init)


def _safe_inv(s):
    return jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)


def _pick(score, n_out):
    """Indices ``[..., n_out]`` of the largest ``score`` per row and the boolean mask ``[..., D]``."""
    d = score.shape[-1]
    _, idx = jax.lax.top_k(score, n_out)
    hit = jnp.any(idx[..., :, None] == jnp.arange(d), axis=-2)
    return idx, hit


def _stats(x, mask, axis, kind):
    """(center, scale) of the entries of ``x`` where ``mask``, reduced over ``axis`` (kept)."""
    m = mask.astype(jnp.float32)
    cnt = jnp.sum(m, axis=axis, keepdims=True)
    if kind == "nf":       # mean / std; "uniform" and "kmeans": mid-range / half-range
        mean = jnp.sum(x * m, axis=axis, keepdims=True) / jnp.maximum(cnt, 1.0)
        var = jnp.sum(((x - mean) * m) ** 2, axis=axis, keepdims=True) / jnp.maximum(cnt, 1.0)
        return mean, jnp.sqrt(var)
    mn = jnp.min(jnp.where(mask, x, jnp.inf), axis=axis, keepdims=True)
    mx = jnp.max(jnp.where(mask, x, -jnp.inf), axis=axis, keepdims=True)
    ok = cnt > 0
    mn, mx = jnp.where(ok, mn, 0.0), jnp.where(ok, mx, 0.0)
    return (mn + mx) / 2, (mx - mn) / 2


@POLICIES.register("kvquant")
@dataclasses.dataclass(frozen=True)
class KVQuant(KVPolicy):
    """KVQuant KV cache (see the module doc for the method, layout and deviations).

    Args:
      bits: 2, 3 or 4 bits per dense entry.
      outlier_fraction: fraction of each token row's entries kept exactly
        (rounded up to whole entries per ``head_dim`` row; 0 disables).
      group_size: value channels per (center, scale); None = ``head_dim``.
      levels: "nf" (Gaussian k-means codebook, std-scaled), "uniform"
        (min/max-scaled) or "kmeans" (per-row k-means codebook fit at
        prefill, range-scaled; the best of the three in our measurements).
      scale_dtype: "float32" or "bfloat16" centers and scales.
      sink: the first ``sink`` tokens are kept in the cache dtype (0: none).
    """

    name = "kvquant"
    bits: int = 4
    outlier_fraction: float = 0.01
    group_size: int | None = None
    levels: str = "nf"
    scale_dtype: str = "float32"
    sink: int = 1

    def __post_init__(self):
        self._check_fields()

    # ---------------------------------------------------------------- checks
    def _check_fields(self):
        if isinstance(self.bits, bool) or self.bits not in _BITS:
            raise ValueError(f"KVQuant: bits={self.bits!r} is not supported; use one of {_BITS} "
                             "(e.g. KVQuant(bits=3) or the policy string 'kvquant3').")
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 0.5:
            raise ValueError(f"KVQuant: outlier_fraction={f!r} must be a number in [0, 0.5) "
                             "(e.g. 0.01 keeps 1% of each token's entries exactly; 0 disables).")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0):
            raise ValueError(f"KVQuant: group_size={g!r} must be a positive int or None "
                             "(None: one value scale per token per head).")
        if self.levels not in _LEVELS:
            raise ValueError(f"KVQuant: levels={self.levels!r}; use one of {_LEVELS}.")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"KVQuant: scale_dtype={self.scale_dtype!r}; use one of "
                             f"{_SCALE_DTYPES}.")
        if isinstance(self.sink, bool) or not isinstance(self.sink, (int, np.integer)) or self.sink < 0:
            raise ValueError(f"KVQuant: sink={self.sink!r} must be an int >= 0 (the first `sink` "
                             "tokens are kept in the cache dtype; 0 quantizes every token).")

    def validate(self, dims: Dims) -> None:
        self._check_fields()
        d = dims.head_dim
        per = 8 // math.gcd(8, self.bits)
        if d % per:
            raise ValueError(f"KVQuant: head_dim={d} does not pack into whole bytes at "
                             f"bits={self.bits}; head_dim must be a multiple of {per}.")
        g = self._group(d)
        if d % g:
            raise ValueError(f"KVQuant: group_size={g} does not divide head_dim={d}; use a "
                             f"divisor of {d} or group_size=None.")
        if dims.max_len < 1:
            raise ValueError(f"KVQuant: max_len={dims.max_len} must be positive.")
        if dims.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"KVQuant: cache dtype {dims.dtype!r} is not supported; use one of "
                            f"{_FLOAT_DTYPES}.")

    # ---------------------------------------------------------------- sizes
    def _group(self, d):
        return d if self.group_size is None else self.group_size

    def n_outliers(self, head_dim: int) -> int:
        """Sparse entries kept per token row per KV head."""
        return _n_outliers(self.outlier_fraction, head_dim)

    def _idx_dtype(self, d):
        return jnp.dtype(jnp.uint8 if d <= 256 else jnp.uint16)

    def nbytes(self, dims: Dims) -> int:
        b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
        cb, o, gv = d * self.bits // 8, self.n_outliers(d), d // self._group(d)
        ss = jnp.dtype(self.scale_dtype).itemsize
        fs, isz = jnp.dtype(dims.dtype).itemsize, self._idx_dtype(d).itemsize
        books = 2 * b * 2 ** self.bits * 4 if self.levels == "kmeans" else 0
        sink = 2 * b * min(self.sink, s) * h * d * fs
        return (b * s * h * (2 * cb + 2 * gv * ss + 2 * o * (isz + fs)) + 2 * b * h * d * ss
                + books + sink)

    # ---------------------------------------------------------------- state
    def init(self, dims: Dims):
        b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
        cb, o, gv = d * self.bits // 8, self.n_outliers(d), d // self._group(d)
        sdt, fdt, idt = jnp.dtype(self.scale_dtype), jnp.dtype(dims.dtype), self._idx_dtype(d)
        z = jnp.zeros
        st = {
            "k_codes": z((b, s, h, cb), jnp.uint8), "k_center": z((b, h, d), sdt),
            "k_scale": z((b, h, d), sdt), "k_idx": z((b, s, h, o), idt), "k_val": z((b, s, h, o), fdt),
            "v_codes": z((b, s, h, cb), jnp.uint8), "v_center": z((b, s, h, gv), sdt),
            "v_scale": z((b, s, h, gv), sdt), "v_idx": z((b, s, h, o), idt), "v_val": z((b, s, h, o), fdt),
        }
        if self.sink:
            st["k_sink"] = z((b, min(self.sink, s), h, d), fdt)
            st["v_sink"] = z((b, min(self.sink, s), h, d), fdt)
        if self.levels == "kmeans":
            st["k_levels"] = z((b, 2 ** self.bits), jnp.float32)
            st["v_levels"] = z((b, 2 ** self.bits), jnp.float32)
        return st

    # ---------------------------------------------------------------- encoding
    def _codebook(self, st, which):
        """``[B or 1, 2**bits]`` levels: the fixed table, or the row's k-means levels."""
        if self.levels == "kmeans":
            return st[f"{which}_levels"]
        return jnp.asarray(levels(self.bits, self.levels))[None]

    def _key_norm(self, x, center, scale):
        """Normalized pre-RoPE keys ``t [B, T, Hkv, D]`` and each row's outlier indices."""
        c = center.astype(jnp.float32)[:, None]
        t = (x.astype(jnp.float32) - c) * _safe_inv(scale.astype(jnp.float32))[:, None]
        o = self.n_outliers(x.shape[-1])
        return t, (_pick(jnp.abs(t), o) if o else None)

    def _value_norm(self, x):
        """Per-token(-group) stats of values ``x [B, T, Hkv, D]``; normalized ``t`` and outliers."""
        x = x.astype(jnp.float32)
        *lead, d = x.shape
        g = self._group(d)
        o = self.n_outliers(d)
        out = _pick(jnp.abs(x), o) if o else None
        hit = out[1] if o else jnp.zeros(x.shape, bool)
        xg, mg = x.reshape(*lead, d // g, g), (~hit).reshape(*lead, d // g, g)
        center, scale = _stats(xg, mg, -1, self.levels)
        sdt = jnp.dtype(self.scale_dtype)
        center, scale = center.astype(sdt), scale.astype(sdt)
        t = (xg - center.astype(jnp.float32)) * _safe_inv(scale.astype(jnp.float32))
        return t.reshape(x.shape), out, center[..., 0], scale[..., 0]

    def _sparse(self, x, out, st, which):
        """The fixed-count sparse buffer ``(idx, val)`` of ``x``'s rows."""
        idt, vdt = st[f"{which}_idx"].dtype, st[f"{which}_val"].dtype
        if out is None:
            return jnp.zeros(x.shape[:-1] + (0,), idt), jnp.zeros(x.shape[:-1] + (0,), vdt)
        idx = out[0]
        return idx.astype(idt), jnp.take_along_axis(x, idx, axis=-1).astype(vdt)

    def _write(self, st, k_pre, v, slots):
        tk, kout = self._key_norm(k_pre, st["k_center"], st["k_scale"])
        kc = pack_bits(_nearest(tk, self._codebook(st, "k")), self.bits)
        ki, kv = self._sparse(k_pre, kout, st, "k")
        tv, vout, vce, vsc = self._value_norm(v)
        vc = pack_bits(_nearest(tv, self._codebook(st, "v")), self.bits)
        vi, vv = self._sparse(v, vout, st, "v")
        new = dict(st)
        for f, x in (("k_codes", kc), ("k_idx", ki), ("k_val", kv), ("v_codes", vc),
                     ("v_center", vce), ("v_scale", vsc), ("v_idx", vi), ("v_val", vv)):
            new[f] = write_tokens(st[f], x, slots)
        if self.sink:   # positions < sink also go to the float buffer (others are dropped)
            new["k_sink"] = write_tokens(st["k_sink"], k_pre, slots)
            new["v_sink"] = write_tokens(st["v_sink"], v, slots)
        return new

    def _key_stats(self, x, valid):
        """Per-channel (center, scale) ``[B, Hkv, D]`` of pre-RoPE prompt keys ``x [B, T, Hkv, D]``."""
        x = x.astype(jnp.float32)
        mask = jnp.broadcast_to(valid[:, :, None, None], x.shape)
        o = self.n_outliers(x.shape[-1])
        if o:
            mean0, std0 = _stats(x, mask, 1, "nf")
            _, hit = _pick(jnp.abs(x - mean0) * _safe_inv(std0), o)
            mask = mask & ~hit
        center, scale = _stats(x, mask, 1, self.levels)
        sdt = jnp.dtype(self.scale_dtype)
        return center[:, 0].astype(sdt), scale[:, 0].astype(sdt)

    def _fit_codebooks(self, st, k_pre, v, valid):
        """k-means levels of the prompt's normalized non-outlier keys and values (per row)."""
        n = 2 ** self.bits
        m = valid[:, :, None, None]
        tk, kout = self._key_norm(k_pre, st["k_center"], st["k_scale"])
        mk = m & ~kout[1] if kout is not None else jnp.broadcast_to(m, tk.shape)
        tv, vout, _, _ = self._value_norm(v)
        mv = m & ~vout[1] if vout is not None else jnp.broadcast_to(m, tv.shape)
        return _kmeans(tk, mk, n), _kmeans(tv, mv, n)

    # ---------------------------------------------------------------- steps
    def prefill(self, state, q, k, v, ctx):
        slots = prompt_positions(ctx)
        valid = (slots != MAX_POS) & (slots >= self.sink)   # sink tokens stay out of the statistics
        st = dict(state)
        st["k_center"], st["k_scale"] = self._key_stats(ctx.k_pre, valid)
        if self.levels == "kmeans":
            st["k_levels"], st["v_levels"] = self._fit_codebooks(st, ctx.k_pre, v, valid)
        st = self._write(st, ctx.k_pre, v, slots)
        return attend(q, k, v, ctx.positions, slots), st

    def decode(self, state, q, k, v, ctx):
        st = self._write(state, ctx.k_pre, v, ctx.positions)
        k_pre, vd = self.dequantize(st)
        s = k_pre.shape[1]
        slot = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :], (k_pre.shape[0], s))
        kd = ctx.rope(k_pre.astype(q.dtype), slot)
        kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
        return attend(q, kd, vd.astype(q.dtype), ctx.positions, kv_pos), st

    # ---------------------------------------------------------------- views
    def dequantize(self, state):
        """Float32 ``(k_pre, v)`` ``[B, S, Hkv, D]`` of every slot (keys before RoPE)."""
        d = state["k_center"].shape[-1]
        g = self._group(d)

        def sparse(x, idx, val):
            if idx.shape[-1] == 0:
                return x
            onehot = idx.astype(jnp.int32)[..., :, None] == jnp.arange(d)
            hit = jnp.any(onehot, axis=-2)
            over = jnp.sum(jnp.where(onehot, val.astype(jnp.float32)[..., None], 0.0), axis=-2)
            return jnp.where(hit, over, x)

        kc = _lookup(unpack_bits(state["k_codes"], self.bits), self._codebook(state, "k"))
        k = (state["k_center"].astype(jnp.float32)[:, None]
             + state["k_scale"].astype(jnp.float32)[:, None] * kc)
        vc = _lookup(unpack_bits(state["v_codes"], self.bits), self._codebook(state, "v"))
        v = (jnp.repeat(state["v_center"].astype(jnp.float32), g, axis=-1)
             + jnp.repeat(state["v_scale"].astype(jnp.float32), g, axis=-1) * vc)
        k, v = sparse(k, state["k_idx"], state["k_val"]), sparse(v, state["v_idx"], state["v_val"])
        if self.sink:
            n = state["k_sink"].shape[1]
            k = k.at[:, :n].set(state["k_sink"].astype(jnp.float32))
            v = v.at[:, :n].set(state["v_sink"].astype(jnp.float32))
        return k, v
