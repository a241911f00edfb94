"""Weight formats as QArray pytrees with real packing.

* ``int8()``: per-output-channel symmetric int8 (the LLM.int8() vector-wise
  baseline; seed: "LLM.int8(): 8-bit Matrix Multiplication for Transformers").
* ``intn(bits, group, symmetric)``: group-wise int2/int3/int4/int8 along the input
  dimension, symmetric (absmax) or asymmetric (min/max with a zero point), as
  used by GPTQ and AWQ.  Codes are packed: 2 int4 or 4 int2 per byte, 8 int3 in
  3 bytes.
* ``nf4(block, double_quant)``: QLoRA's NormalFloat4 with block-wise absmax and
  double quantization of the absmax constants (8-bit, second-level block 256):
  4 + 8/64 + 32/(64*256) = 4.127 bits per parameter (seed: "QLoRA").
* ``fp8("e4m3"|"e5m2")``: float8 codes with a per-output-channel scale
  (seed: "ZeroQuant-FP").
* ``fp4(group)``: E2M1 codes, packed two per byte, with a group-wise scale
  (seed: "LLM-FP4").

Every format quantizes a ``[..., K, N]`` kernel along K; leading axes are mapped
one slice at a time (``jax.lax.map``), so quantizing stacked layers never holds
more than one layer's float temporaries.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from memlab.facts import measured
from memlab.quant.qarray import QArray
from memlab.registry import Registry
from memlab_kernels._packing import check_bits, pack_bits, unpack_bits

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# E2M1 magnitudes; codes 0-7 positive, 8-15 negative (sign bit), as in the OCP MX spec.
FP4_E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                   -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


# ---------------------------------------------------------------------------
# packing along axis 0 of a [K, N] code array: memlab's one layout
# (memlab_kernels._packing), which the dequant-matmul kernels read
# ---------------------------------------------------------------------------
PACK_BITS = (2, 3, 4, 8)


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Pack unsigned ``bits``-bit codes [K, N] into uint8 along K.

    A little-endian bit stream along K (:func:`memlab_kernels._packing.pack_bits`):
    2 int4 or 4 int2 per byte (the first code in the low bits), 8 int3 in 3 bytes.
    """
    check_bits(bits, PACK_BITS, "pack: bits")
    return pack_bits(codes, bits, axis=0)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`pack`: uint8 codes [K, N]."""
    check_bits(bits, PACK_BITS, "unpack: bits")
    return unpack_bits(packed, bits, axis=0)


def _nearest_level(x: jax.Array, levels) -> jax.Array:
    """Index of the nearest entry of a level table (ties to the lower level)."""
    lv = np.asarray(levels, np.float64)
    order = np.argsort(lv, kind="stable")
    sorted_lv = lv[order]
    mids = (sorted_lv[1:] + sorted_lv[:-1]) / 2
    idx = jnp.searchsorted(jnp.asarray(mids, jnp.float32), x, side="left")
    return jnp.asarray(order, jnp.uint8)[idx]


def _map_leading(fn, w: jax.Array):
    """Apply a [K, N] -> pytree function over leading axes, one slice at a time."""
    if w.ndim == 2:
        return fn(w)
    lead = w.shape[:-2]
    flat = w.reshape((-1,) + w.shape[-2:])
    out = jax.lax.map(fn, flat)
    return jax.tree_util.tree_map(lambda a: a.reshape(lead + a.shape[1:]), out)


def _check_kernel(w, fmt, group: int | None = None, multiple: int = 1):
    if w.ndim < 2:
        raise ValueError(f"{fmt}: needs a [..., K, N] kernel, got shape {w.shape}; exclude 1-D "
                         "params (norm scales, biases) with a rule")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{fmt}: weights must be floating point, got {w.dtype}")
    if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer):
        if not bool(jnp.all(jnp.isfinite(w))):
            raise ValueError(f"{fmt}: the weights contain NaN or Inf ({int(jnp.sum(~jnp.isfinite(w)))}"
                             " values); fix or mask them before quantizing: scales would be NaN")
    k = w.shape[-2]
    if group is not None and k % group:
        raise ValueError(f"{fmt}: group size {group} does not divide the input dimension "
                         f"K={k} of shape {w.shape}; choose a group that divides {k}")
    if k % multiple:
        raise ValueError(f"{fmt}: input dimension K={k} must be a multiple of {multiple} "
                         "for packing")


def _codebook_quantize(x: jax.Array, levels, block: int, divisor: float = 1.0):
    """Nearest-level 4-bit codes of x [K, N] in blocks along K, scale = absmax / divisor.

    Returns (packed codes [K/2, N], absmax [K/block, N])."""
    k, n = x.shape
    xb = x.astype(jnp.float32).reshape(k // block, block, n)
    absmax = jnp.max(jnp.abs(xb), axis=1)
    scale = jnp.where(absmax == 0, 1.0, absmax / divisor)
    codes = _nearest_level(xb / scale[:, None], levels).reshape(k, n)
    return pack(codes, 4), absmax


def _codebook_dequantize(packed: jax.Array, levels, scale: jax.Array, block: int):
    """levels[code] * scale for packed 4-bit codes [..., K/2, N] and scale [..., K/block, N]."""
    codes = _map_leading(lambda d: unpack(d, 4), packed)
    vals = jnp.asarray(levels, jnp.float32)[codes]
    *lead, k, n = vals.shape
    vb = vals.reshape(*lead, k // block, block, n)
    return (vb * scale[..., None, :]).reshape(*lead, k, n)


class Format:
    """Base: ``quantize(w) -> QArray``, ``dequantize(q) -> array``."""

    name = "format"

    def logical_shape(self, q: QArray) -> tuple:
        data = q["data"]
        return tuple(data.shape[:-2]) + (self.in_features(q), data.shape[-1])

    def in_features(self, q: QArray) -> int:
        return q["data"].shape[-2]

    def __call__(self, w):
        return self.quantize(w)

    def matmul(self, x: jax.Array, q: QArray, dtype) -> jax.Array:
        """x @ W for a 2-D QArray; weight-only formats dequantize (XLA fuses it)."""
        w = self.dequantize(q).astype(dtype)
        return jnp.dot(x.astype(dtype), w, preferred_element_type=jnp.float32).astype(dtype)


@dataclasses.dataclass(frozen=True)
class Int8(Format):
    """Per-output-channel symmetric int8: w = q * scale[n]."""

    name = "int8"

    def quantize(self, w):
        _check_kernel(w, "int8")

        def one(x):
            x = x.astype(jnp.float32)
            scale = jnp.max(jnp.abs(x), axis=0) / 127.0
            scale = jnp.where(scale == 0, 1.0, scale)
            q = jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8)
            return {"data": q, "scale": scale}
        return QArray(_map_leading(one, w), self, w.dtype)

    def dequantize(self, q):
        return q["data"].astype(jnp.float32) * q["scale"][..., None, :]

    def kernel_matmul(self, x2, q, backend):
        from memlab.quant.matmul import pallas_kernels
        k = pallas_kernels()
        return None if k is None else k.int8_matmul(x2, q["data"], q["scale"], backend=backend)


@dataclasses.dataclass(frozen=True)
class IntN(Format):
    """Group-wise integer codes along K, symmetric or asymmetric, packed."""

    bits: int = 4
    group: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 8):
            raise ValueError(f"intn: bits={self.bits} is not supported; use 2, 3, 4 or 8")
        if not isinstance(self.group, int) or self.group <= 0:
            raise ValueError(f"intn: group must be a positive int, got {self.group!r}")
        per = {2: 4, 3: 8, 4: 2, 8: 1}[self.bits]
        if self.group % per:
            raise ValueError(f"intn: group={self.group} must be a multiple of {per} to pack "
                             f"{self.bits}-bit codes")

    @property
    def name(self):
        return f"int{self.bits}-g{self.group}-{'sym' if self.symmetric else 'asym'}"

    def in_features(self, q):
        return q["scale"].shape[-2] * self.group

    def quantize(self, w):
        _check_kernel(w, self.name, group=self.group)
        g = self.group

        def one(x):
            # symmetric: codes centred at 2^(b-1), w = (c - 2^(b-1)) * s;
            # asymmetric: the range includes 0 so the zero point is a valid code.
            scale, zero = self.group_params(x)
            rows = lambda a: jnp.repeat(a, g, axis=0)  # noqa: E731
            codes = self.quantize_with(x.astype(jnp.float32), rows(scale), rows(zero))
            return self.from_codes(codes, scale, zero).arrays
        return QArray(_map_leading(one, w), self, w.dtype)

    def codes(self, q):
        return _map_leading(lambda d: unpack(d, self.bits), q["data"])

    def kernel_matmul(self, x2, q, backend):
        from memlab.quant.matmul import pallas_kernels
        k = pallas_kernels()
        if k is None or self.bits != 4:
            return None
        zero = (jnp.full(q["scale"].shape, 8.0, jnp.float32) if self.symmetric
                else q["zero"].astype(jnp.float32))
        return k.int4_matmul(x2, q["data"], q["scale"], zero, group_size=self.group,
                             backend=backend)

    def group_params(self, x: jax.Array):
        """Scale (and zero point) per group of a [K, N] float weight: ([K/g, N], [K/g, N])."""
        k, n = x.shape
        xg = x.astype(jnp.float32).reshape(k // self.group, self.group, n)
        qmax = (1 << self.bits) - 1
        if self.symmetric:
            half = 1 << (self.bits - 1)
            scale = jnp.max(jnp.abs(xg), axis=1) / (half - 1 if self.bits > 2 else half)
            return jnp.where(scale == 0, 1.0, scale), jnp.full(scale.shape, half, jnp.float32)
        lo = jnp.minimum(jnp.min(xg, axis=1), 0.0)
        hi = jnp.maximum(jnp.max(xg, axis=1), 0.0)
        scale = jnp.where(hi - lo == 0, 1.0, (hi - lo) / qmax)
        return scale, jnp.clip(jnp.round(-lo / scale), 0, qmax)

    def quantize_with(self, x: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
        """Codes of x [R, N] given per-row-group scale/zero [R, N] (broadcast rows)."""
        qmax = (1 << self.bits) - 1
        return jnp.clip(jnp.round(x / scale) + zero, 0, qmax)

    def from_codes(self, codes: jax.Array, scale: jax.Array, zero: jax.Array,
                   dtype=jnp.float32) -> QArray:
        """A QArray from [K, N] codes and [K/g, N] scale and zero point."""
        arrays = {"data": pack(codes.astype(jnp.uint8), self.bits),
                  "scale": scale.astype(jnp.float32)}
        if not self.symmetric:
            arrays["zero"] = zero.astype(jnp.uint8)
        return QArray(arrays, self, dtype)

    def dequantize(self, q):
        codes = self.codes(q).astype(jnp.float32)
        *lead, k, n = codes.shape
        g = self.group
        c = codes.reshape(*lead, k // g, g, n)
        zero = (1 << (self.bits - 1)) if self.symmetric else \
            q["zero"].astype(jnp.float32)[..., None, :]
        return ((c - zero) * q["scale"][..., None, :]).reshape(*lead, k, n)


@dataclasses.dataclass(frozen=True)
class NF4(Format):
    """NormalFloat4 with block-wise absmax; optional double quantization of the
    absmax constants to int8 in blocks of ``dq_block`` (mean subtracted)."""

    block: int = 64
    double_quant: bool = True
    dq_block: int = 256

    def __post_init__(self):
        if self.block <= 0 or self.block % 2:
            raise ValueError(f"nf4: block={self.block} must be a positive even int")

    @property
    def name(self):
        return f"nf4-b{self.block}{'-dq' if self.double_quant else ''}"

    def in_features(self, q):
        return q["data"].shape[-2] * 2

    def quantize(self, w):
        _check_kernel(w, self.name, group=self.block)

        def one(x):
            packed, absmax = _codebook_quantize(x, NF4_LEVELS, self.block)
            out = {"data": packed}
            if self.double_quant:
                out.update(self._quantize_absmax(absmax))
            else:
                out["absmax"] = absmax
            return out
        return QArray(_map_leading(one, w), self, w.dtype)

    def _quantize_absmax(self, absmax):
        flat = absmax.reshape(-1)
        m = flat.shape[0]
        nblocks = -(-m // self.dq_block)
        mean = jnp.mean(flat)
        centred = jnp.pad(flat - mean, (0, nblocks * self.dq_block - m)).reshape(nblocks, -1)
        s2 = jnp.max(jnp.abs(centred), axis=1) / 127.0
        s2 = jnp.where(s2 == 0, 1.0, s2)
        q2 = jnp.clip(jnp.round(centred / s2[:, None]), -127, 127).astype(jnp.int8)
        return {"absmax_q": q2.reshape(-1)[:m].reshape(absmax.shape), "absmax_scale": s2,
                "absmax_mean": mean}

    def absmax(self, q):
        if not self.double_quant:
            return q["absmax"]
        aq = q["absmax_q"]

        def one(aq, s2, mean):
            flat = aq.reshape(-1).astype(jnp.float32)
            m = flat.shape[0]
            scale = jnp.repeat(s2, self.dq_block)[:m]
            return (flat * scale + mean).reshape(aq.shape)
        if aq.ndim == 2:
            return one(aq, q["absmax_scale"], q["absmax_mean"])
        lead = aq.shape[:-2]
        out = jax.vmap(one)(aq.reshape((-1,) + aq.shape[-2:]),
                            q["absmax_scale"].reshape((-1,) + q["absmax_scale"].shape[-1:]),
                            q["absmax_mean"].reshape(-1))
        return out.reshape(lead + aq.shape[-2:])

    def kernel_matmul(self, x2, q, backend):
        from memlab.quant.matmul import pallas_kernels
        k = pallas_kernels()
        if k is None:
            return None
        return k.nf4_matmul(x2, q["data"], self.absmax(q).astype(jnp.float32),
                            block_size=self.block, backend=backend)

    def dequantize(self, q):
        return _codebook_dequantize(q["data"], NF4_LEVELS, self.absmax(q), self.block)


_FP8 = {"e4m3": (jnp.float8_e4m3fn, 448.0), "e5m2": (jnp.float8_e5m2, 57344.0)}


@dataclasses.dataclass(frozen=True)
class FP8(Format):
    """float8 codes with a per-output-channel float32 scale."""

    variant: str = "e4m3"

    def __post_init__(self):
        if self.variant not in _FP8:
            raise ValueError(f"fp8: variant {self.variant!r} is not one of {sorted(_FP8)}")

    @property
    def name(self):
        return f"fp8-{self.variant}"

    def quantize(self, w):
        _check_kernel(w, self.name)
        dt, fmax = _FP8[self.variant]

        def one(x):
            x = x.astype(jnp.float32)
            scale = jnp.max(jnp.abs(x), axis=0) / fmax
            scale = jnp.where(scale == 0, 1.0, scale)
            return {"data": (x / scale).astype(dt), "scale": scale}
        return QArray(_map_leading(one, w), self, w.dtype)

    def dequantize(self, q):
        return q["data"].astype(jnp.float32) * q["scale"][..., None, :]


@dataclasses.dataclass(frozen=True)
class FP4(Format):
    """E2M1 codes (two per byte) with a group-wise float32 absmax/6 scale."""

    group: int = 32

    def __post_init__(self):
        if self.group <= 0 or self.group % 2:
            raise ValueError(f"fp4: group={self.group} must be a positive even int")

    @property
    def name(self):
        return f"fp4-e2m1-g{self.group}"

    def in_features(self, q):
        return q["data"].shape[-2] * 2

    def quantize(self, w):
        _check_kernel(w, self.name, group=self.group)

        def one(x):  # largest E2M1 magnitude is 6: scale = absmax / 6
            packed, absmax = _codebook_quantize(x, FP4_E2M1_LEVELS, self.group, divisor=6.0)
            return {"data": packed, "scale": jnp.where(absmax == 0, 1.0, absmax / 6.0)}
        return QArray(_map_leading(one, w), self, w.dtype)

    def dequantize(self, q):
        return _codebook_dequantize(q["data"], FP4_E2M1_LEVELS, q["scale"], self.group)


@dataclasses.dataclass(frozen=True)
class Scaled(Format):
    """An inner format applied to ``diag(s) @ W``; ``W ≈ inner(diag(s) W) / s``.

    Activation-aware scaling (AWQ, SmoothQuant): the per-input-channel ``in_scale``
    is stored with the weight and the matmul computes ``(x / s) @ Q(diag(s) W)``.
    """

    inner: Any = None

    @property
    def name(self):
        return f"scaled({self.inner.name})"

    def logical_shape(self, q):
        return self.inner.logical_shape(q)

    def in_features(self, q):
        return self.inner.in_features(q)

    def wrap(self, inner_q: QArray, in_scale: jax.Array) -> QArray:
        arrays = dict(inner_q.arrays)
        arrays["in_scale"] = in_scale.astype(jnp.float32)
        return QArray(arrays, self, inner_q.dtype)

    def inner_qarray(self, q: QArray) -> QArray:
        arrays = {k: v for k, v in q.arrays.items() if k != "in_scale"}
        return QArray(arrays, self.inner, q.dtype)

    def dequantize(self, q):
        return self.inner.dequantize(self.inner_qarray(q)) / q["in_scale"][..., :, None]

    def kernel_matmul(self, x2, q, backend):
        fused = getattr(self.inner, "kernel_matmul", None)
        if fused is None:
            return None
        return fused(x2 / q["in_scale"].astype(x2.dtype), self.inner_qarray(q), backend)


@dataclasses.dataclass(frozen=True)
class WithOutliers(Format):
    """An inner format plus a fixed number of exact float16 outlier weights stored
    sparsely (flat index int32 + value), as in SpQR's dense-and-sparse layout."""

    inner: Any = None

    @property
    def name(self):
        return f"{self.inner.name}+outliers"

    def logical_shape(self, q):
        return self.inner.logical_shape(q)

    def in_features(self, q):
        return self.inner.in_features(q)

    def wrap(self, inner_q: QArray, idx: jax.Array, val: jax.Array) -> QArray:
        arrays = dict(inner_q.arrays)
        arrays["outlier_idx"] = idx.astype(jnp.int32)
        arrays["outlier_val"] = val.astype(jnp.float16)
        return QArray(arrays, self, inner_q.dtype)

    def dequantize(self, q):
        inner = QArray({k: v for k, v in q.arrays.items() if not k.startswith("outlier_")},
                       self.inner, q.dtype)
        dense = self.inner.dequantize(inner)

        def put(d, idx, val):
            shape = d.shape
            return d.reshape(-1).at[idx].set(val.astype(d.dtype)).reshape(shape)
        idx, val = q["outlier_idx"], q["outlier_val"]
        if dense.ndim == 2:
            return put(dense, idx, val)
        out = jax.vmap(put)(dense.reshape((-1,) + dense.shape[-2:]), idx.reshape(-1, idx.shape[-1]),
                            val.reshape(-1, val.shape[-1]))
        return out.reshape(dense.shape)


def quantize_per_token(x: jax.Array):
    """Dynamic symmetric int8 per row: (int8 codes, float32 scale [rows, 1])."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def _int8_matmul(x2, data, w_scale):
    """Per-token int8 activations x per-channel int8 weights, int32 accumulation."""
    xq, xs = quantize_per_token(x2)
    acc = jnp.dot(xq, data, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * xs * w_scale


@dataclasses.dataclass(frozen=True)
class W8A8(Format):
    """int8 weights (per output channel) and int8 activations quantized per token at
    run time (SmoothQuant's W8A8).  With ``in_scale`` (from SmoothQuant) the input is
    divided by the smoothing factors first: ``(x / s) @ Q(diag(s) W)``."""

    name = "w8a8"

    def quantize(self, w, in_scale=None):
        base = Int8().quantize(w if in_scale is None else w * in_scale[..., :, None])
        arrays = dict(base.arrays)
        if in_scale is not None:
            arrays["in_scale"] = in_scale.astype(jnp.float32)
        return QArray(arrays, self, w.dtype)

    def dequantize(self, q):
        w = q["data"].astype(jnp.float32) * q["scale"][..., None, :]
        return w / q["in_scale"][..., :, None] if "in_scale" in q.arrays else w

    def matmul(self, x, q, dtype):
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        if "in_scale" in q.arrays:
            x2 = x2 / q["in_scale"]
        y = _int8_matmul(x2, q["data"], q["scale"])
        return y.reshape(x.shape[:-1] + (y.shape[-1],)).astype(dtype)


@dataclasses.dataclass(frozen=True)
class LLMInt8(Format):
    """LLM.int8(): vector-wise int8 matmul with mixed-precision decomposition.

    Input feature columns holding any |x| > ``threshold`` (outlier features) are
    multiplied in 16-bit with the dequantized weight rows; every other column goes
    through per-token x per-channel int8.  Decided per batch at run time."""

    threshold: float = 6.0

    @property
    def name(self):
        return f"llm.int8-t{self.threshold:g}"

    def quantize(self, w):
        return QArray(Int8().quantize(w).arrays, self, w.dtype)

    def dequantize(self, q):
        return q["data"].astype(jnp.float32) * q["scale"][..., None, :]

    def matmul(self, x, q, dtype):
        x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        outlier = jnp.any(jnp.abs(x2) > self.threshold, axis=0)  # [K]
        regular = jnp.where(outlier[None, :], 0.0, x2)
        y = _int8_matmul(regular, q["data"], q["scale"])
        x_out = jnp.where(outlier[None, :], x2, 0.0).astype(jnp.float16)
        w16 = self.dequantize(q).astype(jnp.float16)
        y = y + jnp.dot(x_out, w16, preferred_element_type=jnp.float32)
        return y.reshape(x.shape[:-1] + (y.shape[-1],)).astype(dtype)


# -- constructors (the names users type) -------------------------------------
def int8() -> Int8:
    return Int8()


def intn(bits: int = 4, group: int = 128, symmetric: bool = False) -> IntN:
    return IntN(bits, group, symmetric)


def int4(group: int = 128, symmetric: bool = False) -> IntN:
    return IntN(4, group, symmetric)


def nf4(block: int = 64, double_quant: bool = True) -> NF4:
    return NF4(block, double_quant)


def fp8(variant: str = "e4m3") -> FP8:
    return FP8(variant)


def fp4(group: int = 32) -> FP4:
    return FP4(group)


def w8a8() -> W8A8:
    return W8A8()


def llm_int8(threshold: float = 6.0) -> LLMInt8:
    return LLMInt8(threshold)


def fp4_levels_match_ml_dtypes() -> bool:
    """Sanity: our E2M1 table equals ml_dtypes' float4_e2m1fn values."""
    ref = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn) if hasattr(
        ml_dtypes, "float4_e2m1fn") else None
    if ref is None:
        return True
    return np.array_equal(ref.astype(np.float32), np.asarray(FP4_E2M1_LEVELS, np.float32))


# ---------------------------------------------------------------------------
# The weight formats the planner searches (memlab.planner), with their facts
# (memlab.facts): ``plan`` (the tasks it is searched for), ``quality_loss`` and
# ``compute_penalty`` (step-time factor of the dequantizing matmuls), measured ones
# read from memlab/measured.json.  The factory builds the format (None: the model's
# own float weights); bytes come from the quantize pass's exact estimate.
# ---------------------------------------------------------------------------
WEIGHT_FORMATS = Registry("weight format")


def _float_weights():
    return None


def _nf4_double_quant():
    return nf4(64, double_quant=True)


WEIGHT_FORMATS.register("bf16", plan=("train", "finetune", "prefill", "decode"),
                        quality_loss=0.0, compute_penalty=1.0)(_float_weights)
WEIGHT_FORMATS.register("int8", plan=("finetune", "prefill", "decode"),
                        quality_loss=measured(), compute_penalty=measured())(int8)
WEIGHT_FORMATS.register("nf4", plan=("finetune", "prefill", "decode"),
                        quality_loss=measured(), compute_penalty=measured())(_nf4_double_quant)
# formats a user names (``ml.models.load(path, quantize="int4")``) that the planner does not
# search: no ``plan`` tasks, so no quality or cost facts are needed
WEIGHT_FORMATS.register("int4", plan=())(int4)
WEIGHT_FORMATS.register("fp8", plan=())(fp8)
WEIGHT_FORMATS.register("fp4", plan=())(fp4)
