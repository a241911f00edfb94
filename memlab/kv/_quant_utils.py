"""Private helpers shared by the low-rank / quantized KV policies (GEAR, Palu).

* :func:`pack` / :func:`unpack`: ``bits``-bit codes packed ``8 // bits`` to a
  uint8 along one axis, first code in the least significant bits -- memlab's one
  packing (:func:`memlab_kernels._packing.pack_bits`, which the KIVI kernel
  reads), with the axis before the width.
* :func:`minmax_quantize`: asymmetric uniform min/max quantization with an
  optional mask of entries that neither set the range nor matter (outliers held
  elsewhere, padding).  The scale and zero are rounded to their storage dtype
  *before* the codes are computed, so ``code * scale + zero`` with the stored
  values is exactly what the codes were fitted to.
* :func:`top_subspace`: the top-``r`` right singular vectors of a batch of
  ``[N, D]`` matrices, from ``eigh`` of the ``[D, D]`` Gram matrix: static
  shapes, jit-able on every backend, cheap because ``D`` (a head dim or a few)
  is small.  Equals the truncated SVD's ``V_r^T`` (up to signs and float
  error); squaring the singular values only loses accuracy in the *smallest*
  components, which the truncation drops anyway.
* :func:`channel_onehot`: ``[..., c]`` channel indices -> ``[..., c, D]`` one-hot,
  for gathering / overwriting a few entries per row without scatters.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from memlab_kernels._packing import pack_bits, unpack_bits

__all__ = ["pack", "unpack", "minmax_quantize", "dequantize", "top_subspace", "channel_onehot",
           "index_dtype", "QUANT_BITS"]

QUANT_BITS = (2, 4, 8)
_HI = jax.lax.Precision.HIGHEST


def pack(codes, axis: int, bits: int):
    """uint8 codes ``< 2**bits`` -> bytes, ``8 // bits`` consecutive codes along ``axis`` per byte."""
    return pack_bits(codes, bits, axis)


def unpack(packed, axis: int, bits: int):
    """Inverse of :func:`pack`."""
    return unpack_bits(packed, bits, axis)


def index_dtype(d: int):
    """The smallest unsigned dtype indexing ``d`` channels (uint8 up to 256, else int16/int32)."""
    if d <= 256:
        return jnp.uint8
    return jnp.int16 if d <= 2**15 else jnp.int32


def minmax_quantize(x, axis, bits: int, scale_dtype, exclude=None):
    """Quantize float32 ``x`` with one (scale, zero) per slice along ``axis``.

    ``exclude`` (bool, broadcastable to ``x``): entries ignored when computing
    the range (their codes are clipped and meaningless).  A slice with every
    entry excluded gets scale 0 and zero 0.  Returns ``(codes uint8 like x,
    scale, zero)`` with ``axis`` squeezed from the statistics.
    """
    levels = 2 ** bits - 1
    if exclude is None:
        mn = jnp.min(x, axis=axis, keepdims=True)
        mx = jnp.max(x, axis=axis, keepdims=True)
    else:
        mn = jnp.min(jnp.where(exclude, jnp.inf, x), axis=axis, keepdims=True)
        mx = jnp.max(jnp.where(exclude, -jnp.inf, x), axis=axis, keepdims=True)
        empty = ~jnp.isfinite(mn)
        mn = jnp.where(empty, 0.0, mn)
        mx = jnp.where(empty, 0.0, mx)
    scale = ((mx - mn) * np.float32(1.0 / levels)).astype(scale_dtype)
    zero = mn.astype(scale_dtype)
    s32, z32 = scale.astype(jnp.float32), zero.astype(jnp.float32)
    inv = jnp.where(s32 > 0, np.float32(1.0) / jnp.where(s32 > 0, s32, np.float32(1.0)),
                    np.float32(0.0))
    code = jnp.clip(jnp.round((x - z32) * inv), 0, levels).astype(jnp.uint8)
    return code, jnp.squeeze(scale, axis), jnp.squeeze(zero, axis)


def dequantize(codes, scale, zero):
    """``codes * scale + zero`` in float32 (scale and zero already broadcast to ``codes``)."""
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def top_subspace(e, r: int):
    """Orthonormal rows ``[..., r, D]`` spanning the top-``r`` right singular space of ``e [..., N, D]``.

    ``e @ basis^T @ basis`` is then the best rank-``r`` approximation of ``e``
    (Eckart-Young); ``eigh`` returns eigenvalues ascending, so the last ``r``
    eigenvectors, largest first.
    """
    e = e.astype(jnp.float32)
    gram = jnp.einsum("...nd,...ne->...de", e, e, precision=_HI)
    _, vecs = jnp.linalg.eigh(gram)
    top = vecs[..., ::-1][..., :r]                       # [..., D, r], largest first
    return jnp.swapaxes(top, -1, -2)


def channel_onehot(idx, d: int):
    """``idx [..., c]`` -> bool ``[..., c, d]`` with ``out[..., j, idx[..., j]] = True``."""
    return idx.astype(jnp.int32)[..., None] == jnp.arange(d, dtype=jnp.int32)
