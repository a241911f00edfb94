"""Fused dequantize + matmul: ``y = x @ W`` where ``W`` is stored quantized.

The float weight is never written to HBM: each kernel loads a tile of the
integer codes (and its scales), dequantizes it in registers / VMEM and feeds it
straight into ``jnp.dot`` with float32 accumulation.  ``W`` is a Flax-style
kernel of shape ``[K, N]`` (K input features, N output features) and ``x`` is
``[..., K]`` in float32, bfloat16 or float16; the output has ``x.dtype``.

Weight formats (all quantized along K):

* **int8 per-channel** (the absmax/per-channel int8 of LLM.int8(), Dettmers et
  al. 2022, without its outlier decomposition): ``q`` int8 ``[K, N]`` and
  ``scale`` float32 ``[N]``; ``W = q * scale``.
* **int4 group-wise, packed** (as in GPTQ, Frantar et al. 2022, and AWQ, Lin et
  al. 2023): ``packed`` uint8 ``[K//2, N]``; byte ``[i, n]`` holds code
  ``(2i, n)`` in its low nibble and ``(2i+1, n)`` in its high nibble, codes are
  unsigned 0..15; ``scales`` and ``zeros`` float32 ``[K//g, N]`` with the zero
  point in the unsigned code domain:
  ``W[k, n] = (code[k, n] - zeros[k//g, n]) * scales[k//g, n]``.
  Symmetric int4 is the same with ``zeros = 8``.
* **NF4** (NormalFloat4 from QLoRA, Dettmers et al. 2023): codes packed like
  int4; ``absmax`` float32 ``[K//b, N]`` per block of ``b`` along K;
  ``W[k, n] = NF4_TABLE[code[k, n]] * absmax[k//b, n]``.  The kernels look the
  code up with a 15-select binary tree (no gather), so it lowers everywhere.

Backends (``backend=``):

* ``"triton"`` (GPU): grid over (M blocks, N blocks); each program loops over
  the K blocks with ``lax.fori_loop``, loading ``x[bm, bk]`` and the packed
  ``[bk//2, bn]`` codes, splitting the nibbles with shifts/ands and
  de-interleaving the matching even/odd columns of the ``x`` tile in registers
  (reshape + ``lax.unstack``), so ``y_tile += x_even @ W_even + x_odd @ W_odd``.
  Edge blocks along M and N use masked loads/stores (no padding, no copy of the
  weight).  K is never masked: ``block_k`` is reduced to the largest power of
  two dividing K; only if that falls below 32 (16 for int8) is K zero-padded.
  Triton tiles must be powers of two, so block sizes and the group size must
  be powers of two on this backend.
* ``"mosaic_tpu"`` (TPU): grid (M blocks, N blocks, K blocks) with K last and
  "arbitrary", accumulating into a float32 VMEM scratch that is zeroed on the
  first K step and written out (scaled, for int8) on the last.  Edge blocks
  along M and N are left to Pallas (out-of-range rows/columns only produce
  output rows/columns that are dropped).  K is not masked: if K <= block_k the
  whole K is one block, otherwise block_k is halved (staying lane-aligned)
  until it divides K, and only if none does is K zero-padded.  Lanes cannot be
  de-interleaved cheaply on TPU, so for the packed formats the wrapper splits
  ``x`` into its even and odd columns (one pass over the activations, never
  over the weight); scales are viewed as ``[K//bk, bk//g, N]`` so every block
  spans full trailing dims.
* ``"interpret"``: the Triton kernel body run with ``interpret=True`` (HLO
  interpreter) on any device; this is what the CPU tests exercise.
* ``"xla"``: the pure-JAX reference (dequantize, then ``jnp.dot``); this one
  *does* materialize ``W``.
* ``"auto"``: triton on GPU, mosaic_tpu on TPU, xla elsewhere.

``interpret=True`` with ``backend="triton"`` runs the Triton body in the HLO
interpreter; with ``backend="mosaic_tpu"`` it runs the Mosaic body in TPU
interpret mode (``pltpu.InterpretParams()``; pass an ``InterpretParams`` to
configure it).  A Mosaic kernel traced under ``pltpu.force_tpu_interpret_mode()``
is also interpreted.

Numerics: the dequantized tile is computed in float32 and cast to ``x.dtype``
before the dot (so bfloat16 ``x`` runs a bf16 x bf16 -> f32 MMA); float32 ``x``
uses ``Precision.HIGHEST`` (IEEE fp32 on Triton, not TF32).  For int8 the
per-channel scale factors out of the K sum and is applied once to the f32
accumulator.

Checked without accelerators: the kernels run interpreted on CPU against float64
references, and are compiled to machine code for an H100 (XLA:GPU, Triton, ptxas) and a
TPU v5e (XLA:TPU, Mosaic) on a CPU-only machine (``benchmarks/compile_report.py``,
``tests/targets``; :mod:`memlab.targets`).  Speed is only measured on a real device.

Zero padding along K is safe for every format: padded ``x`` columns are zero,
so whatever the padded codes, zero points or scales dequantize to (all finite,
they are padded with zeros) contributes nothing.

Gradients: every public matmul is a ``jax.custom_vjp``.  ``dx = dy @ W^T`` is
computed by dequantizing with the reference (XLA; this materializes ``W`` in
the backward pass only).  The integer data get no cotangent, and the scales /
zero points / absmax get a **zero** gradient on the Pallas backends (they are
treated as constants).  ``backend="xla"`` is plain JAX and differentiates the
float inputs (scales included) normally.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._common import (
    KERNEL_FLOAT_DTYPES,
    TRITON_SMEM_BYTES,
    cdiv,
    check_on_chip,
    dot,
    is_concrete,
    is_power_of_2,
    load,
    lowest_power_of_2_factor,
    next_power_of_2,
    pallas_lowering,
    precision_for,
    round_up,
    store,
)
from ._packing import code_planes, pack_bits, unpack_bits

__all__ = [
    "NF4_TABLE",
    "BlockSizes",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_nf4",
    "int4_matmul",
    "int4_matmul_reference",
    "int8_matmul",
    "int8_matmul_reference",
    "nf4_matmul",
    "nf4_matmul_reference",
    "pack_int4",
    "unpack_int4",
]

# The 16 NormalFloat4 levels of QLoRA (Dettmers et al. 2023, appendix E).
NF4_TABLE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


# --------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the fused dequant-matmul kernels.

    ``block_m`` rows of ``x``, ``block_n`` output features and ``block_k``
    input features per step.  For the packed formats (int4, NF4) ``block_k``
    must be even and a multiple of the group/block size.  The triton backend
    needs powers of two; mosaic_tpu needs ``block_n % 128 == 0``,
    ``block_m % 8 == 0`` (16 for 16-bit ``x``) and ``block_k % 128 == 0``
    (256 for packed formats) whenever the dimension is larger than the block.
    Blocks larger than the problem are shrunk automatically.
    """
    block_m: int = 128
    block_n: int = 128
    block_k: int = 256

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(
                    f"BlockSizes.{name}={v!r} must be a positive int; "
                    f"pass e.g. BlockSizes({name}=128).")

    @classmethod
    def get_default(cls, m: int, *, backend: str = "triton") -> BlockSizes:
        """Defaults for ``m`` rows of ``x``: decode (``m <= 16``) or prefill.

        Decode is a memory-bound GEMV: a short M tile, narrower N tiles on
        GPU (more programs to fill the SMs) and long K steps.  Prefill uses
        square 128x128 output tiles; on GPU with ``block_k=128`` so that three
        pipeline stages of the x and code tiles fit in shared memory.
        """
        if m <= 16:
            if backend == "mosaic_tpu":
                return cls(block_m=16, block_n=256, block_k=512)
            return cls(block_m=16, block_n=64, block_k=256)
        if backend == "mosaic_tpu":
            return cls(block_m=128, block_n=128, block_k=256)
        return cls(block_m=128, block_n=128, block_k=128)


# --------------------------------------------------------------------------
# Pure-JAX helpers and references
# --------------------------------------------------------------------------
def pack_int4(codes) -> jax.Array:
    """Pack unsigned 4-bit codes ``[K, N]`` (values 0..15) into uint8 ``[K//2, N]``.

    Byte ``[i, n]`` = ``codes[2i, n] | codes[2i+1, n] << 4``: the shared layout of
    :func:`memlab_kernels._packing.pack_bits` (4 bits along axis 0).
    """
    codes = jnp.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D [K, N], got shape {codes.shape}.")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise TypeError(
            f"codes must be an integer array (uint8 values 0..15), got {codes.dtype}; "
            "round and cast with .astype(jnp.uint8) first.")
    if codes.shape[0] % 2:
        raise ValueError(
            f"codes has K={codes.shape[0]} rows; K must be even to pack two "
            "4-bit codes per byte (pad K by one zero row).")
    if is_concrete(codes) and codes.size:
        host = np.asarray(codes)
        lo_v, hi_v = int(host.min()), int(host.max())
        if lo_v < 0 or hi_v > 15:
            raise ValueError(
                f"codes must lie in 0..15, got values in [{lo_v}, {hi_v}]; "
                "clip to the unsigned 4-bit range before packing.")
    return _pack_int4(codes)


@jax.jit
def _pack_int4(codes):
    return pack_bits(codes, 4, axis=0)


def unpack_int4(packed) -> jax.Array:
    """Inverse of :func:`pack_int4`: uint8 ``[K//2, N]`` -> uint8 codes ``[K, N]``."""
    packed = jnp.asarray(packed)
    _check_dtype("packed", packed, jnp.uint8, "pack the codes with pack_int4")
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D [K//2, N], got shape {packed.shape}.")
    return _unpack_int4(packed)


@jax.jit
def _unpack_int4(packed):
    return unpack_bits(packed, 4, axis=0)


def dequantize_int8(q, scale) -> jax.Array:
    """int8 per-channel: ``W = q * scale`` as float32 ``[K, N]``."""
    _check_int8_weight(q, scale)
    return q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)[None, :]


def dequantize_int4(packed, scales, zeros, *, group_size: int) -> jax.Array:
    """Group-wise int4 (GPTQ/AWQ): ``W = (code - zeros) * scales`` as float32 ``[K, N]``."""
    _check_packed_weight("int4", packed, {"scales": scales, "zeros": zeros},
                         group_size, "group_size")
    codes = unpack_int4(packed).astype(jnp.float32)
    s = jnp.repeat(jnp.asarray(scales, jnp.float32), group_size, axis=0)
    z = jnp.repeat(jnp.asarray(zeros, jnp.float32), group_size, axis=0)
    return (codes - z) * s


def dequantize_nf4(packed, absmax, *, block_size: int) -> jax.Array:
    """QLoRA NF4: ``W = NF4_TABLE[code] * absmax`` as float32 ``[K, N]``."""
    _check_packed_weight("nf4", packed, {"absmax": absmax}, block_size, "block_size")
    codes = unpack_int4(packed).astype(jnp.int32)
    levels = jnp.asarray(NF4_TABLE, jnp.float32)[codes]
    return levels * jnp.repeat(jnp.asarray(absmax, jnp.float32), block_size, axis=0)


def _reference_dot(x, w_f32):
    """``x @ W`` with ``W`` cast to ``x.dtype`` and float32 accumulation."""
    y = jnp.dot(x, w_f32.astype(x.dtype), preferred_element_type=jnp.float32,
                precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def int8_matmul_reference(x, q, scale) -> jax.Array:
    """Pure-JAX ``x @ dequantize_int8(q, scale)`` (materializes W)."""
    w = dequantize_int8(q, scale)
    _check_x(x, w.shape[0], "q", 1)
    return _reference_dot(x, w)


def int4_matmul_reference(x, packed, scales, zeros, *, group_size: int) -> jax.Array:
    """Pure-JAX ``x @ dequantize_int4(...)`` (materializes W)."""
    w = dequantize_int4(packed, scales, zeros, group_size=group_size)
    _check_x(x, w.shape[0], "packed", 2)
    return _reference_dot(x, w)


def nf4_matmul_reference(x, packed, absmax, *, block_size: int) -> jax.Array:
    """Pure-JAX ``x @ dequantize_nf4(...)`` (materializes W)."""
    w = dequantize_nf4(packed, absmax, block_size=block_size)
    _check_x(x, w.shape[0], "packed", 2)
    return _reference_dot(x, w)


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------
def _check_dtype(name, a, dtype, fix):
    if jnp.dtype(a.dtype) != jnp.dtype(dtype):
        raise TypeError(f"{name} must be {jnp.dtype(dtype).name}, got {a.dtype}; {fix}.")


def _check_float(name, a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be a float array (float32), got {a.dtype}; "
            f"cast with {name}.astype(jnp.float32).")


def _check_x(x, k, wname="q", per_row=1):
    if not hasattr(x, "dtype") or jnp.dtype(x.dtype) not in KERNEL_FLOAT_DTYPES:
        raise TypeError(
            f"x must be float32, bfloat16 or float16, got "
            f"{getattr(x, 'dtype', type(x))}; cast x with x.astype(jnp.float32).")
    if x.ndim < 1:
        raise ValueError("x must have at least one dimension [..., K], got a scalar.")
    if k is not None and x.shape[-1] != k:
        rows = f"{wname}.shape[0]={k // per_row}" + (f" (K = 2 * {k // per_row} = {k})"
                                                     if per_row == 2 else "")
        raise ValueError(
            f"shape mismatch: x has K={x.shape[-1]} features (x.shape={tuple(x.shape)}) "
            f"but the weight has {rows}; x must be [..., K] with the weight "
            f"{'[K//2, N]' if per_row == 2 else '[K, N]'}.")


def _check_int8_weight(q, scale):
    _check_dtype("q", q, jnp.int8, "quantize to int8 (e.g. jnp.round(w / scale).astype(jnp.int8))")
    if q.ndim != 2:
        raise ValueError(f"q must be 2-D [K, N], got shape {q.shape}.")
    _check_float("scale", scale)
    if tuple(scale.shape) != (q.shape[1],):
        raise ValueError(
            f"scale must have shape (N,) = ({q.shape[1]},) for q of shape {q.shape} "
            f"(one scale per output channel), got {tuple(scale.shape)}.")


def _check_group(name, g, k):
    if isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g <= 0:
        raise ValueError(f"{name}={g!r} must be a positive int (e.g. {name}=64).")
    if g % 2:
        raise ValueError(
            f"{name}={g} must be even: two 4-bit codes share a byte and must share "
            f"a {name.split('_')[0]}; use an even {name} such as 32, 64 or 128.")
    if k % g:
        raise ValueError(
            f"{name}={g} does not divide K={k}; pick a {name} that divides K "
            f"(e.g. {math.gcd(k, 64) if math.gcd(k, 64) % 2 == 0 else 2}), or pad K.")


def _check_packed_weight(fmt, packed, aux: dict, g, gname):
    _check_dtype("packed", packed, jnp.uint8,
                 "pack the 4-bit codes two per byte with pack_int4(codes)")
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D [K//2, N], got shape {packed.shape}.")
    k = 2 * packed.shape[0]
    n = packed.shape[1]
    _check_group(gname, g, k)
    for name, a in aux.items():
        _check_float(name, a)
        want = (k // g, n)
        if tuple(a.shape) != want:
            raise ValueError(
                f"{name} must have shape (K//{gname}, N) = {want} for packed of shape "
                f"{tuple(packed.shape)} (K={k}) and {gname}={g}, got {tuple(a.shape)}; "
                f"check {gname} or transpose {name} to [K//{gname}, N].")


# --------------------------------------------------------------------------
# Kernel bodies (shared tile math)
# --------------------------------------------------------------------------
def _expand_rows(s, reps):
    """``[G, bn]`` -> ``[G*reps, bn]``, each row repeated ``reps`` times."""
    g, bn = s.shape
    if g == 1:
        return jnp.broadcast_to(s, (reps, bn))
    return jnp.broadcast_to(s[:, None, :], (g, reps, bn)).reshape(g * reps, bn)


def _nf4_lookup(code):
    """NF4_TABLE[code] for an int32 tile, as a binary tree of 15 selects."""
    bits = [(code & b) != 0 for b in (1, 2, 4, 8)]

    def tree(lo, size, level):
        if size == 2:
            return jnp.where(bits[0], np.float32(NF4_TABLE[lo + 1]), np.float32(NF4_TABLE[lo]))
        half = size // 2
        return jnp.where(bits[level], tree(lo + half, half, level - 1),
                         tree(lo, half, level - 1))

    return tree(0, 16, 3)


def _dequant_half(fmt, code, aux, half_group):
    """Dequantize one nibble plane ``[bk//2, bn]`` to float32."""
    if fmt == "int4":
        s, z = aux
        return (code.astype(jnp.float32) - _expand_rows(z, half_group)) * _expand_rows(s, half_group)
    (a,) = aux
    return _nf4_lookup(code) * _expand_rows(a, half_group)


def _dequant_packed(fmt, p, aux, half_group, cdtype):
    lo, hi = code_planes(p, 4)       # codes of the even / odd rows of the tile
    w_even = _dequant_half(fmt, lo, aux, half_group).astype(cdtype)
    w_odd = _dequant_half(fmt, hi, aux, half_group).astype(cdtype)
    return w_even, w_odd


def _int8_to(q, cdtype):
    return q.astype(jnp.int32).astype(jnp.float32).astype(cdtype)


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static (hashable) configuration of one public call."""
    fmt: str                      # "int8" | "int4" | "nf4"
    group: int                    # group/block size along K; 0 for int8
    block_sizes: BlockSizes | None
    kernel: str                   # "triton" | "mosaic"
    interpret: Any                # False | True | pltpu.InterpretParams


@dataclasses.dataclass(frozen=True)
class _Plan:
    m: int
    n: int
    k: int
    k_pad: int
    bm: int
    bn: int
    bk: int


def _block_k_for_format(spec: _Spec, block_k: int, user: bool, align: int) -> int:
    """Validate (user) or adjust (default) block_k for the quantization unit."""
    if spec.fmt == "int8":
        return block_k
    g = spec.group
    gname = "block_size" if spec.fmt == "nf4" else "group_size"
    unit = math.lcm(g, 2, align)
    if user:
        if block_k % 2:
            raise ValueError(
                f"block_sizes.block_k={block_k} must be even for packed 4-bit weights "
                "(two codes per byte); use e.g. block_k=256.")
        if block_k % g:
            raise ValueError(
                f"block_sizes.block_k={block_k} must be a multiple of {gname}={g} so "
                f"every K block holds whole groups; use block_k={round_up(block_k, g)}.")
        return block_k
    return round_up(block_k, unit)


def triton_smem_bytes(fmt: str, bm: int, bn: int, bk: int, group: int, x_itemsize: int,
                      n_aux: int) -> tuple[int, int]:
    """``(bytes per pipeline stage, the dequantized tile's bytes)`` of a Triton program: a
    stage holds the ``[bm, bk]`` activations, the ``[bk (/2), bn]`` codes and their scales;
    the ``[bk, bn]`` dequantized weight tile is staged once for the dot."""
    w_rows = bk if fmt == "int8" else bk // 2
    per_stage = (bm * bk * x_itemsize + w_rows * bn
                 + (0 if fmt == "int8" else 4 * n_aux * (bk // group) * bn))
    return per_stage, bk * bn * x_itemsize


def _plan_triton(spec: _Spec, m: int, k: int, n: int) -> _Plan:
    user = spec.block_sizes is not None
    bs = spec.block_sizes or BlockSizes.get_default(m, backend="triton")
    packed = spec.fmt != "int8"
    if packed and not is_power_of_2(spec.group):
        gname = "block_size" if spec.fmt == "nf4" else "group_size"
        raise ValueError(
            f"{gname}={spec.group} must be a power of two on the triton/interpret "
            "backends (Triton tiles have power-of-two sizes); use a power-of-two "
            f"{gname} or backend='xla'/'mosaic_tpu'.")
    for name in ("block_m", "block_n", "block_k"):
        v = getattr(bs, name)
        if not is_power_of_2(v):
            raise ValueError(
                f"block_sizes.{name}={v} must be a power of two on the triton/interpret "
                f"backends; use {name}={next_power_of_2(v)}.")
    block_k = _block_k_for_format(spec, bs.block_k, user, 1)
    min_bk = 32 if packed else 16   # tl.dot needs a contraction of >= 16.
    if block_k < min_bk:
        raise ValueError(
            f"block_sizes.block_k={block_k} is too small for tl.dot on the triton "
            f"backend; use block_k >= {min_bk}.")
    bm = min(bs.block_m, max(16, next_power_of_2(m)))
    bn = min(bs.block_n, max(16, next_power_of_2(n)))
    bk = min(block_k, lowest_power_of_2_factor(k))
    if bk < min_bk:   # K has a small power-of-two factor: pad K rather than crawl.
        bk = min(block_k, max(min_bk, next_power_of_2(k)))
    return _Plan(m, n, k, round_up(k, bk), bm, bn, bk)


def _plan_mosaic(spec: _Spec, m: int, k: int, n: int, x_dtype) -> _Plan:
    user = spec.block_sizes is not None
    bs = spec.block_sizes or BlockSizes.get_default(m, backend="mosaic_tpu")
    packed = spec.fmt != "int8"
    lane_k = 256 if packed else 128    # x (or its even/odd halves) has K on lanes.
    sub_m = 8 if jnp.dtype(x_dtype).itemsize == 4 else 16
    if m <= bs.block_m:
        bm = m
    else:
        if bs.block_m % sub_m:
            raise ValueError(
                f"block_sizes.block_m={bs.block_m} must be a multiple of {sub_m} on "
                f"mosaic_tpu for {jnp.dtype(x_dtype).name} x; use "
                f"block_m={round_up(bs.block_m, sub_m)}.")
        bm = bs.block_m
    if n <= bs.block_n:
        bn = n
    else:
        if bs.block_n % 128:
            raise ValueError(
                f"block_sizes.block_n={bs.block_n} must be a multiple of 128 on "
                f"mosaic_tpu (N is the lane dimension); use block_n={round_up(bs.block_n, 128)}.")
        bn = bs.block_n
    block_k = _block_k_for_format(spec, bs.block_k, user, lane_k)
    unit = spec.group if packed else 1
    if k <= block_k:
        bk = k
    else:
        if block_k % lane_k:
            raise ValueError(
                f"block_sizes.block_k={block_k} must be a multiple of {lane_k} on "
                f"mosaic_tpu{' for packed 4-bit formats (x is split into even/odd halves of block_k//2 lanes)' if packed else ''}; "
                f"use block_k={round_up(block_k, math.lcm(lane_k, unit))}.")
        bk = block_k
        while k % bk and (bk // 2) % lane_k == 0 and (bk // 2) % unit == 0:
            bk //= 2
        if k % bk:
            bk = block_k
    return _Plan(m, n, k, round_up(k, bk), bm, bn, bk)


# --------------------------------------------------------------------------
# Triton kernel (also the "interpret" backend)
# --------------------------------------------------------------------------
def _triton_kernel(x_ref, w_ref, *refs, fmt, plan: _Plan, group, precision):
    *aux_refs, o_ref = refs
    bm, bn, bk = plan.bm, plan.bn, plan.bk
    cdtype = x_ref.dtype
    i, j = pl.program_id(0), pl.program_id(1)
    row_ok = (i * bm + jnp.arange(bm) < plan.m)[:, None] if plan.m % bm else None
    col_ok = (j * bn + jnp.arange(bn) < plan.n)[None, :] if plan.n % bn else None

    def rows_mask(cols):
        return None if row_ok is None else jnp.broadcast_to(row_ok, (bm, cols))

    def cols_mask(rows):
        return None if col_ok is None else jnp.broadcast_to(col_ok, (rows, bn))

    def body(kb, acc):
        xt = load(x_ref.at[:, pl.ds(kb * bk, bk)], rows_mask(bk))
        if fmt == "int8":
            q = load(w_ref.at[pl.ds(kb * bk, bk), :], cols_mask(bk))
            return acc + dot(xt, _int8_to(q, cdtype), precision)
        hk, gpb = bk // 2, bk // group
        # Columns 2i / 2i+1 of the x tile meet the low / high nibbles of row i.
        x_even, x_odd = lax.unstack(xt.reshape(bm, hk, 2), axis=2)
        p = load(w_ref.at[pl.ds(kb * hk, hk), :], cols_mask(hk))
        aux = [load(r.at[pl.ds(kb * gpb, gpb), :], cols_mask(gpb)) for r in aux_refs]
        w_even, w_odd = _dequant_packed(fmt, p, aux, group // 2, cdtype)
        return acc + dot(x_even, w_even, precision) + dot(x_odd, w_odd, precision)

    acc = lax.fori_loop(0, plan.k_pad // bk, body, jnp.zeros((bm, bn), jnp.float32))
    if fmt == "int8":   # per-output-channel scale factors out of the K sum.
        acc = acc * load(aux_refs[0], cols_mask(1))
    out = acc.astype(o_ref.dtype)
    if row_ok is None and col_ok is None:
        o_ref[...] = out
    else:
        mask = jnp.ones((bm, bn), jnp.bool_)
        if row_ok is not None:
            mask = mask & row_ok
        if col_ok is not None:
            mask = mask & col_ok
        store(o_ref, out, mask)


def _triton_call(spec: _Spec, plan: _Plan, x, w, aux, precision):
    m, n, kp = plan.m, plan.n, plan.k_pad
    bm, bn = plan.bm, plan.bn
    if spec.fmt == "int8":
        w_spec = pl.BlockSpec((kp, bn), lambda i, j: (0, j))
        aux_specs = [pl.BlockSpec((1, bn), lambda i, j: (0, j))]
    else:
        w_spec = pl.BlockSpec((kp // 2, bn), lambda i, j: (0, j))
        aux_specs = [pl.BlockSpec((kp // spec.group, bn), lambda i, j: (0, j)) for _ in aux]
    kernel = functools.partial(_triton_kernel, fmt=spec.fmt, plan=plan,
                               group=spec.group, precision=precision)
    num_warps = 8 if bm * bn >= 128 * 128 else 4
    # Software-pipeline as many K steps as fit the shared memory left beside the
    # dequantized [bk, bn] weight tile the dot reads (staged once, in x's dtype).
    per_stage, deq = triton_smem_bytes(spec.fmt, bm, bn, plan.bk, spec.group, x.dtype.itemsize,
                                       len(aux))
    num_stages = max(1, min(3, (TRITON_SMEM_BYTES - deq) // per_stage))
    check_on_chip(f"dequant_matmul_{spec.fmt}", deq + num_stages * per_stage, TRITON_SMEM_BYTES,
                  "shared memory", f"lower block_sizes.block_n={bn} or block_k={plan.bk}")
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(cdiv(m, bm), cdiv(n, bn)),
        in_specs=[pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), w_spec, *aux_specs],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=spec.interpret,
        cost_estimate=_cost(x, w, aux, m, n, plan.k),
        name=f"dequant_matmul_{spec.fmt}",
    )(x, w, *aux)


# --------------------------------------------------------------------------
# Mosaic TPU kernel
# --------------------------------------------------------------------------
def _mosaic_kernel(*refs, fmt, group, n_k, precision):
    *in_refs, o_ref, acc_ref = refs
    kb = pl.program_id(2)

    @pl.when(kb == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    if fmt == "int8":
        x_ref, q_ref, s_ref = in_refs
        acc_ref[...] += dot(x_ref[...], _int8_to(q_ref[...], x_ref.dtype), precision)
    else:
        xe_ref, xo_ref, p_ref, *aux_refs = in_refs
        aux = [r[...] for r in aux_refs]
        w_even, w_odd = _dequant_packed(fmt, p_ref[...], aux, group // 2, xe_ref.dtype)
        acc_ref[...] += (dot(xe_ref[...], w_even, precision)
                         + dot(xo_ref[...], w_odd, precision))

    @pl.when(kb == n_k - 1)
    def _finish():
        acc = acc_ref[...]
        if fmt == "int8":
            acc = acc * s_ref[...]
        o_ref[...] = acc.astype(o_ref.dtype)


def _mosaic_call(spec: _Spec, plan: _Plan, x, w, aux, precision):
    m, n, kp = plan.m, plan.n, plan.k_pad
    bm, bn, bk = plan.bm, plan.bn, plan.bk
    n_k = kp // bk
    grid = (cdiv(m, bm), cdiv(n, bn), n_k)
    if spec.fmt == "int8":
        args = (x, w, *aux)
        in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
                    pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
                    pl.BlockSpec((1, bn), lambda i, j, k: (0, j))]
    else:
        hk, gpb = bk // 2, bk // spec.group
        # Even / odd input features; packed row i holds features 2i and 2i+1.
        x_even, x_odd = x[:, 0::2], x[:, 1::2]
        # [K//g, N] -> [K//bk, bk//g, N]: each block spans full trailing dims.
        aux3 = [a.reshape(n_k, gpb, n) for a in aux]
        args = (x_even, x_odd, w, *aux3)
        x_spec = pl.BlockSpec((bm, hk), lambda i, j, k: (i, k))
        in_specs = [x_spec, x_spec,
                    pl.BlockSpec((hk, bn), lambda i, j, k: (k, j)),
                    *[pl.BlockSpec((pl.squeezed, gpb, bn), lambda i, j, k: (k, 0, j))
                      for _ in aux3]]
    kernel = functools.partial(_mosaic_kernel, fmt=spec.fmt, group=spec.group,
                               n_k=n_k, precision=precision)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=spec.interpret,
        cost_estimate=_cost(x, w, aux, m, n, plan.k),
        name=f"dequant_matmul_{spec.fmt}",
    )(*args)


# --------------------------------------------------------------------------
# Forward / custom VJP
# --------------------------------------------------------------------------
def _cost(x, w, aux, m, n, k):
    nbytes = sum(int(a.size) * a.dtype.itemsize for a in (x, w, *aux))
    nbytes += m * n * x.dtype.itemsize
    return pl.CostEstimate(flops=2 * m * n * k, transcendentals=0, bytes_accessed=nbytes)


def _pad_k(spec: _Spec, plan: _Plan, x, w, aux):
    extra = plan.k_pad - plan.k
    if not extra:
        return x, w, aux
    x = jnp.pad(x, ((0, 0), (0, extra)))
    if spec.fmt == "int8":
        return x, jnp.pad(w, ((0, extra), (0, 0))), aux
    w = jnp.pad(w, ((0, extra // 2), (0, 0)))
    aux = tuple(jnp.pad(a, ((0, extra // spec.group), (0, 0))) for a in aux)
    return x, w, aux


@functools.partial(jax.jit, static_argnums=0)
def _pallas_forward(spec: _Spec, x, w, *aux):
    m, k = x.shape
    n = w.shape[1]
    if m == 0:
        return jnp.zeros((0, n), x.dtype)
    precision = precision_for(x.dtype)
    if spec.fmt == "int8":
        aux = (aux[0].reshape(1, n),)
    if spec.kernel == "triton":
        plan = _plan_triton(spec, m, k, n)
        call = _triton_call
    else:
        plan = _plan_mosaic(spec, m, k, n, x.dtype)
        call = _mosaic_call
    x, w, aux = _pad_k(spec, plan, x, w, aux)
    return call(spec, plan, x, w, tuple(aux), precision)


def _dequantize(spec: _Spec, w, aux):
    if spec.fmt == "int8":
        return dequantize_int8(w, aux[0])
    if spec.fmt == "int4":
        return dequantize_int4(w, aux[0], aux[1], group_size=spec.group)
    return dequantize_nf4(w, aux[0], block_size=spec.group)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qmatmul(spec: _Spec, x, w, *aux):
    return _pallas_forward(spec, x, w, *aux)


def _qmatmul_fwd(spec, x, w, *aux):
    return _pallas_forward(spec, x, w, *aux), (w, aux)


def _qmatmul_bwd(spec, res, dy):
    w, aux = res
    wf = _dequantize(spec, w, aux)     # [K, N] float32, backward pass only.
    dx = jnp.dot(dy, wf.astype(dy.dtype).T, preferred_element_type=jnp.float32,
                 precision=lax.Precision.HIGHEST).astype(dy.dtype)
    # Integer codes: no cotangent; scales / zero points / absmax: zero.
    return (dx, None, *(None for _ in aux))


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _make_spec(fmt, group, block_sizes, backend, interpret) -> _Spec | None:
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(
            f"block_sizes must be a BlockSizes or None, got {type(block_sizes).__name__}; "
            "pass block_sizes=BlockSizes(block_m=..., block_n=..., block_k=...).")
    kernel, interp = pallas_lowering(backend, interpret)
    if kernel == "xla":
        return None
    return _Spec(fmt, group, block_sizes, kernel, interp)


def _run(spec, x, w, aux, reference):
    if spec is None:
        return reference()
    n = w.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    aux = tuple(jnp.asarray(a, jnp.float32) for a in aux)
    return _qmatmul(spec, x2, w, *aux).reshape(*lead, n)


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
_API_DOC = """
    block_sizes: a :class:`BlockSizes`, or None for
      ``BlockSizes.get_default(M, backend=...)`` (decode vs prefill).
    backend: "auto" (triton on GPU, mosaic_tpu on TPU, xla on CPU), "triton",
      "mosaic_tpu", "interpret" (the Triton kernel in the HLO interpreter, any
      device) or "xla" (the pure-JAX reference).
    interpret: with "triton", True runs the kernel in the HLO interpreter;
      with "mosaic_tpu", True (or a ``pltpu.InterpretParams``) runs it in TPU
      interpret mode.  Ignored by "interpret" and "xla".

    Returns ``[..., N]`` in ``x.dtype``, accumulated in float32.  Differentiable
    w.r.t. ``x`` (custom VJP, ``dx = dy @ W^T``); the quantized data and, on
    the Pallas backends, the scales get no gradient.
"""


def int8_matmul(x, q, scale, *, block_sizes: BlockSizes | None = None,
                backend: str = "auto", interpret: Any = None) -> jax.Array:
    """``x @ (q * scale)`` with int8 per-channel weights (LLM.int8()-style absmax).

    Args:
      x: ``[..., K]`` float32 / bfloat16 / float16 activations.
      q: int8 ``[K, N]`` codes.
      scale: float32 ``[N]``, one scale per output channel.
    """
    x = jnp.asarray(x)
    _check_int8_weight(q, scale)
    _check_x(x, q.shape[0], "q", 1)
    spec = _make_spec("int8", 0, block_sizes, backend, interpret)
    return _run(spec, x, q, (scale,), lambda: int8_matmul_reference(x, q, scale))


def int4_matmul(x, packed, scales, zeros, *, group_size: int,
                block_sizes: BlockSizes | None = None, backend: str = "auto",
                interpret: Any = None) -> jax.Array:
    """``x @ W`` with group-wise asymmetric int4 weights (GPTQ / AWQ layout).

    ``W[k, n] = (code[k, n] - zeros[k//g, n]) * scales[k//g, n]``.

    Args:
      x: ``[..., K]`` float32 / bfloat16 / float16 activations.
      packed: uint8 ``[K//2, N]``, see :func:`pack_int4`.
      scales, zeros: float32 ``[K//group_size, N]``; zero points in the
        unsigned code domain (8 for symmetric int4).
      group_size: even, divides K (a power of two on triton).
    """
    x = jnp.asarray(x)
    _check_packed_weight("int4", packed, {"scales": scales, "zeros": zeros},
                         group_size, "group_size")
    _check_x(x, 2 * packed.shape[0], "packed", 2)
    spec = _make_spec("int4", int(group_size), block_sizes, backend, interpret)
    return _run(spec, x, packed, (scales, zeros),
                lambda: int4_matmul_reference(x, packed, scales, zeros, group_size=group_size))


def nf4_matmul(x, packed, absmax, *, block_size: int,
               block_sizes: BlockSizes | None = None, backend: str = "auto",
               interpret: Any = None) -> jax.Array:
    """``x @ W`` with QLoRA NF4 weights: ``W[k, n] = NF4_TABLE[code] * absmax[k//b, n]``.

    Args:
      x: ``[..., K]`` float32 / bfloat16 / float16 activations.
      packed: uint8 ``[K//2, N]`` NF4 codes, packed like int4.
      absmax: float32 ``[K//block_size, N]``.
      block_size: quantization block along K; even, divides K.
    """
    x = jnp.asarray(x)
    _check_packed_weight("nf4", packed, {"absmax": absmax}, block_size, "block_size")
    _check_x(x, 2 * packed.shape[0], "packed", 2)
    spec = _make_spec("nf4", int(block_size), block_sizes, backend, interpret)
    return _run(spec, x, packed, (absmax,),
                lambda: nf4_matmul_reference(x, packed, absmax, block_size=block_size))


for _f in (int8_matmul, int4_matmul, nf4_matmul):
    _f.__doc__ = (_f.__doc__.rstrip() + "\n" + _API_DOC)
del _f
