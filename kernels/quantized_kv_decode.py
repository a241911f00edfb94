"""Decode attention over a KIVI-quantized KV cache, dequantized inside the kernel.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache") observes that LLM keys have a few *channels* of large magnitude
while values have no channel structure, and so quantizes **keys per channel**
(statistics over a group of tokens) and **values per token** (statistics over a
group of channels), both with asymmetric min/max quantization, and keeps the
most recent tokens, which do not yet fill a key group, in a float **residual
window**.  This module stores such a cache and runs single-token decode
attention over it without ever writing the float cache to HBM.

Layout (``[batch, seq, kv_heads, ...]`` as in ``attention_reference``), for
``bits`` in {8, 4, 2}, ``P = 8 // bits`` codes per byte, group size ``G`` (tokens
per key group = channels per value group), quantized capacity ``S`` (a multiple
of ``G``) and residual capacity ``R >= G``; all held by :class:`KiviCache`:

* ``k_codes`` uint8 ``[B, S // P, Hkv, D]``: keys packed along the *token*
  axis.  Byte ``[b, i, h, d]`` holds the codes of tokens ``i*P + j`` for
  ``j = 0..P-1`` in bits ``[j*bits, (j+1)*bits)`` (token ``i*P`` in the least
  significant bits).  ``k_scale``, ``k_zero`` ``[B, S // G, Hkv, D]``: one
  scale and one zero (the group minimum) per channel per group of ``G`` tokens.
* ``v_codes`` uint8 ``[B, S, Hkv, D // P]``: values packed along the *channel*
  axis.  Byte ``[b, s, h, i]`` holds channels ``i*P + j`` in bits
  ``[j*bits, (j+1)*bits)``.  ``v_scale``, ``v_zero`` ``[B, S, Hkv, D // G]``:
  one scale and zero per token per group of ``G`` channels.
* ``k_res``, ``v_res`` float ``[B, R, Hkv, D]``: the residual window (the
  cache's float dtype, also the query dtype).
* ``quantized_lengths`` int32 ``[B]`` (a multiple of ``G``) and
  ``residual_lengths`` int32 ``[B]`` (``<= R``): row ``b`` holds tokens
  ``0 .. ql[b]-1`` quantized and tokens ``ql[b] .. ql[b]+rl[b]-1`` in the
  residual slots ``0 .. rl[b]-1``.  Slots past the lengths are ignored (and
  are zero in caches built here).
* ``bits`` and ``group_size`` are static pytree metadata.

Quantization of a group ``x`` (``G`` tokens of one channel, or ``G`` channels
of one token): ``scale = (max - min) * float32(1 / (2**bits - 1))`` and
``zero = min``, both rounded to ``scale_dtype`` (float32 or bfloat16) first; then
``code = clip(round((x - zero) * (1 / scale)), 0, 2**bits - 1)`` (an explicit
float32 reciprocal, so the codes are reproducible bit for bit; round half to
even; ``scale == 0`` gives code 0), all in float32.  Dequantization is
``x_hat = code * scale + zero`` in float32.

* :func:`kivi_quantize` builds a cache from a dense float cache and lengths:
  tokens ``< floor(len/G)*G`` are quantized, the rest (``len mod G < G``
  tokens) go to the residual window.  :func:`kivi_empty` is an empty cache.
* :func:`kivi_append` appends one decode token per row (static shapes,
  jit-able): the token goes to the residual window; when the residual holds a
  full group of ``G`` tokens (and the quantized part has room), that group is
  quantized into group ``ql/G`` and removed from the residual.  Appending
  token by token therefore gives bit-for-bit the codes :func:`kivi_quantize`
  gives for the whole sequence.  With the quantized part full, tokens stay in
  the residual window; a token that finds the residual full too is dropped
  (the row's lengths do not change).  So while the quantized part has room the
  residual holds fewer than ``G`` tokens; ``R = G`` suffices and a larger
  ``R`` only adds float room once the quantized part is full.
* :func:`kivi_dequantize` returns the dense cache (tokens contiguous) and
  lengths; :func:`kivi_cache_bytes` the exact storage of the pytree.

Attention (:func:`quantized_decode_attention`): ``q`` ``[B, H, D]`` with
grouped-query heads (query head ``h`` reads KV head ``h // (H // Hkv)``),
``scale`` defaulting to ``1/sqrt(D)``.  Split-K flash decoding: the quantized
part is cut into ``num_splits`` contiguous splits, each program computes an
unnormalized partial ``(acc, m, l)`` with an online softmax over blocks of
``block_k`` tokens, the residual window gives one more partial (plain XLA, it
is at most ``R`` tokens), and all partials are merged with a log-sum-exp
reduction.  Keys beyond ``quantized_lengths`` / ``residual_lengths`` are masked
per row; a row with no token at all gets output 0 (never NaN).

Backends (``backend=``):

* ``"triton"`` (GPU): grid ``(B, Hkv, splits)``; each program handles the
  ``H // Hkv`` query heads of its KV head (zero-padded to a power of two
  >= 16, the minimum ``tl.dot`` tile) and loops over the blocks of its split
  that hold valid tokens (a dynamic trip count, so empty blocks cost nothing).
  A block loads ``[block_k // P, D]`` key bytes and ``[block_k, D // P]`` value
  bytes and unpacks them *in token / channel order* with a broadcast against
  per-slot shift amounts followed by a reshape (``[n, P, D] -> [n*P, D]`` for
  keys, ``[n, D/P, P] -> [n, D]`` for values); scales and zeros are expanded
  the same way.  Then ``s = q @ k^T``, the online softmax, and
  ``acc += p @ v``.  Triton tiles are powers of two: ``D``, ``G`` and
  ``block_k`` must be powers of two and ``block_k >= 16``.
* ``"mosaic_tpu"`` (TPU): grid ``(B, splits, blocks per split)`` with the
  block axis last and "arbitrary", accumulating in VMEM scratch; the valid
  lengths are scalar-prefetched so blocks past a row's length are neither
  fetched (the index map repeats the last valid block) nor computed.  The
  ``[B, S, Hkv, ...]`` layout puts ``(Hkv, D)`` in the tiled minor dims, so a
  block carries all KV heads and the kernel loops over them statically.
  Lanes are not interleaved on TPU: keys are unpacked into ``P`` token
  *planes* (plane ``j`` = tokens ``i*P + j``), each scored separately; the
  matching value rows are read with a strided load (stride ``P`` along the
  untiled token axis), unpacked into ``P`` channel planes, and accumulated
  into ``P`` per-plane accumulators that the wrapper interleaves back into
  channel order.  Value scales are broadcast across each plane's column groups
  with selects.  Blocks need ``block_k % G == 0`` and ``block_k | S``.
  (Note: small ``Hkv`` / ``D // P`` minor dims are padded to (8|16|32, 128)
  VMEM tiles, so the TPU default block is 256 tokens; a head-major layout
  would suit the TPU better.)
* ``"interpret"``: the Triton kernel body in the HLO interpreter on any
  device; this is what the CPU tests exercise.
* ``"xla"``: :func:`quantized_decode_attention_reference` (dequantize the
  whole cache, then dense masked softmax attention in float32); materializes
  the float cache.
* ``"auto"``: triton on GPU, mosaic_tpu on TPU, xla elsewhere.

``interpret=True`` with ``backend="triton"`` runs the Triton body in the HLO
interpreter; with ``backend="mosaic_tpu"`` it runs the Mosaic body in TPU
interpret mode (``pltpu.InterpretParams()``, or pass one).  A Mosaic kernel
traced under ``pltpu.force_tpu_interpret_mode()`` is interpreted too.

Numerics: codes are dequantized in float32 and cast to ``q.dtype`` before each
dot (bf16 queries run bf16 x bf16 -> f32 dots; float32 queries use
``Precision.HIGHEST``, i.e. IEEE fp32, not TF32); the softmax statistics and
accumulators are float32; the output is cast to ``q.dtype``.

Checked without accelerators: the kernels run interpreted on CPU against float64
references, and are compiled to machine code for an H100 (XLA:GPU, Triton, ptxas) and a
TPU v5e (XLA:TPU, Mosaic) on a CPU-only machine (``benchmarks/compile_report.py``,
``tests/targets``; :mod:`memlab.targets`).  Mosaic strides loads of 32-bit data only, so the
Mosaic body widens a head's value codes and scales into 32-bit VMEM before reading token
planes.  Forward only: there is no gradient (decode inference).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._common import (KERNEL_FLOAT_DTYPES, TRITON_SMEM_BYTES, check_on_chip, check_positive_int,
                      dot, host_value, is_concrete, is_power_of_2, lowest_power_of_2_factor,
                      next_power_of_2, pallas_lowering, precision_for)
from ._packing import code_plane, pack_bits, unpack_bits, unpack_tile

__all__ = [
    "BlockSizes",
    "KiviCache",
    "kivi_append",
    "kivi_cache_bytes",
    "kivi_dequantize",
    "kivi_empty",
    "kivi_quantize",
    "quantized_decode_attention",
    "quantized_decode_attention_reference",
]

BITS = (8, 4, 2)
_SCALE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
_NEG = -1e30        # finite "minus infinity" for running maxima (exp(NEG - NEG) = 1, not NaN)


# --------------------------------------------------------------------------
# The cache pytree
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KiviCache:
    """A KIVI-quantized KV cache (see the module docstring for the layout).

    A pytree: the arrays are leaves, ``bits`` and ``group_size`` are static
    metadata (so a cache can be passed through ``jax.jit`` and donated).
    """
    k_codes: Any              # uint8 [B, S // P, Hkv, D]
    k_scale: Any              # [B, S // G, Hkv, D]
    k_zero: Any               # [B, S // G, Hkv, D]
    v_codes: Any              # uint8 [B, S, Hkv, D // P]
    v_scale: Any              # [B, S, Hkv, D // G]
    v_zero: Any               # [B, S, Hkv, D // G]
    k_res: Any                # float [B, R, Hkv, D]
    v_res: Any                # float [B, R, Hkv, D]
    quantized_lengths: Any    # int32 [B], multiples of G
    residual_lengths: Any     # int32 [B], <= R
    bits: int = 4
    group_size: int = 32

    def __post_init__(self):
        # Only the static fields are checked here: pytree utilities rebuild the
        # node with arbitrary leaves (tracers, None, batching specs).
        _check_bits(self.bits)
        check_positive_int("group_size", self.group_size)

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def capacity(self) -> int:
        """Quantized capacity ``S`` (tokens)."""
        return int(self.v_codes.shape[1])

    @property
    def residual(self) -> int:
        """Residual window capacity ``R`` (tokens)."""
        return int(self.k_res.shape[1])

    @property
    def lengths(self):
        """Total tokens per row: ``quantized_lengths + residual_lengths``."""
        return self.quantized_lengths + self.residual_lengths

    @property
    def nbytes(self) -> int:
        """Bytes of all leaves (equals :func:`kivi_cache_bytes`)."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(self))


_DATA_FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero",
                "k_res", "v_res", "quantized_lengths", "residual_lengths")
jax.tree_util.register_dataclass(KiviCache, data_fields=list(_DATA_FIELDS),
                                 meta_fields=["bits", "group_size"])


class _Dims(NamedTuple):
    b: int
    s: int
    r: int
    hkv: int
    d: int
    bits: int
    g: int
    p: int


# --------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the quantized part of the cache.

    ``block_k`` tokens per inner step (a multiple of the group size; a power
    of two >= 16 on triton/interpret) and at most ``num_splits`` split-K
    programs per (row, KV head).  ``block_k`` must divide the capacity ``S``;
    a ``block_k`` larger than ``S`` is shrunk to the largest valid block.  The
    number of splits is the largest divisor of ``S // block_k`` that is
    ``<= num_splits``.
    """
    block_k: int = 128
    num_splits: int = 8

    def __post_init__(self):
        for name in ("block_k", "num_splits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(
                    f"BlockSizes.{name}={v!r} must be a positive int; "
                    f"pass e.g. BlockSizes({name}={128 if name == 'block_k' else 8}).")

    @classmethod
    def get_default(cls, capacity: int, *, backend: str = "triton") -> BlockSizes:
        """Defaults for a quantized capacity of ``capacity`` tokens.

        Decode is memory bound: long blocks, and enough splits to give every
        SM / TensorCore work at small batch (each split keeps >= 2 blocks).
        """
        bk = 256 if backend == "mosaic_tpu" else 128
        return cls(block_k=bk, num_splits=max(1, min(16, capacity // (2 * bk))))


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
def _check_bits(bits):
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r} is not supported; use one of {BITS} "
                         "(8, 4 or 2 bits per code, 1, 2 or 4 codes per byte).")


def _check_layout(s, d, r, bits, g, what="capacity"):
    """Shape rules shared by every entry point; ``s`` is the quantized capacity."""
    _check_bits(bits)
    check_positive_int("group_size", g)
    p = 8 // bits
    if g % p:
        raise ValueError(
            f"group_size={g} must be a multiple of {p} for bits={bits}: {p} consecutive "
            f"tokens share a key byte and must share a key group; use group_size="
            f"{-(-g // p) * p}.")
    if s <= 0:
        raise ValueError(f"the quantized {what} S={s} must be positive (a multiple of "
                         f"group_size={g}).")
    if s % g:
        raise ValueError(
            f"group_size={g} does not divide the quantized {what} S={s}; keys are "
            f"quantized in groups of {g} tokens: use S={-(-s // g) * g} (pad the cache) "
            f"or a group size dividing {s}.")
    if d % g:
        raise ValueError(
            f"group_size={g} does not divide head_dim D={d}; values are quantized in "
            f"groups of {g} channels: use a group size dividing {d} "
            f"(e.g. {math.gcd(d, g)}).")
    if r < g:
        raise ValueError(
            f"residual={r} is smaller than group_size={g}: the float residual window must "
            f"hold a whole key group before it is quantized; use residual >= {g}.")


def _check_cache(cache, name="cache") -> _Dims:
    if not isinstance(cache, KiviCache):
        raise TypeError(f"{name} must be a KiviCache (build one with kivi_quantize or "
                        f"kivi_empty), got {type(cache).__name__}.")
    bits, g = cache.bits, cache.group_size
    p = 8 // bits
    if cache.k_res.ndim != 4:
        raise ValueError(f"{name}.k_res must be [B, R, Hkv, D], got shape {tuple(cache.k_res.shape)}.")
    b, r, hkv, d = (int(x) for x in cache.k_res.shape)
    if cache.v_codes.ndim != 4:
        raise ValueError(f"{name}.v_codes must be [B, S, Hkv, D//{p}], got shape "
                         f"{tuple(cache.v_codes.shape)}.")
    s = int(cache.v_codes.shape[1])
    _check_layout(s, d, r, bits, g)
    want = {
        "k_codes": (b, s // p, hkv, d), "k_scale": (b, s // g, hkv, d),
        "k_zero": (b, s // g, hkv, d), "v_codes": (b, s, hkv, d // p),
        "v_scale": (b, s, hkv, d // g), "v_zero": (b, s, hkv, d // g),
        "k_res": (b, r, hkv, d), "v_res": (b, r, hkv, d),
        "quantized_lengths": (b,), "residual_lengths": (b,),
    }
    for f, shape in want.items():
        got = tuple(getattr(cache, f).shape)
        if got != shape:
            raise ValueError(
                f"{name}.{f} has shape {got}, expected {shape} for B={b}, S={s}, R={r}, "
                f"Hkv={hkv}, D={d}, bits={bits}, group_size={g}.")
    for f in ("k_codes", "v_codes"):
        if jnp.dtype(getattr(cache, f).dtype) != jnp.uint8:
            raise TypeError(f"{name}.{f} must be uint8 (packed {bits}-bit codes), got "
                            f"{getattr(cache, f).dtype}.")
    sd = jnp.dtype(cache.k_scale.dtype)
    if sd not in _SCALE_DTYPES:
        raise TypeError(f"{name}.k_scale has dtype {sd}; scales must be float32 or bfloat16.")
    for f in ("k_zero", "v_scale", "v_zero"):
        if jnp.dtype(getattr(cache, f).dtype) != sd:
            raise TypeError(f"{name}.{f} has dtype {getattr(cache, f).dtype} but k_scale is "
                            f"{sd}; all scales and zeros must share one dtype.")
    if jnp.dtype(cache.k_res.dtype) not in KERNEL_FLOAT_DTYPES:
        raise TypeError(f"{name}.k_res has dtype {cache.k_res.dtype}; use float32, bfloat16 "
                        "or float16.")
    if cache.v_res.dtype != cache.k_res.dtype:
        raise TypeError(f"{name}.v_res dtype {cache.v_res.dtype} != k_res dtype "
                        f"{cache.k_res.dtype}; keep both residual windows in one dtype.")
    for f in ("quantized_lengths", "residual_lengths"):
        if jnp.dtype(getattr(cache, f).dtype) != jnp.int32:
            raise TypeError(f"{name}.{f} must be int32, got {getattr(cache, f).dtype}.")
    return _Dims(b, s, r, hkv, d, bits, g, p)


def _check_kv(k, v, name="k/v"):
    for arg, a in (("k", k), ("v", v)):
        if not hasattr(a, "ndim") or a.ndim != 4:
            raise ValueError(f"{arg} must be [batch, seq, kv_heads, head_dim], got shape "
                             f"{tuple(getattr(a, 'shape', ()))}.")
        if jnp.dtype(a.dtype) not in KERNEL_FLOAT_DTYPES:
            raise TypeError(f"{arg} has dtype {a.dtype}; use float32, bfloat16 or float16.")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}; KIVI needs "
                         "values with the keys' head_dim.")
    if k.dtype != v.dtype:
        raise TypeError(f"k dtype {k.dtype} != v dtype {v.dtype}; cast them to one dtype.")


# --------------------------------------------------------------------------
# (De)quantization (pure JAX); packing: memlab_kernels._packing
# --------------------------------------------------------------------------
def _minmax_quantize(x, axis, bits, scale_dtype):
    """Asymmetric min/max quantization of float32 ``x`` with statistics over ``axis``."""
    levels = 2 ** bits - 1
    mn = jnp.min(x, axis=axis, keepdims=True)
    mx = jnp.max(x, axis=axis, keepdims=True)
    # Multiply by the float32 reciprocal (XLA rewrites a division by a constant
    # that way anyway; spelling it out keeps every backend bit-identical).
    scale = ((mx - mn) * np.float32(1.0 / levels)).astype(scale_dtype)
    zero = mn.astype(scale_dtype)
    s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
    # Codes use an explicit reciprocal: compilers may turn a division by a
    # broadcast value into a multiplication by its reciprocal in some fusions
    # and not others, and kivi_append must reproduce kivi_quantize bit for bit.
    # The barrier keeps XLA from folding the reciprocal back into a division.
    inv = jnp.where(s32 > 0, np.float32(1.0) / jnp.where(s32 > 0, s32, np.float32(1.0)),
                    np.float32(0.0))
    inv, z32 = lax.optimization_barrier((inv, z32))
    code = jnp.round((x - z32) * inv)
    code = jnp.clip(code, 0, levels).astype(jnp.uint8)
    return code, jnp.squeeze(scale, axis), jnp.squeeze(zero, axis)


def _quantize_keys(k, bits, g, scale_dtype):
    """Per-channel keys: ``k`` [B, n*G, Hkv, D] -> codes [B, n*G/P, Hkv, D], scale/zero [B, n, Hkv, D]."""
    b, t, hkv, d = k.shape
    kg = k.astype(jnp.float32).reshape(b, t // g, g, hkv, d)
    code, scale, zero = _minmax_quantize(kg, 2, bits, scale_dtype)
    return pack_bits(code.reshape(b, t, hkv, d), bits, 1), scale, zero


def _quantize_values(v, bits, g, scale_dtype):
    """Per-token values: ``v`` [B, T, Hkv, D] -> codes [B, T, Hkv, D/P], scale/zero [B, T, Hkv, D/G]."""
    b, t, hkv, d = v.shape
    vg = v.astype(jnp.float32).reshape(b, t, hkv, d // g, g)
    code, scale, zero = _minmax_quantize(vg, 4, bits, scale_dtype)
    return pack_bits(code.reshape(b, t, hkv, d), bits, 3), scale, zero


def _dequantize_quantized(cache: KiviCache, dims: _Dims):
    """Float32 keys and values of the quantized part, ``[B, S, Hkv, D]`` each."""
    b, s, _, hkv, d, bits, g, _ = dims
    kc = unpack_bits(cache.k_codes, bits, 1).astype(jnp.float32)
    ks = jnp.repeat(cache.k_scale.astype(jnp.float32), g, axis=1)
    kz = jnp.repeat(cache.k_zero.astype(jnp.float32), g, axis=1)
    vc = unpack_bits(cache.v_codes, bits, 3).astype(jnp.float32)
    vs = jnp.repeat(cache.v_scale.astype(jnp.float32), g, axis=3)
    vz = jnp.repeat(cache.v_zero.astype(jnp.float32), g, axis=3)
    return kc * ks + kz, vc * vs + vz


def _as_lengths(lengths, b, name="lengths"):
    lengths = jnp.asarray(lengths)
    if lengths.shape != (b,):
        raise ValueError(f"{name} must have shape (B,) = ({b},), got {tuple(lengths.shape)}.")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"{name} must be integers, got {lengths.dtype}.")
    return lengths.astype(jnp.int32)


def kivi_quantize(k, v, lengths, *, bits: int, group_size: int, residual: int,
                  scale_dtype=jnp.float32, capacity: int | None = None) -> KiviCache:
    """Build a :class:`KiviCache` from a dense float cache.

    Args:
      k, v: ``[B, T, Hkv, D]`` float keys and values (one dtype; it becomes the
        residual window's dtype).  Tokens at and past ``lengths[b]`` are ignored.
      lengths: int ``[B]``, ``0 <= lengths[b] <= T``.
      bits: 8, 4 or 2.
      group_size: ``G``, tokens per key group and channels per value group;
        divides the capacity and ``D``, a multiple of ``8 // bits``.
      residual: ``R >= G``, the float residual window capacity.
      scale_dtype: float32 (default) or bfloat16 scales and zeros.
      capacity: quantized capacity ``S`` (a multiple of ``G``, at least
        ``floor(T / G) * G``); defaults to ``T``.  Extra capacity is room for
        :func:`kivi_append`.

    Row ``b`` quantizes tokens ``< floor(lengths[b] / G) * G``; the remaining
    ``lengths[b] mod G`` tokens go to the residual window.
    """
    _check_kv(k, v)
    b, t, hkv, d = (int(x) for x in k.shape)
    s = t if capacity is None else capacity
    check_positive_int("residual", residual)
    if capacity is not None:
        check_positive_int("capacity", capacity)
    if jnp.dtype(scale_dtype) not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype={jnp.dtype(scale_dtype).name} is not supported; use "
                        "jnp.float32 or jnp.bfloat16.")
    _check_layout(s, d, residual, bits, group_size,
                  what="capacity (T when capacity=None)" if capacity is None else "capacity")
    if s < (t // group_size) * group_size:
        raise ValueError(f"capacity={s} is smaller than floor(T/G)*G={(t // group_size) * group_size} "
                         f"for T={t}, group_size={group_size}.")
    lengths = _as_lengths(lengths, b)
    host = host_value(lengths)
    if host is not None and b:
        if host.min() < 0 or host.max() > t:
            raise ValueError(f"lengths must lie in [0, T={t}], got values in "
                             f"[{host.min()}, {host.max()}].")
    return _quantize_impl(k, v, lengths, bits=bits, g=group_size, r=residual,
                          scale_dtype=jnp.dtype(scale_dtype), s=s)


@functools.partial(jax.jit, static_argnames=("bits", "g", "r", "scale_dtype", "s"))
def _quantize_impl(k, v, lengths, *, bits, g, r, scale_dtype, s):
    b, t, hkv, d = k.shape
    lengths = jnp.clip(lengths, 0, t)
    qlen = (lengths // g) * g
    rlen = lengths - qlen
    pos = jnp.arange(t, dtype=jnp.int32)
    inq = (pos[None, :] < qlen[:, None])[:, :, None, None]
    # Zero tokens past the quantized length: their groups quantize to all-zero
    # codes, scales and zeros, exactly what an empty cache holds.
    kq = jnp.where(inq, k, jnp.zeros((), k.dtype))
    vq = jnp.where(inq, v, jnp.zeros((), v.dtype))
    if s >= t:
        pad = ((0, 0), (0, s - t), (0, 0), (0, 0))
        kq, vq = jnp.pad(kq, pad), jnp.pad(vq, pad)
    else:
        kq, vq = kq[:, :s], vq[:, :s]
    k_codes, k_scale, k_zero = _quantize_keys(kq, bits, g, scale_dtype)
    v_codes, v_scale, v_zero = _quantize_values(vq, bits, g, scale_dtype)
    # Residual: tokens qlen .. qlen+rlen-1 of each row into slots 0 .. rlen-1.
    pad = ((0, 0), (0, r), (0, 0), (0, 0))
    idx = qlen[:, None] + jnp.arange(r, dtype=jnp.int32)[None, :]
    keep = (jnp.arange(r)[None, :] < rlen[:, None])[:, :, None, None]

    def take(x):
        xr = jnp.take_along_axis(jnp.pad(x, pad), idx[:, :, None, None], axis=1)
        return jnp.where(keep, xr, jnp.zeros((), x.dtype))

    return KiviCache(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, take(k), take(v),
                     qlen.astype(jnp.int32), rlen.astype(jnp.int32), bits=bits, group_size=g)


def kivi_empty(batch: int, capacity: int, kv_heads: int, head_dim: int, *, bits: int,
               group_size: int, residual: int, dtype=jnp.bfloat16,
               scale_dtype=jnp.float32) -> KiviCache:
    """An empty cache (all zeros, lengths 0) to fill with :func:`kivi_append`."""
    for name, val in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                      ("residual", residual), ("capacity", capacity)):
        check_positive_int(name, val)
    _check_layout(capacity, head_dim, residual, bits, group_size)
    if jnp.dtype(scale_dtype) not in _SCALE_DTYPES:
        raise TypeError(f"scale_dtype={jnp.dtype(scale_dtype).name} is not supported; use "
                        "jnp.float32 or jnp.bfloat16.")
    if jnp.dtype(dtype) not in KERNEL_FLOAT_DTYPES:
        raise TypeError(f"dtype={jnp.dtype(dtype).name}; use float32, bfloat16 or float16.")
    p, g = 8 // bits, group_size
    b, s, h, d, r = batch, capacity, kv_heads, head_dim, residual
    z = jnp.zeros
    return KiviCache(z((b, s // p, h, d), jnp.uint8), z((b, s // g, h, d), scale_dtype),
                     z((b, s // g, h, d), scale_dtype), z((b, s, h, d // p), jnp.uint8),
                     z((b, s, h, d // g), scale_dtype), z((b, s, h, d // g), scale_dtype),
                     z((b, r, h, d), dtype), z((b, r, h, d), dtype),
                     z((b,), jnp.int32), z((b,), jnp.int32), bits=bits, group_size=g)


def kivi_append(cache: KiviCache, k_new, v_new) -> KiviCache:
    """Append one token per row: ``k_new``, ``v_new`` ``[B, Hkv, D]``.

    The token goes to residual slot ``residual_lengths[b]``.  If that fills a
    group of ``G`` residual tokens and the quantized part has room, the group
    is quantized (per-channel keys, per-token values) into group
    ``quantized_lengths[b] / G`` and shifted out of the residual window.
    Static shapes throughout: jit it (and donate the cache) in a decode loop.
    A row whose quantized part and residual window are both full cannot take
    the token: called eagerly (concrete lengths) this raises; under ``jit`` the
    token is dropped and that row's lengths stop growing, so size ``capacity``
    for the whole generation up front (the generation engine does).
    """
    dims = _check_cache(cache)
    want = (dims.b, dims.hkv, dims.d)
    for name, a in (("k_new", k_new), ("v_new", v_new)):
        if tuple(a.shape) != want:
            raise ValueError(f"{name} must be [B, Hkv, D] = {want} (one token per row), got "
                             f"{tuple(a.shape)}.")
        if jnp.dtype(a.dtype) not in KERNEL_FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {a.dtype}; use a float dtype.")
    qlen, rlen = cache.quantized_lengths, cache.residual_lengths
    if is_concrete(qlen) and is_concrete(rlen):
        full = (np.asarray(rlen) >= dims_res(cache)) & (np.asarray(qlen) >= cache.capacity)
        if full.any():
            raise ValueError(
                f"kivi_append: rows {np.flatnonzero(full).tolist()} are full (capacity "
                f"{cache.capacity} quantized + {dims_res(cache)} residual tokens); build the cache "
                "with a larger capacity= (kivi_quantize/kivi_empty).")
    return _append_impl(cache, k_new, v_new)


def dims_res(cache: KiviCache) -> int:
    return cache.k_res.shape[1]


@jax.jit
def _append_impl(cache: KiviCache, k_new, v_new):
    b, r, hkv, d = cache.k_res.shape
    s = cache.v_codes.shape[1]
    bits, g = cache.bits, cache.group_size
    p = 8 // bits
    qlen, rlen = cache.quantized_lengths, cache.residual_lengths
    ok = rlen < r
    slot = jnp.minimum(rlen, r - 1)

    def put(res, new, i, ok):
        old = lax.dynamic_index_in_dim(res, i, 0, keepdims=False)
        return lax.dynamic_update_index_in_dim(res, jnp.where(ok, new, old), i, 0)

    k_res = jax.vmap(put)(cache.k_res, k_new.astype(cache.k_res.dtype), slot, ok)
    v_res = jax.vmap(put)(cache.v_res, v_new.astype(cache.v_res.dtype), slot, ok)
    rlen = rlen + ok.astype(jnp.int32)
    flush = (rlen >= g) & (qlen + g <= s)
    sd = cache.k_scale.dtype
    kc, ks, kz = _quantize_keys(k_res[:, :g], bits, g, sd)       # [B,G/P,..], [B,1,..]
    vc, vs, vz = _quantize_values(v_res[:, :g], bits, g, sd)     # [B,G,..,D/P], [B,G,..,D/G]
    grp = jnp.minimum(qlen // g, s // g - 1)

    def upd(arr, new, start, ok):
        old = lax.dynamic_slice_in_dim(arr, start, new.shape[0], 0)
        return lax.dynamic_update_slice_in_dim(arr, jnp.where(ok, new, old), start, 0)

    vupd = jax.vmap(upd)
    k_codes = vupd(cache.k_codes, kc, grp * (g // p), flush)
    k_scale = vupd(cache.k_scale, ks, grp, flush)
    k_zero = vupd(cache.k_zero, kz, grp, flush)
    v_codes = vupd(cache.v_codes, vc, grp * g, flush)
    v_scale = vupd(cache.v_scale, vs, grp * g, flush)
    v_zero = vupd(cache.v_zero, vz, grp * g, flush)

    def shift(res):   # drop the first G residual slots of flushed rows
        shifted = jnp.concatenate([res[:, g:], jnp.zeros_like(res[:, :g])], axis=1)
        return jnp.where(flush[:, None, None, None], shifted, res)

    f = flush.astype(jnp.int32) * g
    return KiviCache(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, shift(k_res),
                     shift(v_res), qlen + f, rlen - f, bits=bits, group_size=g)


def kivi_dequantize(cache: KiviCache, dtype=jnp.float32):
    """Dense ``(k, v, lengths)``: ``[B, S + R, Hkv, D]`` in ``dtype`` with row ``b``'s
    tokens contiguous at ``0 .. lengths[b]-1`` (zeros after), ``lengths`` int32 ``[B]``."""
    dims = _check_cache(cache)
    return _dequantize_impl(cache, jnp.dtype(dtype), dims.s)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dequantize_impl(cache, dtype, s):
    dims = _check_cache(cache)
    kq, vq = _dequantize_quantized(cache, dims)
    qlen, rlen = cache.quantized_lengths, cache.residual_lengths
    r = dims.r
    inq = (jnp.arange(s)[None, :] < qlen[:, None])[:, :, None, None]
    inr = (jnp.arange(r)[None, :] < rlen[:, None])[:, :, None, None]

    def place(xq, xres):
        dense = jnp.pad(jnp.where(inq, xq, 0.0), ((0, 0), (0, r), (0, 0), (0, 0)))
        res = jnp.where(inr, xres.astype(jnp.float32), 0.0)
        put = lambda dn, rs, q0: lax.dynamic_update_slice_in_dim(
            dn, rs + lax.dynamic_slice_in_dim(dn, q0, r, 0), q0, 0)
        return jax.vmap(put)(dense, res, qlen).astype(dtype)

    return place(kq, cache.k_res), place(vq, cache.v_res), qlen + rlen


def kivi_cache_bytes(batch: int, capacity: int, kv_heads: int, head_dim: int, *, bits: int,
                     group_size: int, residual: int, dtype=jnp.bfloat16,
                     scale_dtype=jnp.float32) -> int:
    """Exact bytes of a :class:`KiviCache` (uint8 bytes; no sub-byte dtypes).

    ``B * Hkv * [2 * S * D * bits / 8                     (key + value codes)
                 + 2 * (S / G) * D * ss                    (key scale + zero)
                 + 2 * S * (D / G) * ss                    (value scale + zero)
                 + 2 * R * D * fs]                         (float residual k, v)
      + 2 * 4 * B``                                        (int32 lengths)

    with ``ss`` / ``fs`` the itemsizes of ``scale_dtype`` / ``dtype``.
    """
    _check_layout(capacity, head_dim, residual, bits, group_size)
    b, s, h, d, g, r = batch, capacity, kv_heads, head_dim, group_size, residual
    ss, fs = jnp.dtype(scale_dtype).itemsize, jnp.dtype(dtype).itemsize
    per_head = (2 * s * d * bits // 8 + 2 * (s // g) * d * ss + 2 * s * (d // g) * ss
                + 2 * r * d * fs)
    return b * h * per_head + 2 * 4 * b


# --------------------------------------------------------------------------
# Reference attention
# --------------------------------------------------------------------------
def _check_q(q, dims: _Dims, cache: KiviCache):
    if not hasattr(q, "ndim") or q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim] (one decode token per row), got "
                         f"shape {tuple(getattr(q, 'shape', ()))}.")
    if jnp.dtype(q.dtype) not in KERNEL_FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; use float32, bfloat16 or float16.")
    b, h, d = q.shape
    if b != dims.b:
        raise ValueError(f"q batch {b} != cache batch {dims.b}.")
    if d != dims.d:
        raise ValueError(f"q head_dim {d} != cache head_dim {dims.d}.")
    if h % dims.hkv:
        raise ValueError(
            f"query heads H={h} must be a multiple of the cache's KV heads Hkv={dims.hkv} "
            f"(grouped-query attention); use Hkv in {[x for x in range(1, h + 1) if h % x == 0]}.")
    if q.dtype != cache.k_res.dtype:
        raise TypeError(f"q dtype {q.dtype} != cache dtype {cache.k_res.dtype} (the residual "
                        "window's); quantize the cache from keys/values in the query dtype or "
                        f"cast q with q.astype({jnp.dtype(cache.k_res.dtype).name}).")


def quantized_decode_attention_reference(q, cache: KiviCache, *, scale: float | None = None):
    """Pure-JAX spec: dequantize the whole cache, then masked softmax attention in float32."""
    dims = _check_cache(cache)
    _check_q(q, dims, cache)
    scale = 1.0 / math.sqrt(dims.d) if scale is None else float(scale)
    return _reference_impl(q, cache, scale)


@functools.partial(jax.jit, static_argnums=2)
def _reference_impl(q, cache, scale):
    dims = _check_cache(cache)
    kq, vq = _dequantize_quantized(cache, dims)
    k = jnp.concatenate([kq, cache.k_res.astype(jnp.float32)], axis=1)
    v = jnp.concatenate([vq, cache.v_res.astype(jnp.float32)], axis=1)
    s, r = dims.s, dims.r
    pos = jnp.arange(s + r)[None, :]
    ql, rl = cache.quantized_lengths[:, None], cache.residual_lengths[:, None]
    valid = (pos < ql) | ((pos >= s) & (pos - s < rl))                    # [B, S+R]
    b, h, d = q.shape
    qg = q.astype(jnp.float32).reshape(b, dims.hkv, h // dims.hkv, d)
    hi = lax.Precision.HIGHEST
    sc = jnp.einsum("bkgd,bskd->bkgs", qg, k, precision=hi) * scale
    vis = valid[:, None, None, :]
    sc = jnp.where(vis, sc, -jnp.inf)
    mx = jnp.max(sc, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    pr = jnp.where(vis, jnp.exp(sc - mx), 0.0)
    l = jnp.sum(pr, axis=-1, keepdims=True)
    out = jnp.einsum("bkgs,bskd->bkgd", pr / jnp.where(l > 0, l, 1.0), v, precision=hi)
    return out.reshape(b, h, d).astype(q.dtype)


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static (hashable) configuration of one public call."""
    kernel: str                   # "triton" | "mosaic"
    interpret: Any                # False | True | pltpu.InterpretParams
    block_sizes: BlockSizes | None
    sm_scale: float


@dataclasses.dataclass(frozen=True)
class _Plan:
    bk: int          # tokens per block
    splits: int
    nkb: int         # blocks per split
    gq: int          # query heads per KV head
    gp: int          # padded query heads per program (triton)


def _splits_for(n_blocks, want):
    return max(x for x in range(1, min(want, n_blocks) + 1) if n_blocks % x == 0)


def triton_smem_bytes(block_k: int, d: int, itemsize: int) -> int:
    """Shared memory of a Triton program (an upper bound of Triton's allocation): the
    dequantized ``[block_k, D]`` key and value tiles staged for the dots, plus 8 KiB."""
    return 2 * block_k * d * itemsize + 8192


def _plan(spec: _Spec, dims: _Dims, h: int, itemsize: int = 4) -> _Plan:
    user = spec.block_sizes is not None
    backend = "mosaic_tpu" if spec.kernel == "mosaic" else "triton"
    bs = spec.block_sizes or BlockSizes.get_default(dims.s, backend=backend)
    s, g, d = dims.s, dims.g, dims.d
    gq = h // dims.hkv
    if spec.kernel == "triton":
        for name, val in (("head_dim", d), ("group_size", g)):
            if not is_power_of_2(val):
                raise ValueError(
                    f"{name}={val} must be a power of two on the triton/interpret backends "
                    "(Triton tiles have power-of-two sizes); use backend='xla' or "
                    "'mosaic_tpu'.")
        if d < 16:
            raise ValueError(f"head_dim={d} is below the minimum tl.dot size 16 on triton.")
        if user and not is_power_of_2(bs.block_k):
            raise ValueError(
                f"block_sizes.block_k={bs.block_k} must be a power of two on the "
                f"triton/interpret backends; use block_k={next_power_of_2(bs.block_k)}.")
        bk = min(bs.block_k if user else max(bs.block_k, g), lowest_power_of_2_factor(s))
        if user and bs.block_k <= s and s % bs.block_k:
            raise ValueError(
                f"block_sizes.block_k={bs.block_k} does not divide the quantized capacity "
                f"S={s}; use block_k={bk}.")
        if bk % g:
            raise ValueError(
                f"block_sizes.block_k={bk} must be a multiple of group_size={g} so every "
                f"block holds whole key groups; use block_k={g * max(1, 16 // g)}.")
        if bk < 16:
            raise ValueError(
                f"block_k={bk} is below the minimum tl.dot size 16 (the capacity S={s} has "
                f"no power-of-two factor >= 16 that is a multiple of group_size={g}); "
                "use a capacity that is a multiple of 16 or backend='xla'.")
        while not user and bk > max(g, 16) and \
                triton_smem_bytes(bk, d, itemsize) > TRITON_SMEM_BYTES:
            bk //= 2   # default blocks shrink to fit; chosen ones are refused below
        check_on_chip("quantized_decode_attention", triton_smem_bytes(bk, d, itemsize),
                      TRITON_SMEM_BYTES, "shared memory",
                      f"lower block_sizes.block_k={bk} to {max(g, 16, bk // 2)}")
        gp = max(16, next_power_of_2(gq))
    else:
        if user and bs.block_k <= s and (s % bs.block_k or bs.block_k % g):
            raise ValueError(
                f"block_sizes.block_k={bs.block_k} must be a multiple of group_size={g} that "
                f"divides the quantized capacity S={s} on mosaic_tpu; use e.g. block_k={g}.")
        cap = max(g, min(bs.block_k, s))
        n = s // g
        bk = g * max(x for x in range(1, n + 1) if n % x == 0 and g * x <= cap)
        gp = gq
    n_blocks = s // bk
    splits = _splits_for(n_blocks, bs.num_splits)
    return _Plan(bk, splits, n_blocks // splits, gq, gp)


# --------------------------------------------------------------------------
# Triton kernel (also the "interpret" backend)
# --------------------------------------------------------------------------
def _repeat_rows(x, reps):
    """``[n, D]`` -> ``[n*reps, D]``, each row repeated ``reps`` times."""
    n, d = x.shape
    if reps == 1:
        return x
    return jnp.broadcast_to(x[:, None, :], (n, reps, d)).reshape(n * reps, d)


def _repeat_cols(x, reps):
    """``[n, m]`` -> ``[n, m*reps]``, each column repeated ``reps`` times."""
    n, m = x.shape
    if reps == 1:
        return x
    return jnp.broadcast_to(x[:, :, None], (n, m, reps)).reshape(n, m * reps)


def _triton_kernel(qlen_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref,
                   acc_ref, m_ref, l_ref, *, dims: _Dims, plan: _Plan, sm_scale, precision):
    bits, g, p = dims.bits, dims.g, dims.p
    bk, gp = plan.bk, plan.gp
    split_len = plan.bk * plan.nkb
    cdtype = q_ref.dtype
    start = pl.program_id(2) * split_len
    qlen = qlen_ref[0]
    n_valid = jnp.clip(qlen - start, 0, split_len)
    n_blocks = lax.div(n_valid + (bk - 1), np.int32(bk))   # (non-negative: no floor fix-up)
    q = q_ref[...]                                                  # [gp, D]

    def body(i, carry):
        acc, m, l = carry
        kc = kc_ref[pl.ds(i * (bk // p), bk // p), :]                # uint8 [bk/P, D]
        ks = ks_ref[pl.ds(i * (bk // g), bk // g), :]                # [bk/G, D]
        kz = kz_ref[pl.ds(i * (bk // g), bk // g), :]
        k = (unpack_tile(kc, bits, 0).astype(jnp.float32)
             * _repeat_rows(ks.astype(jnp.float32), g)
             + _repeat_rows(kz.astype(jnp.float32), g))              # [bk, D]
        s = dot(q, k.astype(cdtype).T, precision) * sm_scale         # [gp, bk]
        tok = start + i * bk + jnp.arange(bk, dtype=jnp.int32)
        valid = tok < qlen
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        corr = jnp.exp(m - m_new)
        pr = jnp.exp(s - m_new[:, None])
        l = l * corr + jnp.sum(pr, axis=1)
        vc = vc_ref[pl.ds(i * bk, bk), :]                             # uint8 [bk, D/P]
        vs = vs_ref[pl.ds(i * bk, bk), :]                             # [bk, D/G]
        vz = vz_ref[pl.ds(i * bk, bk), :]
        v = (unpack_tile(vc, bits, 1).astype(jnp.float32)
             * _repeat_cols(vs.astype(jnp.float32), g)
             + _repeat_cols(vz.astype(jnp.float32), g))              # [bk, D]
        v = jnp.where(valid[:, None], v, 0.0)
        acc = acc * corr[:, None] + dot(pr.astype(cdtype), v.astype(cdtype), precision)
        return acc, m_new, l

    init = (jnp.zeros((gp, dims.d), jnp.float32), jnp.full((gp,), _NEG, jnp.float32),
            jnp.zeros((gp,), jnp.float32))
    acc, m, l = lax.fori_loop(0, n_blocks, body, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _triton_call(spec: _Spec, dims: _Dims, plan: _Plan, q4, cache: KiviCache, precision):
    b, s, _, hkv, d, _, g, p = dims
    splits, gp = plan.splits, plan.gp
    ln = s // splits                     # tokens per split
    kernel = functools.partial(_triton_kernel, dims=dims, plan=plan, sm_scale=spec.sm_scale,
                               precision=precision)
    in_specs = [
        pl.BlockSpec((1,), lambda i, h, j: (i,)),
        pl.BlockSpec((None, None, gp, d), lambda i, h, j: (i, h, 0, 0)),
        pl.BlockSpec((None, ln // p, None, d), lambda i, h, j: (i, j, h, 0)),
        pl.BlockSpec((None, ln // g, None, d), lambda i, h, j: (i, j, h, 0)),
        pl.BlockSpec((None, ln // g, None, d), lambda i, h, j: (i, j, h, 0)),
        pl.BlockSpec((None, ln, None, d // p), lambda i, h, j: (i, j, h, 0)),
        pl.BlockSpec((None, ln, None, d // g), lambda i, h, j: (i, j, h, 0)),
        pl.BlockSpec((None, ln, None, d // g), lambda i, h, j: (i, j, h, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, gp, d), lambda i, h, j: (i, h, j, 0, 0)),
        pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
        pl.BlockSpec((None, None, None, gp), lambda i, h, j: (i, h, j, 0)),
    ]
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((b, hkv, splits, gp, d), f32),
                 jax.ShapeDtypeStruct((b, hkv, splits, gp), f32),
                 jax.ShapeDtypeStruct((b, hkv, splits, gp), f32)]
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, hkv, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=spec.interpret,
        cost_estimate=_cost(q4, cache, dims, plan),
        name=f"kivi_decode_{dims.bits}bit",
    )(cache.quantized_lengths, q4, cache.k_codes, cache.k_scale, cache.k_zero,
      cache.v_codes, cache.v_scale, cache.v_zero)
    gq = plan.gq
    return acc[:, :, :, :gq], m[:, :, :, :gq], l[:, :, :, :gq]


# --------------------------------------------------------------------------
# Mosaic TPU kernel
# --------------------------------------------------------------------------
def _spread_lanes(x, width, n):
    """``[r, n // width]`` -> ``[r, n]``: column ``c`` takes ``x[:, c // width]`` (selects, no lane shuffles)."""
    r, m = x.shape
    if m == 1:
        return jnp.broadcast_to(x, (r, n))
    grp = lax.div(lax.broadcasted_iota(jnp.int32, (r, n), 1), np.int32(width))
    out = jnp.broadcast_to(x[:, 0:1], (r, n))
    for gi in range(1, m):
        out = jnp.where(grp == gi, jnp.broadcast_to(x[:, gi:gi + 1], (r, n)), out)
    return out


def _mosaic_kernel(qlen_ref, q_ref, kc_ref, ks_ref, kz_ref, vc_ref, vs_ref, vz_ref,
                   acc_out, m_out, l_out, acc_sc, m_sc, l_sc, vc_sc, vs_sc, vz_sc, *,
                   dims: _Dims, plan: _Plan, sm_scale, precision):
    bits, g, p, d, hkv = dims.bits, dims.g, dims.p, dims.d, dims.hkv
    bk, nkb, gq = plan.bk, plan.nkb, plan.gq
    n, dp = bk // p, d // p
    bi, si, kb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdtype = q_ref.dtype

    @pl.when(kb == 0)
    def _init():
        acc_sc[...] = jnp.zeros_like(acc_sc)
        m_sc[...] = jnp.full_like(m_sc, _NEG)
        l_sc[...] = jnp.zeros_like(l_sc)

    start = (si * nkb + kb) * bk
    qlen = qlen_ref[bi]

    @pl.when(start < qlen)
    def _compute():
        row = lax.broadcasted_iota(jnp.int32, (gq, n), 1)
        col_tok = lax.broadcasted_iota(jnp.int32, (n, 1), 0)
        for h in range(hkv):
            q = q_ref[h]                                               # [Gq, D]
            kc = kc_ref[:, h, :].astype(jnp.int32)                     # [bk/P, D]
            ks = _repeat_rows(ks_ref[:, h, :].astype(jnp.float32), g // p)
            kz = _repeat_rows(kz_ref[:, h, :].astype(jnp.float32), g // p)
            scores = []
            for j in range(p):                                         # token plane j
                kj = (code_plane(kc, bits, j).astype(jnp.float32) * ks + kz).astype(cdtype)
                sj = lax.dot_general(q, kj, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32,
                                     precision=precision) * sm_scale   # [Gq, bk/P]
                scores.append(jnp.where(start + row * p + j < qlen, sj, -jnp.inf))
            m_prev, l_prev = m_sc[h], l_sc[h]                          # [Gq, 1]
            m_cur = scores[0].max(axis=1, keepdims=True)
            for sj in scores[1:]:
                m_cur = jnp.maximum(m_cur, sj.max(axis=1, keepdims=True))
            m_new = jnp.maximum(m_prev, m_cur)
            corr = jnp.exp(m_prev - m_new)
            probs = [jnp.exp(sj - m_new) for sj in scores]
            l_new = l_prev * corr
            for pj in probs:
                l_new = l_new + pj.sum(axis=1, keepdims=True)
            m_sc[h], l_sc[h] = m_new, l_new
            accs = [acc_sc[h, t] * corr for t in range(p)]             # [Gq, D/P] each
            # Mosaic strides loads of 32-bit data only: widen this head's value codes and
            # scales into 32-bit VMEM once, then read token plane j as rows j, j+P, ...
            vc_sc[...] = vc_ref[:, h, :].astype(jnp.int32)             # [bk, D/P]
            vs_sc[...] = vs_ref[:, h, :].astype(jnp.float32)           # [bk, D/G]
            vz_sc[...] = vz_ref[:, h, :].astype(jnp.float32)
            for j in range(p):
                rows = pl.ds(j, n, stride=p) if p > 1 else slice(None)
                vc = vc_sc[rows, :]                                    # [bk/P, D/P]
                vs = _spread_lanes(vs_sc[rows, :], g // p, dp)
                vz = _spread_lanes(vz_sc[rows, :], g // p, dp)
                ok = start + col_tok * p + j < qlen                    # [bk/P, 1]
                pj = probs[j].astype(cdtype)
                for t in range(p):                                     # channel plane t
                    vt = code_plane(vc, bits, t).astype(jnp.float32) * vs + vz
                    vt = jnp.where(ok, vt, 0.0).astype(cdtype)
                    accs[t] = accs[t] + dot(pj, vt, precision)
            for t in range(p):
                acc_sc[h, t] = accs[t]

    @pl.when(kb == nkb - 1)
    def _finish():
        acc_out[...] = acc_sc[...]
        m_out[...] = m_sc[...]
        l_out[...] = l_sc[...]


def _mosaic_call(spec: _Spec, dims: _Dims, plan: _Plan, q4, cache: KiviCache, precision):
    b, s, _, hkv, d, _, g, p = dims
    bk, splits, nkb, gq = plan.bk, plan.splits, plan.nkb, plan.gq
    kernel = functools.partial(_mosaic_kernel, dims=dims, plan=plan, sm_scale=spec.sm_scale,
                               precision=precision)

    def blk(i, j, kb, qlen_ref):
        # Blocks past the row's length repeat the last valid block: no new DMA.
        last = jnp.maximum(lax.div(qlen_ref[i] + (bk - 1), np.int32(bk)) - 1, 0)
        return jnp.minimum(j * nkb + kb, last)

    in_specs = [
        pl.BlockSpec((None, hkv, gq, d), lambda i, j, kb, ql: (i, 0, 0, 0)),
        pl.BlockSpec((None, bk // p, hkv, d), lambda i, j, kb, ql: (i, blk(i, j, kb, ql), 0, 0)),
        pl.BlockSpec((None, bk // g, hkv, d), lambda i, j, kb, ql: (i, blk(i, j, kb, ql), 0, 0)),
        pl.BlockSpec((None, bk // g, hkv, d), lambda i, j, kb, ql: (i, blk(i, j, kb, ql), 0, 0)),
        pl.BlockSpec((None, bk, hkv, d // p), lambda i, j, kb, ql: (i, blk(i, j, kb, ql), 0, 0)),
        pl.BlockSpec((None, bk, hkv, d // g), lambda i, j, kb, ql: (i, blk(i, j, kb, ql), 0, 0)),
        pl.BlockSpec((None, bk, hkv, d // g), lambda i, j, kb, ql: (i, blk(i, j, kb, ql), 0, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, hkv, p, gq, d // p), lambda i, j, kb, ql: (i, j, 0, 0, 0, 0)),
        pl.BlockSpec((None, None, hkv, gq, 1), lambda i, j, kb, ql: (i, j, 0, 0, 0)),
        pl.BlockSpec((None, None, hkv, gq, 1), lambda i, j, kb, ql: (i, j, 0, 0, 0)),
    ]
    f32 = jnp.float32
    out_shape = [jax.ShapeDtypeStruct((b, splits, hkv, p, gq, d // p), f32),
                 jax.ShapeDtypeStruct((b, splits, hkv, gq, 1), f32),
                 jax.ShapeDtypeStruct((b, splits, hkv, gq, 1), f32)]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, splits, nkb), in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=[pltpu.VMEM((hkv, p, gq, d // p), f32), pltpu.VMEM((hkv, gq, 1), f32),
                        pltpu.VMEM((hkv, gq, 1), f32), pltpu.VMEM((bk, d // p), jnp.int32),
                        pltpu.VMEM((bk, d // g), f32), pltpu.VMEM((bk, d // g), f32)])
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=spec.interpret,
        cost_estimate=_cost(q4, cache, dims, plan),
        name=f"kivi_decode_{dims.bits}bit",
    )(cache.quantized_lengths, q4, cache.k_codes, cache.k_scale, cache.k_zero,
      cache.v_codes, cache.v_scale, cache.v_zero)
    # [B, splits, Hkv, P, Gq, D/P]: channel c = c' * P + t  ->  [B, Hkv, splits, Gq, D].
    acc = jnp.transpose(acc, (0, 2, 1, 4, 5, 3)).reshape(b, hkv, splits, gq, d)
    m = jnp.transpose(m[..., 0], (0, 2, 1, 3))
    l = jnp.transpose(l[..., 0], (0, 2, 1, 3))
    return acc, m, l


# --------------------------------------------------------------------------
# Forward: kernel partials + residual partial, merged by log-sum-exp
# --------------------------------------------------------------------------
def _cost(q4, cache, dims: _Dims, plan: _Plan):
    leaves = [cache.k_codes, cache.k_scale, cache.k_zero, cache.v_codes, cache.v_scale,
              cache.v_zero, q4]
    nbytes = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves)
    h = dims.hkv * plan.gq
    nbytes += dims.b * dims.hkv * plan.splits * plan.gp * (dims.d + 2) * 4
    return pl.CostEstimate(flops=4 * dims.b * h * dims.s * dims.d,
                           transcendentals=dims.b * h * dims.s, bytes_accessed=nbytes)


def _residual_partial(qg, cache: KiviCache, sm_scale):
    """Unnormalized ``(acc, m, l)`` of the float residual window, ``[B, Hkv, Gq, ...]``."""
    hi = lax.Precision.HIGHEST
    r = cache.k_res.shape[1]
    s = jnp.einsum("bkgd,brkd->bkgr", qg, cache.k_res.astype(jnp.float32), precision=hi) * sm_scale
    valid = (jnp.arange(r)[None, :] < cache.residual_lengths[:, None])[:, None, None, :]
    s = jnp.where(valid, s, -jnp.inf)
    m = jnp.maximum(jnp.max(s, axis=-1), _NEG)
    pr = jnp.where(valid, jnp.exp(s - m[..., None]), 0.0)
    acc = jnp.einsum("bkgr,brkd->bkgd", pr, cache.v_res.astype(jnp.float32), precision=hi)
    return acc, m, jnp.sum(pr, axis=-1)


def _combine(acc, m, l):
    """Merge partials ``acc`` ``[..., n, Gq, D]``, ``m``/``l`` ``[..., n, Gq]`` over axis ``n``."""
    m_all = jnp.max(m, axis=-2, keepdims=True)
    w = jnp.exp(m - m_all)
    l_all = jnp.sum(l * w, axis=-2)
    acc_all = jnp.sum(acc * w[..., None], axis=-3)
    return jnp.where(l_all[..., None] > 0,
                     acc_all / jnp.where(l_all > 0, l_all, 1.0)[..., None], 0.0)


@functools.partial(jax.jit, static_argnums=0)
def _pallas_forward(spec: _Spec, q, cache: KiviCache):
    dims = _check_cache(cache)
    b, h, d = q.shape
    plan = _plan(spec, dims, h, jnp.dtype(q.dtype).itemsize)
    precision = precision_for(q.dtype)
    q4 = q.reshape(b, dims.hkv, plan.gq, d)
    if spec.kernel == "triton":
        if plan.gp > plan.gq:
            q4 = jnp.pad(q4, ((0, 0), (0, 0), (0, plan.gp - plan.gq), (0, 0)))
        acc, m, l = _triton_call(spec, dims, plan, q4, cache, precision)
    else:
        acc, m, l = _mosaic_call(spec, dims, plan, q4, cache, precision)
    qg = q.astype(jnp.float32).reshape(b, dims.hkv, plan.gq, d)
    r_acc, r_m, r_l = _residual_partial(qg, cache, spec.sm_scale)
    acc = jnp.concatenate([acc, r_acc[:, :, None]], axis=2)
    m = jnp.concatenate([m, r_m[:, :, None]], axis=2)
    l = jnp.concatenate([l, r_l[:, :, None]], axis=2)
    return _combine(acc, m, l).reshape(b, h, d).astype(q.dtype)


def _make_spec(block_sizes, backend, interpret, sm_scale) -> _Spec | None:
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}; "
            "pass block_sizes=BlockSizes(block_k=..., num_splits=...).")
    kernel, interp = pallas_lowering(backend, interpret)
    if kernel == "xla":
        return None
    return _Spec(kernel, interp, block_sizes, sm_scale)


def quantized_decode_attention(q, cache: KiviCache, *, scale: float | None = None,
                               block_sizes: BlockSizes | None = None, backend: str = "auto",
                               interpret: Any = None) -> jax.Array:
    """Single-token decode attention over a :class:`KiviCache`.

    Args:
      q: ``[B, H, D]`` queries in the cache's float dtype; ``H`` a multiple of
        the cache's ``Hkv`` (query head ``h`` reads KV head ``h // (H // Hkv)``).
      cache: a :class:`KiviCache` (:func:`kivi_quantize` / :func:`kivi_append`).
      scale: softmax scale, default ``1 / sqrt(D)``.
      block_sizes: a :class:`BlockSizes`, or None for
        ``BlockSizes.get_default(S, backend=...)``.
      backend: "auto" (triton on GPU, mosaic_tpu on TPU, xla on CPU), "triton",
        "mosaic_tpu", "interpret" (the Triton kernel in the HLO interpreter,
        any device) or "xla" (:func:`quantized_decode_attention_reference`).
      interpret: with "triton", True runs the kernel in the HLO interpreter;
        with "mosaic_tpu", True (or a ``pltpu.InterpretParams``) runs it in TPU
        interpret mode.  Ignored by "interpret" and "xla".

    Returns ``[B, H, D]`` in ``q.dtype``; a row with no valid token gives 0.
    Forward only (no gradient).
    """
    dims = _check_cache(cache)
    _check_q(q, dims, cache)
    sm_scale = 1.0 / math.sqrt(dims.d) if scale is None else float(scale)
    spec = _make_spec(block_sizes, backend, interpret, sm_scale)
    if spec is None:
        return _reference_impl(q, cache, sm_scale)
    _plan(spec, dims, q.shape[1], jnp.dtype(q.dtype).itemsize)  # block-size errors first
    return _pallas_forward(spec, q, cache)
