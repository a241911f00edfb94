"""KIVI: tuning-free asymmetric 2-bit quantization of the KV cache, as a KV policy.

Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV
Cache" (ICML 2024).  Keys have a few *channels* of large magnitude while values
show no channel structure, so KIVI quantizes

* **keys per channel**: one asymmetric (min/max) scale and zero per channel
  per group of ``G`` consecutive tokens, and
* **values per token**: one scale and zero per token per group of ``G``
  channels,

and keeps the tokens that do not yet fill a key group in a float **residual
window**.  Attention over the prompt uses the uncompressed prompt (as the
paper does); decode steps attend over the quantized cache.

Storage (``key_mode="channel"``, the paper's method) is the
:class:`memlab_kernels.quantized_kv_decode.KiviCache` of the KIVI decode kernel
itself, one per layer (``bits`` and ``group_size`` are static pytree metadata,
so :func:`memlab.kv.init_cache` stacks it over layers like any pytree); see that
module for the exact bit layout.  With ``B`` rows, ``Hkv`` KV heads, head dim
``D``, ``P = 8 // bits`` codes per byte:

==========================  ======================  =========================================
leaf                        shape                   content
==========================  ======================  =========================================
``k_codes`` uint8           ``[B, S/P, Hkv, D]``    keys packed along tokens (token ``i*P+j``
                                                    in bits ``[j*bits, (j+1)*bits)``)
``k_scale``, ``k_zero``     ``[B, S/G, Hkv, D]``    per channel per group of ``G`` tokens
``v_codes`` uint8           ``[B, S, Hkv, D/P]``    values packed along channels
``v_scale``, ``v_zero``     ``[B, S, Hkv, D/G]``    per token per group of ``G`` channels
``k_res``, ``v_res``        ``[B, R, Hkv, D]``      float residual (``Dims.dtype``)
``quantized_lengths``       ``[B]`` int32           tokens ``0..ql-1`` quantized (multiple of G)
``residual_lengths``        ``[B]`` int32           tokens ``ql..ql+rl-1`` in residual slots 0..rl-1
==========================  ======================  =========================================

Dequantization: ``x = code * scale + zero`` (float32).  Quantization:
``scale = (max - min) / (2**bits - 1)``, ``zero = min`` (rounded to
``scale_dtype``), ``code = clip(round((x - zero) / scale))``.

Capacities.  ``R = residual`` float slots and a quantized capacity
``S = max(round_up(max_len - R, G), G)``, so the cache holds ``S + R >= max_len``
tokens.  A cache shorter than the float window (``max_len < R + G``) still
allocates the kernel's minimum of one quantized group: all its tokens fit, and
a sequence shorter than ``G`` stays entirely in float.  The kernel's append
(:func:`kivi_append`) quantizes a group as soon as
the residual holds ``G`` tokens, so while the quantized part has room the
residual holds fewer than ``G`` tokens; once ``S`` is full the last (up to
``R``) tokens stay in float (the paper's "recent tokens in full precision",
reached at the end of a long generation).  Note this differs from the paper,
which flushes the residual only when it holds ``R`` tokens: here the float part
is at most ``G - 1`` tokens until the quantized part is full.

Steps.

* **prefill** attends over the full-precision prompt, then quantizes it: row
  ``b`` quantizes its first ``min(floor(n_b / G) * G, S)`` tokens (with
  :func:`kivi_quantize`), the rest (fewer than ``G`` tokens, or up to ``R`` when
  the prompt overflows ``S``) go to the residual window.  Keys and values are
  rounded to the storage dtype (``Dims.dtype``) first, exactly as decode tokens
  are (they pass through the float residual).
* **decode** appends the token (:func:`kivi_append`: residual, flushing a full
  group) and attends through :func:`quantized_decode_attention` (``backend``:
  "auto" = the Triton Pallas kernel on GPU, Mosaic on TPU, XLA on CPU; "auto"
  falls back to XLA when the kernel's tiling rules reject the shapes).  Every
  row appends its token: decode assumes ``n_new == 1`` per row, as the
  generation engine does.

``key_mode="token"`` is the ablation the paper compares against (its Fig. 2 /
Table 2 "per-token key" rows): keys quantized per token in groups of ``G``
channels, exactly like the values, with real packed storage of the same
residual structure (full groups of ``G`` tokens quantized, the rest float).
Its state is a dict with the KiviCache's field names; only the key leaves
change shape: ``k_codes [B, S, Hkv, D/P]`` packed along channels like
``v_codes``, ``k_scale``/``k_zero [B, S, Hkv, D/G]``.  Attention dequantizes
and runs masked dense attention (XLA; there is no kernel for this layout).

Bytes (``ss``, ``fs`` the itemsizes of ``scale_dtype`` and ``Dims.dtype``):

``channel: B*Hkv*(2*S*D*bits/8 + 2*(S/G)*D*ss + 2*S*(D/G)*ss + 2*R*D*fs) + 8*B``
``token:   B*Hkv*(2*S*D*bits/8 + 4*S*(D/G)*ss + 2*R*D*fs) + 8*B``

e.g. ``max_len=4096, D=64, G=32, R=128``, bf16 cache, 2 bits: 0.273 of dense
with float32 scales, 0.213 with bfloat16 scales (the paper's fp16 scales).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memlab import facts
from memlab.kv._quant_utils import minmax_quantize
from memlab.kv.base import POLICIES
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions
from memlab_kernels import quantized_kv_decode as qkv
# Bit packing (a little-endian bit stream along the last axis), shared with kvquant.
from memlab_kernels._packing import pack_bits, unpack_bits

__all__ = ["KIVI", "pack_bits", "unpack_bits", "kivi_capacity"]

_BITS = (2, 4, 8)
_KEY_MODES = ("channel", "token")
_SCALE_DTYPES = ("float32", "bfloat16")
_FLOAT_DTYPES = ("float32", "bfloat16", "float16")
_BACKENDS = ("auto", "xla", "interpret", "triton", "mosaic_tpu")


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def kivi_capacity(max_len: int, group_size: int, residual: int) -> int:
    """Quantized capacity ``S = round_up(max_len - residual, group_size)``."""
    return -(-(max_len - residual) // group_size) * group_size


def _fit(x, s):
    """Pad or cut ``x [B, T, ...]`` to ``S`` tokens."""
    t = x.shape[1]
    if t >= s:
        return x[:, :s]
    return jnp.pad(x, ((0, 0), (0, s - t)) + ((0, 0),) * (x.ndim - 2))


def _take_residual(x, qlen, rlen, r):
    """Tokens ``qlen .. qlen+rlen-1`` of ``x [B, T, Hkv, D]`` into slots ``0..rlen-1`` of ``[B, R, Hkv, D]``."""
    xp = jnp.pad(x, ((0, 0), (0, r), (0, 0), (0, 0)))
    idx = qlen[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]
    idx = jnp.minimum(idx, xp.shape[1] - 1)
    xr = jnp.take_along_axis(xp, idx[:, :, None, None], axis=1)
    keep = (jnp.arange(r)[None, :] < rlen[:, None])[:, :, None, None]
    return jnp.where(keep, xr, jnp.zeros((), x.dtype))


def _minmax_groups(x, bits, g, scale_dtype):
    """Per-token asymmetric min/max quantization of ``x [..., D]`` in groups of ``g`` channels.

    The KIVI kernel's formula (float32 reciprocal, round half to even), so
    per-token keys are quantized exactly like KIVI's values.
    Returns codes uint8 ``[..., D]`` and scale, zero ``[..., D/g]`` in ``scale_dtype``.
    """
    *lead, d = x.shape
    xg = x.astype(jnp.float32).reshape(*lead, d // g, g)
    code, scale, zero = minmax_quantize(xg, -1, bits, scale_dtype)
    return code.reshape(*lead, d), scale, zero


def _dequant_groups(codes, scale, zero, bits, g):
    """``codes`` packed uint8 ``[..., D/P]`` -> float32 ``[..., D]``."""
    c = unpack_bits(codes, bits).astype(jnp.float32)
    s = jnp.repeat(scale.astype(jnp.float32), g, axis=-1)
    z = jnp.repeat(zero.astype(jnp.float32), g, axis=-1)
    return c * s + z


def _token_quantize(x, bits, g, sdt):
    c, s, z = _minmax_groups(x, bits, g, sdt)
    return pack_bits(c, bits), s, z


# --------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------
def _plan(seq: int) -> list:
    """The KIVI variants the planner searches."""
    return ["kivi4", "kivi2"]


def _quality_loss(policy, seq: int) -> float:
    """Measured relative perplexity increase at ``policy.bits`` (memlab/measured.json)."""
    by_bits = facts.value("kv policy", "kivi", "quality_loss", __name__)
    if str(policy.bits) not in by_bits:
        raise facts.MissingFact("kv policy", "kivi", f"quality_loss[bits={policy.bits}]",
                                __name__, f"measured for bits {sorted(by_bits)}")
    return float(by_bits[str(policy.bits)])


def _decode_slots(policy, dims) -> int:
    """Key/value slots of one layer the decode reads: quantized capacity + float residual."""
    return int(policy.capacity(dims)) + int(policy.residual)


# planner facts (memlab.facts): a quantized store, so decode rewrites the layer's slice and
# its XLA path dequantizes ``decode_slots`` slots to float32
@POLICIES.register("kivi", plan=_plan, quality_loss=_quality_loss, decode_slots=_decode_slots)
@dataclasses.dataclass(frozen=True)
class KIVI(KVPolicy):
    """KIVI KV cache: per-channel keys, per-token values, float residual (see the module doc).

    Args:
      bits: 2, 4 or 8 bits per code.
      group_size: ``G``, tokens per key group and channels per value group;
        divides ``head_dim``, a multiple of ``8 // bits``.
      residual: ``R >= G`` float residual slots.
      key_mode: "channel" (KIVI) or "token" (the per-token-key ablation).
      scale_dtype: "float32" or "bfloat16" scales and zeros.
      backend: decode attention backend for "channel" keys (see
        :func:`memlab_kernels.quantized_kv_decode.quantized_decode_attention`).
    """

    name = "kivi"
    bits: int = 2
    group_size: int = 32
    residual: int = 128
    key_mode: str = "channel"
    scale_dtype: str = "float32"
    backend: str = "auto"

    def __post_init__(self):
        self._check_fields()

    # ---------------------------------------------------------------- checks
    def _check_fields(self):
        if isinstance(self.bits, bool) or self.bits not in _BITS:
            raise ValueError(f"KIVI: bits={self.bits!r} is not supported; use one of {_BITS} "
                             "(e.g. KIVI(bits=2) or the policy string 'kivi2').")
        for f in ("group_size", "residual"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"KIVI: {f}={v!r} must be a positive int (e.g. {f}=32).")
        p = 8 // self.bits
        if self.group_size % p:
            raise ValueError(
                f"KIVI: group_size={self.group_size} must be a multiple of {p} for bits={self.bits} "
                f"({p} codes share a byte); use group_size={-(-self.group_size // p) * p}.")
        if self.residual < self.group_size:
            raise ValueError(
                f"KIVI: residual={self.residual} is smaller than group_size={self.group_size}: "
                f"the float residual must hold a whole key group before it is quantized; "
                f"use residual >= {self.group_size}.")
        if self.key_mode not in _KEY_MODES:
            raise ValueError(f"KIVI: key_mode={self.key_mode!r}; use 'channel' (KIVI) or 'token' "
                             "(the per-token-key ablation).")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"KIVI: scale_dtype={self.scale_dtype!r}; use one of {_SCALE_DTYPES}.")
        if self.backend not in _BACKENDS:
            raise ValueError(f"KIVI: backend={self.backend!r}; use one of {_BACKENDS}.")

    def validate(self, dims: Dims) -> None:
        self._check_fields()
        g, d = self.group_size, dims.head_dim
        if d % g:
            divisors = [x for x in range(1, d + 1) if d % x == 0 and x % (8 // self.bits) == 0]
            raise ValueError(
                f"KIVI: group_size={g} does not divide head_dim={d}: values are quantized in groups "
                f"of {g} channels; use a group size in {divisors}.")
        if dims.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"KIVI: cache dtype {dims.dtype!r} is not supported; use one of "
                            f"{_FLOAT_DTYPES}.")

    # ---------------------------------------------------------------- sizes
    def capacity(self, dims: Dims) -> int:
        """Quantized capacity ``S`` (the cache holds ``S + residual`` tokens): at least one
        group of ``G``, the kernel's minimum, however short the cache."""
        return max(kivi_capacity(dims.max_len, self.group_size, self.residual), self.group_size)

    def nbytes(self, dims: Dims) -> int:
        s, g, r = self.capacity(dims), self.group_size, self.residual
        b, h, d = dims.batch, dims.n_kv_heads, dims.head_dim
        if self.key_mode == "channel":
            return qkv.kivi_cache_bytes(b, s, h, d, bits=self.bits, group_size=g, residual=r,
                                        dtype=jnp.dtype(dims.dtype),
                                        scale_dtype=jnp.dtype(self.scale_dtype))
        ss, fs = jnp.dtype(self.scale_dtype).itemsize, jnp.dtype(dims.dtype).itemsize
        per_head = 2 * s * d * self.bits // 8 + 4 * s * (d // g) * ss + 2 * r * d * fs
        return b * h * per_head + 2 * 4 * b

    # ---------------------------------------------------------------- state
    def init(self, dims: Dims):
        s, g, r = self.capacity(dims), self.group_size, self.residual
        b, h, d = dims.batch, dims.n_kv_heads, dims.head_dim
        sdt, fdt = jnp.dtype(self.scale_dtype), jnp.dtype(dims.dtype)
        cache = qkv.kivi_empty(b, s, h, d, bits=self.bits, group_size=g, residual=r, dtype=fdt,
                               scale_dtype=sdt)
        if self.key_mode == "channel":
            return cache
        st = {f: getattr(cache, f) for f in qkv._DATA_FIELDS}
        p = 8 // self.bits
        st["k_codes"] = jnp.zeros((b, s, h, d // p), jnp.uint8)
        st["k_scale"] = jnp.zeros((b, s, h, d // g), sdt)
        st["k_zero"] = jnp.zeros((b, s, h, d // g), sdt)
        return st

    # ---------------------------------------------------------------- steps
    def prefill(self, state, q, k, v, ctx):
        out = attend(q, k, v, ctx.positions, prompt_positions(ctx))
        fdt = self._res_dtype(state)
        kc, vc = k.astype(fdt), v.astype(fdt)
        s, g, r = self._capacity_of(state), self.group_size, self.residual
        n = jnp.clip(ctx.n_new.astype(jnp.int32), 0, k.shape[1])
        qlen = jnp.minimum((n // g) * g, s)
        rlen = jnp.clip(n - qlen, 0, r)
        k_res, v_res = _take_residual(kc, qlen, rlen, r), _take_residual(vc, qlen, rlen, r)
        sdt = jnp.dtype(self.scale_dtype)
        if self.key_mode == "channel":
            cache = qkv.kivi_quantize(_fit(kc, s), _fit(vc, s), qlen, bits=self.bits, group_size=g,
                                      residual=r, scale_dtype=sdt, capacity=s)
            return out, dataclasses.replace(cache, k_res=k_res, v_res=v_res, residual_lengths=rlen)
        inq = (jnp.arange(s)[None, :] < qlen[:, None])[:, :, None, None]
        kq = jnp.where(inq, _fit(kc, s), jnp.zeros((), fdt))
        vq = jnp.where(inq, _fit(vc, s), jnp.zeros((), fdt))
        st = dict(state)
        st["k_codes"], st["k_scale"], st["k_zero"] = _token_quantize(kq, self.bits, g, sdt)
        st["v_codes"], st["v_scale"], st["v_zero"] = _token_quantize(vq, self.bits, g, sdt)
        st.update(k_res=k_res, v_res=v_res, quantized_lengths=qlen, residual_lengths=rlen)
        return out, st

    def decode(self, state, q, k, v, ctx):
        fdt = self._res_dtype(state)
        k0, v0 = k[:, 0].astype(fdt), v[:, 0].astype(fdt)
        if self.key_mode == "token":
            st = _token_append(state, k0, v0, self.bits, self.group_size)
            kd, vd, kv_pos = self._dense_token(st)
            out = attend(q, kd.astype(q.dtype), vd.astype(q.dtype), ctx.positions, kv_pos)
            return out, st
        cache = qkv.kivi_append(state, k0, v0)
        view = cache
        if cache.k_res.dtype != q.dtype:    # the kernel wants q in the residual's dtype
            view = dataclasses.replace(cache, k_res=cache.k_res.astype(q.dtype),
                                       v_res=cache.v_res.astype(q.dtype))
        return self._attend_kernel(q[:, 0], view)[:, None], cache

    # ---------------------------------------------------------------- views
    def dequantize(self, state):
        """Dense float32 ``(k, v, lengths)`` of one layer's state: ``[B, S + R, Hkv, D]``
        with row ``b``'s tokens contiguous at ``0 .. lengths[b]-1`` (zeros after)."""
        if self.key_mode == "channel":
            return qkv.kivi_dequantize(state, jnp.float32)
        kd, vd, kv_pos = self._dense_token(state)
        qlen, rlen = state["quantized_lengths"], state["residual_lengths"]
        s = state["v_codes"].shape[1]
        r = state["k_res"].shape[1]
        # gather tokens 0..qlen-1 then residual 0..rlen-1 into contiguous slots
        j = jnp.arange(s + r, dtype=jnp.int32)[None, :]
        src = jnp.where(j < qlen[:, None], j, s + j - qlen[:, None])
        valid = j < (qlen + rlen)[:, None]
        src = jnp.where(valid, src, 0)
        take = lambda x: jnp.where(valid[:, :, None, None],  # noqa: E731
                                   jnp.take_along_axis(x, src[:, :, None, None], axis=1), 0.0)
        return take(kd), take(vd), qlen + rlen

    # ---------------------------------------------------------------- internals
    def _res_dtype(self, state):
        return (state.k_res if self.key_mode == "channel" else state["k_res"]).dtype

    def _capacity_of(self, state):
        return int((state.v_codes if self.key_mode == "channel" else state["v_codes"]).shape[1])

    def _attend_kernel(self, q, cache):
        if self.backend != "auto":
            return qkv.quantized_decode_attention(q, cache, backend=self.backend)
        try:
            return qkv.quantized_decode_attention(q, cache, backend="auto")
        except ValueError:
            # the kernel's tiling rules (power-of-two D / G on Triton, ...) reject
            # these shapes: the XLA path computes the same attention.
            return qkv.quantized_decode_attention(q, cache, backend="xla")

    def _dense_token(self, st):
        """Token-mode keys/values as float32 ``[B, S + R, Hkv, D]`` and their positions."""
        bits, g = self.bits, self.group_size
        kq = _dequant_groups(st["k_codes"], st["k_scale"], st["k_zero"], bits, g)
        vq = _dequant_groups(st["v_codes"], st["v_scale"], st["v_zero"], bits, g)
        kd = jnp.concatenate([kq, st["k_res"].astype(jnp.float32)], axis=1)
        vd = jnp.concatenate([vq, st["v_res"].astype(jnp.float32)], axis=1)
        s, r = kq.shape[1], st["k_res"].shape[1]
        qlen, rlen = st["quantized_lengths"][:, None], st["residual_lengths"][:, None]
        i = jnp.arange(s, dtype=jnp.int32)[None, :]
        j = jnp.arange(r, dtype=jnp.int32)[None, :]
        pos = jnp.concatenate([jnp.where(i < qlen, i, MAX_POS),
                               jnp.where(j < rlen, qlen + j, MAX_POS)], axis=1)
        return kd, vd, pos


def _token_append(st, k_new, v_new, bits, g):
    """Append one token per row to a token-mode state (the kernel's kivi_append, per-token keys).

    The token goes to residual slot ``rl``; when the residual holds ``G``
    tokens and the quantized part has room, those ``G`` tokens are quantized
    into slots ``ql .. ql+G-1`` and shifted out.  A row with both parts full
    drops the token.
    """
    k_res, v_res = st["k_res"], st["v_res"]
    b, r = k_res.shape[:2]
    s = st["v_codes"].shape[1]
    qlen, rlen = st["quantized_lengths"], st["residual_lengths"]
    rows = jnp.arange(b)
    slot = jnp.where(rlen < r, rlen, r)                      # r: out of range, dropped
    k_res = k_res.at[rows, slot].set(k_new.astype(k_res.dtype), mode="drop")
    v_res = v_res.at[rows, slot].set(v_new.astype(v_res.dtype), mode="drop")
    rlen = jnp.minimum(rlen + 1, r)
    flush = (rlen >= g) & (qlen + g <= s)
    sdt = st["k_scale"].dtype
    new = {}
    new["k_codes"], new["k_scale"], new["k_zero"] = _token_quantize(k_res[:, :g], bits, g, sdt)
    new["v_codes"], new["v_scale"], new["v_zero"] = _token_quantize(v_res[:, :g], bits, g, sdt)
    start = jnp.minimum(qlen, s - g)

    def upd(arr, blk, st0, ok):
        old = lax.dynamic_slice_in_dim(arr, st0, blk.shape[0], 0)
        return lax.dynamic_update_slice_in_dim(arr, jnp.where(ok, blk, old), st0, 0)

    out = dict(st)
    for f, blk in new.items():
        out[f] = jax.vmap(upd)(st[f], blk, start, flush)

    def shift(res):
        shifted = jnp.concatenate([res[:, g:], jnp.zeros_like(res[:, :g])], axis=1)
        return jnp.where(flush[:, None, None, None], shifted, res)

    f = flush.astype(jnp.int32) * g
    out.update(k_res=shift(k_res), v_res=shift(v_res), quantized_lengths=qlen + f,
               residual_lengths=rlen - f)
    return out
