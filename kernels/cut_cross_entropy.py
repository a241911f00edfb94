"""Cut cross-entropy: the loss of a linear classifier without its ``[N, V]`` logits.

Wijmans, Huval, Hertzberg, Koltun, Krähenbühl (2025), "Cut Your Losses in
Large-Vocabulary Language Models" (CCE).  For hidden states ``h [N, D]``, a
classifier ``W [D, V]`` (or an embedding table ``[V, D]`` with ``tied=True``)
and integer targets ``t [N]``, every function here returns the per-row loss

    loss_i = logsumexp_v(z_iv) - z_i,t_i,   z = cap(h W),   float32 [N],

with ``cap(x) = softcap * tanh(x / softcap)`` when ``softcap`` is set (Gemma-2
logit soft-capping) and rows whose target equals ``ignore_index`` giving 0.
Reductions (mean over the kept rows, sum) are linear in the rows and left to
the caller (``memlab.nn.cross_entropy``); the VJPs here take any per-row
cotangent.

Implementations:

* :func:`cross_entropy_reference` -- materializes the ``[N, V]`` logits
  (``log_softmax``), differentiated by JAX.  The ``"xla"`` backend.
* :func:`chunked_cross_entropy` -- plain JAX, the CPU path and the Liger-kernel
  style "fused linear cross-entropy": a ``fori_loop`` over token chunks of
  ``chunk`` rows, inside it a loop over vocabulary chunks of ``vocab_chunk``
  columns with an online log-sum-exp (running max ``m`` and sum ``l``, as in
  flash attention); the target logit is picked out of the block that holds
  it, so no ``[N, D]`` gather of classifier columns is made.  A
  ``jax.custom_vjp`` saves only the float32 ``lse [N]`` and recomputes each
  ``[chunk, vocab_chunk]`` block in the backward, vocabulary chunks
  outside and token chunks inside: ``dz = g * (softmax - onehot) * cap'``,
  ``dW[:, blk] = sum_chunks H_chunk^T dz`` (a float32 ``[D, vocab_chunk]``
  accumulator, written once into ``dW`` in ``W``'s dtype) and
  ``dH[chunk] += dz W_blk^T`` (a float32 ``[N, D]`` carry).  Ragged last
  chunks are not padded (padding would copy ``H`` or ``W``): the last chunk
  is slid back to end at ``N`` / ``V`` and the rows / columns it shares with
  the previous chunk are masked.
* :func:`cut_cross_entropy` -- Pallas kernels (the paper's algorithm):
  **forward** a program per ``block_n`` rows walks the vocabulary in blocks of
  ``block_v`` with the online log-sum-exp, each ``[block_n, block_v]`` logit
  tile built in registers from ``block_d``-wide slices of ``h`` and ``W``;
  it writes ``loss`` and ``lse`` (float32 ``[N]``).  **Backward** two kernels,
  as flash attention's dQ and dK/dV: **dH** (a program per row block looping
  over vocabulary blocks, ``dH[rows] += dz W_blk^T``) and **dW** (a program
  per vocabulary block looping over row blocks, ``dW[blk] += H_rows^T dz``),
  each recomputing its logit tiles from the saved ``lse``; no atomics, and
  each program accumulates into its own float32 output tile.

Gradient filtering (paper section 4.3), ``filter_eps``: in the backward, a
block whose entries of ``|softmax - onehot|`` are all below ``filter_eps``
contributes almost nothing to either gradient and is skipped (``lax.cond`` /
``pl.when``).  The paper uses ``2**-12`` (below bfloat16 resolution next to
1); ``None`` (default) keeps the gradient exact.  The loss is never filtered.

Backends of :func:`cut_cross_entropy` (``backend=``):

* ``"triton"`` (GPU): one program per row block (forward, dH) or vocabulary
  block (dW) with ``lax.fori_loop`` over the other axis and over ``block_d``
  slices; tiles are powers of two of at least 16 (``tl.dot``); ragged ``N``,
  ``V`` and ``D`` (any sizes) use masked loads and stores, nothing is padded
  or copied.  dH and dW accumulate in float32 outputs (read-modify-write of the
  program's own tile), cast to the input dtypes after the kernel.
* ``"mosaic_tpu"`` (TPU): grid ``(row blocks, vocab blocks)`` (forward, dH)
  or ``(vocab blocks, row blocks)`` (dW) with the last axis "arbitrary"; the
  running ``m``, ``l``, target logit (lane-replicated ``[block_n, 128]``) and
  the dH ``[block_n, D]`` / dW ``[D, block_v]`` accumulators live in VMEM
  scratch; blocks span the full ``D``.  Per-row vectors travel lane-dense as
  ``[1, N]``; the forward writes ``loss``/``lse`` lane-replicated ``[N, 128]``
  (a transient; column 0 is kept).  Ragged edge blocks hold garbage, zeroed
  (rows of ``h``, columns of ``W``) before any matmul that sums over them.  A
  block smaller than its dimension must be a multiple of 128.
* ``"interpret"``: the Triton kernels in the HLO interpreter (any device; the
  CPU tests).  ``backend="mosaic_tpu", interpret=True`` runs the Mosaic
  kernels in TPU interpret mode.
* ``"xla"``: :func:`cross_entropy_reference`; ``"auto"``: triton on GPU,
  mosaic_tpu on TPU, xla elsewhere.

Numerics: logits, softmax statistics and accumulators are float32; float32
inputs use ``Precision.HIGHEST`` dots, 16-bit inputs 16-bit products with
float32 accumulation (``dz`` is cast to the input dtype before its dots).
``h`` and ``W`` may have different dtypes (they are promoted).  Gradients come
back in the input dtypes.  Targets outside ``[0, V)`` (other than
``ignore_index``) match no column: their target logit counts as 0.

Checked without accelerators: the kernels run interpreted on CPU against float64
references, and are compiled to machine code for an H100 (XLA:GPU, Triton, ptxas) and a
TPU v5e (XLA:TPU, Mosaic) on a CPU-only machine (``benchmarks/compile_report.py``,
``tests/targets``; :mod:`memlab.targets`).  Mosaic row and vocabulary blocks are
planned against the scoped VMEM (:func:`_plan_mosaic_vmem`); speed is only measured on a
real device, and the default block sizes are untuned.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ._common import (KERNEL_FLOAT_DTYPES, LANES, MOSAIC_DEFAULT_VMEM_BYTES, MOSAIC_MAX_VMEM_BYTES,
                      acc_dtype, cdiv, check_on_chip, col_vec, dot, is_power_of_2, load,
                      mosaic_compiler_params, nbytes, next_power_of_2, pallas_lowering,
                      precision_for, resolve_backend, store)

__all__ = ["BlockSizes", "check_args", "chunked_cross_entropy", "cross_entropy_reference",
           "cut_cross_entropy"]

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------
def check_args(hidden, classifier, targets, *, tied: bool = False,
               name: str = "cross_entropy") -> tuple[int, int, int]:
    """Validate shapes and dtypes; return ``(N, D, V)``."""
    for arg, x in (("hidden", hidden), ("classifier", classifier), ("targets", targets)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: {arg} must be an array, got {type(x).__name__}.")
    if not isinstance(tied, (bool, np.bool_)):
        raise TypeError(f"{name}: tied={tied!r} must be a Python bool.")
    if hidden.ndim != 2:
        raise ValueError(f"{name}: hidden must be [N, D], got shape {tuple(hidden.shape)}; "
                         "flatten batch and time first (hidden.reshape(-1, D)).")
    if classifier.ndim != 2:
        raise ValueError(f"{name}: classifier must be 2-D ([D, V], or [V, D] with tied=True), "
                         f"got shape {tuple(classifier.shape)}.")
    n, d = hidden.shape
    dax = 1 if tied else 0
    if classifier.shape[dax] != d:
        other = classifier.shape[1 - dax] == d
        hint = (f"; it looks like {'[D, V]: pass tied=False' if tied else '[V, D] (an embedding table): pass tied=True'}"
                if other else "")
        raise ValueError(
            f"{name}: classifier shape {tuple(classifier.shape)} does not match hidden dim "
            f"D={d} (expected {'[V, D]' if tied else '[D, V]'}){hint}.")
    v = classifier.shape[1 - dax]
    if targets.shape != (n,):
        raise ValueError(f"{name}: targets must be [N]={n} integers (one per hidden row), got "
                         f"shape {tuple(targets.shape)}.")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise TypeError(f"{name}: targets must be integer class ids, got dtype {targets.dtype}.")
    for arg, x in (("hidden", hidden), ("classifier", classifier)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name}: {arg} must be floating point, got dtype {x.dtype}; "
                            "dequantize a quantized classifier first.")
    if v == 0 or d == 0:
        raise ValueError(f"{name}: vocabulary V={v} and hidden dim D={d} must be positive.")
    return int(n), int(d), int(v)


def _check_softcap(name, softcap):
    if softcap is None:
        return None
    try:
        if isinstance(softcap, bool):
            raise TypeError
        softcap = float(softcap)
    except TypeError:
        raise TypeError(f"{name}: softcap={softcap!r} must be a Python float or None "
                        "(it is baked into the compiled loop).") from None
    if not softcap > 0:
        raise ValueError(f"{name}: softcap={softcap} must be > 0 (e.g. 30.0) or None.")
    return softcap


def _check_eps(name, eps):
    if eps is None:
        return None
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not eps > 0:
        raise ValueError(f"{name}: filter_eps={eps!r} must be a positive float (the paper "
                         "uses 2**-12) or None for the exact gradient.")
    return float(eps)


def _check_ignore(name, ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"{name}: ignore_index={ignore_index!r} must be a Python int "
                        "(e.g. -100).")
    return int(ignore_index)


def _cap(z, softcap):
    return z if softcap is None else softcap * jnp.tanh(z / softcap)


def _compute_dtype(h, w):
    return jnp.promote_types(h.dtype, w.dtype)


# --------------------------------------------------------------------------
# Reference (materializes the logits)
# --------------------------------------------------------------------------
def cross_entropy_reference(hidden, classifier, targets, *, tied: bool = False,
                            ignore_index: int = -100, softcap: Optional[float] = None,
                            precision: Any = None) -> jax.Array:
    """Per-row loss ``[N]`` (float32; float64 for float64 inputs) through ``[N, V]`` logits.

    ``precision`` None uses HIGHEST for 32/64-bit inputs.
    """
    name = "cross_entropy_reference"
    check_args(hidden, classifier, targets, tied=tied, name=name)
    ignore_index = _check_ignore(name, ignore_index)
    softcap = _check_softcap(name, softcap)
    cdt = _compute_dtype(hidden, classifier)
    acc = acc_dtype(cdt)
    precision = precision_for(cdt) if precision is None else precision
    w = classifier.astype(cdt)
    dims = (((1,), (1 if tied else 0,)), ((), ()))
    z = lax.dot_general(hidden.astype(cdt), w, dims, precision=precision,
                        preferred_element_type=acc)
    z = _cap(z, softcap)
    onehot = jnp.arange(z.shape[1])[None, :] == targets[:, None]
    loss = -jnp.sum(jnp.where(onehot, z, 0.0), axis=-1) + jax.nn.logsumexp(z, axis=-1)
    return jnp.where(targets != ignore_index, loss, 0.0)


# --------------------------------------------------------------------------
# Chunked plain-JAX path
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Spec:
    n: int
    d: int
    v: int
    tied: bool
    ignore_index: int
    softcap: Optional[float]
    filter_eps: Optional[float]


@dataclasses.dataclass(frozen=True)
class _ChunkCfg:
    spec: _Spec
    bn: int       # token chunk (<= N)
    bv: int       # vocab chunk (<= V)


def _slide(i, b: int, n: int):
    """Start of chunk ``i`` of size ``b`` in ``[0, n)``: the last one slid back to end at n."""
    return jnp.minimum(i * b, n - b)


def _as_bits(x):
    """On CPU, 16-bit floats travel through the loops as uint16 bits (see :func:`_block`)."""
    if jnp.dtype(x.dtype).itemsize == 2 and jnp.issubdtype(x.dtype, jnp.floating) \
            and jax.default_backend() == "cpu":
        return lax.bitcast_convert_type(x, jnp.uint16)
    return x


def _block(x, start, size: int, axis: int, dtype, src_dtype):
    """``x[start:start+size]`` along ``axis`` in ``dtype``.  XLA:CPU runs 16-bit
    slices and dots in float32 and, given a 16-bit ``x``, converts the *whole*
    ``x`` before the loop (a float32 copy of ``W``); slicing its uint16 bits
    (one 16-bit copy) and bitcasting the block keeps the float32 conversion per
    block."""
    blk = lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    if blk.dtype != src_dtype:
        blk = lax.bitcast_convert_type(blk, src_dtype)
    return blk.astype(dtype)


def _w_block(cfg: _ChunkCfg, w, c0, dtype, src_dtype):
    return _block(w, c0, cfg.bv, 0 if cfg.spec.tied else 1, dtype, src_dtype)


def _block_logits(cfg: _ChunkCfg, hb, wb, precision):
    """``[bn, bv]`` float32 logits (before the cap) of a token chunk and a W block."""
    dims = (((1,), (1 if cfg.spec.tied else 0,)), ((), ()))
    return lax.dot_general(hb, wb, dims, precision=precision,
                           preferred_element_type=acc_dtype(hb.dtype))


def _chunked_forward(cfg: _ChunkCfg, h, w, t):
    sp, bn, bv = cfg.spec, cfg.bn, cfg.bv
    cdt = _compute_dtype(h, w)
    h_bits, w_bits = _as_bits(h), _as_bits(w)
    acc, precision = acc_dtype(cdt), precision_for(cdt)
    t = t.astype(jnp.int32)

    def row_block(i, carry):
        loss, lse = carry
        r0 = _slide(i, bn, sp.n)
        hb = _block(h_bits, r0, bn, 0, cdt, h.dtype)
        tb = lax.dynamic_slice_in_dim(t, r0, bn)

        def col_block(j, c):
            m, l, zt = c
            c0 = _slide(j, bv, sp.v)
            cols = c0 + jnp.arange(bv, dtype=jnp.int32)
            fresh = (cols >= j * bv)[None, :]
            z = _cap(_block_logits(cfg, hb, _w_block(cfg, w_bits, c0, cdt, w.dtype), precision),
                     sp.softcap)
            z = jnp.where(fresh, z, _NEG_INF)
            zt = zt + jnp.sum(jnp.where(fresh & (cols[None, :] == tb[:, None]), z, 0.0), axis=1)
            m_new = jnp.maximum(m, jnp.max(z, axis=1))
            l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
            return m_new, l, zt

        init = (jnp.full((bn,), _NEG_INF, acc), jnp.zeros((bn,), acc), jnp.zeros((bn,), acc))
        m, l, zt = lax.fori_loop(0, cdiv(sp.v, bv), col_block, init)
        lse_b = m + jnp.log(l)
        loss_b = jnp.where(tb != sp.ignore_index, lse_b - zt, 0.0)
        # Rows shared with the previous chunk are recomputed identically: overwrite.
        return (lax.dynamic_update_slice_in_dim(loss, loss_b, r0, 0),
                lax.dynamic_update_slice_in_dim(lse, lse_b, r0, 0))

    init = (jnp.zeros((sp.n,), acc), jnp.zeros((sp.n,), acc))
    return lax.fori_loop(0, cdiv(sp.n, bn), row_block, init)


def _chunked_backward(cfg: _ChunkCfg, h, w, t, lse, g):
    """``(dH, dW)``: vocabulary chunks outside, token chunks inside.

    Each vocabulary chunk's ``dW`` block is complete after its inner loop
    (float32 ``[D, vocab_chunk]``), so ``dW`` is written once in ``W``'s dtype;
    ``dH`` is a float32 ``[N, D]`` carry.
    """
    sp, bn, bv = cfg.spec, cfg.bn, cfg.bv
    cdt = _compute_dtype(h, w)
    h_bits, w_bits = _as_bits(h), _as_bits(w)
    acc, precision = acc_dtype(cdt), precision_for(cdt)
    t = t.astype(jnp.int32)
    g = jnp.where(t != sp.ignore_index, g.astype(acc), 0.0)
    ax = 0 if sp.tied else 1                     # W's vocabulary axis
    rows_dims = (((0,), (0,)), ((), ()))         # contract over the rows

    def col_block(j, carry):
        dh, dw = carry
        c0 = _slide(j, bv, sp.v)
        cols = c0 + jnp.arange(bv, dtype=jnp.int32)
        fresh_c = cols >= j * bv
        wb = _w_block(cfg, w_bits, c0, cdt, w.dtype)

        def row_block(i, c):
            r0 = _slide(i, bn, sp.n)
            rows = r0 + jnp.arange(bn, dtype=jnp.int32)
            hb = _block(h_bits, r0, bn, 0, cdt, h.dtype)
            tb = lax.dynamic_slice_in_dim(t, r0, bn)
            lb = lax.dynamic_slice_in_dim(lse, r0, bn)
            # Rows shared with the previous token chunk and columns shared with the
            # previous vocabulary chunk were done there: their g is zeroed here.
            gb = jnp.where(rows >= i * bn, lax.dynamic_slice_in_dim(g, r0, bn), 0.0)
            z = _cap(_block_logits(cfg, hb, wb, precision), sp.softcap)
            s = jnp.exp(z - lb[:, None]) - (cols[None, :] == tb[:, None])
            s = jnp.where(fresh_c[None, :], s, 0.0)                 # d loss_i / d z_iv

            def update(c):
                dh, dwb = c
                dz = s * gb[:, None]
                if sp.softcap is not None:
                    dz = dz * (1.0 - jnp.square(z / sp.softcap))
                dz = dz.astype(cdt)
                dhb = lax.dot_general(dz, wb, (((1,), (ax,)), ((), ())),
                                      precision=precision, preferred_element_type=acc)
                cur = lax.dynamic_slice_in_dim(dh, r0, bn)
                dh = lax.dynamic_update_slice_in_dim(dh, cur + dhb, r0, 0)
                if sp.tied:     # dW [V, D]: dz^T hb
                    dwb = dwb + lax.dot_general(dz, hb, rows_dims, precision=precision,
                                                preferred_element_type=acc)
                else:           # dW [D, V]: hb^T dz
                    dwb = dwb + lax.dot_general(hb, dz, rows_dims, precision=precision,
                                                preferred_element_type=acc)
                return dh, dwb

            if sp.filter_eps is None:
                return update(c)
            return lax.cond(jnp.max(jnp.abs(s)) >= sp.filter_eps, update, lambda c: c, c)

        blk_shape = (bv, sp.d) if sp.tied else (sp.d, bv)
        dh, dwb = lax.fori_loop(0, cdiv(sp.n, bn), row_block, (dh, jnp.zeros(blk_shape, acc)))
        old = _block(dw, c0, bv, ax, acc, w.dtype)
        keep = fresh_c[:, None] if sp.tied else fresh_c[None, :]
        dwb = _as_bits(jnp.where(keep, dwb, old).astype(w.dtype))
        return dh, lax.dynamic_update_slice_in_dim(dw, dwb, c0, axis=ax)

    # dW is carried as 16-bit bits for 16-bit W (XLA:CPU would widen a bf16 carry).
    init = (jnp.zeros((sp.n, sp.d), acc), _as_bits(jnp.zeros(w.shape, w.dtype)))
    dh, dw = lax.fori_loop(0, cdiv(sp.v, bv), col_block, init)
    if dw.dtype != w.dtype:
        dw = lax.bitcast_convert_type(dw, w.dtype)
    return dh.astype(h.dtype), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunked(cfg: _ChunkCfg, h, w, t):
    return _chunked_forward(cfg, h, w, t)[0]


def _chunked_fwd(cfg, h, w, t):
    loss, lse = _chunked_forward(cfg, h, w, t)
    return loss, (h, w, t, lse)


def _chunked_bwd(cfg, res, g):
    h, w, t, lse = res
    dh, dw = _chunked_backward(cfg, h, w, t, lse, g)
    return dh, dw, np.zeros(t.shape, jax.dtypes.float0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _check_chunk(name, arg, c):
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
        raise ValueError(f"{name}: {arg}={c!r} must be a positive int (e.g. {arg}=1024).")
    return int(c)


def _empty_vjp_safe(n, hidden, classifier):
    """N == 0: no rows, a zero-size loss (still differentiable)."""
    return jnp.zeros((0,), jnp.float32) + 0.0 * (jnp.sum(hidden) + jnp.sum(classifier))


def chunked_cross_entropy(hidden, classifier, targets, *, tied: bool = False,
                          ignore_index: int = -100, softcap: Optional[float] = None,
                          chunk: int = 1024, vocab_chunk: int = 2048,
                          filter_eps: Optional[float] = None) -> jax.Array:
    """Per-row loss ``[N]`` float32, ``chunk x vocab_chunk`` logits at a time (fwd and bwd).

    Differentiable w.r.t. ``hidden`` and ``classifier`` (custom VJP recomputing
    the logit blocks; temporary memory ``O(chunk * vocab_chunk + N * D)``, the
    ``N * D`` being the float32 hidden-state gradient).
    """
    name = "chunked_cross_entropy"
    n, d, v = check_args(hidden, classifier, targets, tied=tied, name=name)
    spec = _Spec(n, d, v, bool(tied), _check_ignore(name, ignore_index),
                 _check_softcap(name, softcap), _check_eps(name, filter_eps))
    bn = min(_check_chunk(name, "chunk", chunk), max(n, 1))
    bv = min(_check_chunk(name, "vocab_chunk", vocab_chunk), v)
    if n == 0:
        return _empty_vjp_safe(n, hidden, classifier)
    return _chunked(_ChunkCfg(spec, bn, bv), hidden, classifier, targets)


# --------------------------------------------------------------------------
# Pallas (Triton) kernels
# --------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the cut-cross-entropy kernels: ``block_n`` rows x ``block_v``
    vocabulary columns per logit tile, built from ``block_d``-wide slices of
    the hidden dim.  Powers of two, at least 16 (``tl.dot``); a block larger
    than its dimension shrinks to that dimension's next power of two."""
    block_n: int = 64
    block_v: int = 128
    block_d: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"BlockSizes.{f.name}={v!r} must be a positive int; "
                                 f"pass e.g. BlockSizes({f.name}=64).")
            if not is_power_of_2(v) or v < 16:
                raise ValueError(
                    f"BlockSizes.{f.name}={v} must be a power of two >= 16 (Triton tiles; "
                    f"tl.dot needs 16); use {f.name}={max(16, next_power_of_2(v))}.")


@dataclasses.dataclass(frozen=True)
class _KCfg:
    spec: _Spec
    bn: int
    bv: int
    bd: int
    interpret: Any    # False | True | pltpu.InterpretParams
    cdt: Any          # compute dtype name
    kernel: str = "triton"   # "triton" | "mosaic"
    vmem: int = 0     # mosaic: VMEM the largest of the three kernels needs (bytes)


def _fit(b: int, n: int) -> int:
    return min(b, max(16, next_power_of_2(n)))


def _and(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return jnp.logical_and(a, b)


def _d_loop(k: _KCfg, body, carry):
    """``body(d0, dmask, carry)`` over ``block_d`` slices of D: full slices
    unmasked in a loop, a ragged last slice with a mask."""
    d, bd = k.spec.d, k.bd
    nfull = d // bd
    if nfull:
        carry = lax.fori_loop(0, nfull, lambda i, c: body(i * bd, None, c), carry)
    if d % bd:   # a one-trip loop: a traced start (a static one would fail the bounds check)
        carry = lax.fori_loop(nfull, nfull + 1, lambda i, c: body(
            i * bd, (i * bd + jnp.arange(bd, dtype=jnp.int32)) < d, c), carry)
    return carry


def _v_loop(k: _KCfg, lo, hi_full, body, carry):
    """``body(j, masked, carry)`` over vocabulary blocks ``[lo, nv)``; the
    ragged last one (when V % block_v) masked."""
    carry = lax.fori_loop(lo, hi_full, lambda j, c: body(j, False, c), carry)
    if k.spec.v % k.bv:
        nv = k.spec.v // k.bv
        carry = lax.fori_loop(nv, nv + 1, lambda j, c: body(j, True, c), carry)
    return carry


def _load_w(k: _KCfg, w_ref, d0, dmask, c0, cmask):
    """A ``[bd, bv]`` slice of W (``[D, V]``), or ``[bv, bd]`` when tied (``[V, D]``)."""
    if k.spec.tied:
        m = _and(None if cmask is None else cmask[:, None], None if dmask is None else dmask[None, :])
        return load(w_ref.at[pl.ds(c0, k.bv), pl.ds(d0, k.bd)], m).astype(k.cdt)
    m = _and(None if dmask is None else dmask[:, None], None if cmask is None else cmask[None, :])
    return load(w_ref.at[pl.ds(d0, k.bd), pl.ds(c0, k.bv)], m).astype(k.cdt)


def _load_h(k: _KCfg, h_ref, r0, rmask, d0, dmask):
    m = _and(None if rmask is None else rmask[:, None], None if dmask is None else dmask[None, :])
    return load(h_ref.at[pl.ds(r0, k.bn), pl.ds(d0, k.bd)], m).astype(k.cdt)


def _tile(k: _KCfg, h_ref, w_ref, r0, rmask, c0, cmask, precision):
    """Capped float32 logits ``[bn, bv]`` of rows ``r0..`` and columns ``c0..``."""
    def body(d0, dmask, acc):
        hb = _load_h(k, h_ref, r0, rmask, d0, dmask)
        wb = _load_w(k, w_ref, d0, dmask, c0, cmask)
        return acc + dot(hb, wb, precision, trans_b=k.spec.tied)

    z = _d_loop(k, body, jnp.zeros((k.bn, k.bv), jnp.float32))
    return _cap(z, k.spec.softcap)


def _row_setup(k: _KCfg, r0):
    rows = r0 + jnp.arange(k.bn, dtype=jnp.int32)
    return rows, (rows < k.spec.n) if k.spec.n % k.bn else None


def _col_setup(k: _KCfg, j, masked: bool):
    c0 = j * k.bv
    cols = c0 + jnp.arange(k.bv, dtype=jnp.int32)
    return c0, cols, (cols < k.spec.v) if masked else None


def _fwd_kernel(h_ref, w_ref, t_ref, loss_ref, lse_ref, *, k: _KCfg, precision):
    sp = k.spec
    r0 = pl.program_id(0) * k.bn
    _, rmask = _row_setup(k, r0)
    t = load(t_ref.at[pl.ds(r0, k.bn)], rmask, other=sp.ignore_index)

    def vstep(j, masked, carry):
        m, l, zt = carry
        c0, cols, cmask = _col_setup(k, j, masked)
        z = _tile(k, h_ref, w_ref, r0, rmask, c0, cmask, precision)
        hit = cols[None, :] == t[:, None]
        if cmask is not None:
            z = jnp.where(cmask[None, :], z, _NEG_INF)
            hit = jnp.logical_and(hit, cmask[None, :])
        zt = zt + jnp.sum(jnp.where(hit, z, 0.0), axis=1)
        m_new = jnp.maximum(m, jnp.max(z, axis=1))
        l = l * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[:, None]), axis=1)
        return m_new, l, zt

    init = (jnp.full((k.bn,), _NEG_INF, jnp.float32), jnp.zeros((k.bn,), jnp.float32),
            jnp.zeros((k.bn,), jnp.float32))
    m, l, zt = _v_loop(k, 0, sp.v // k.bv, vstep, init)
    lse = m + jnp.log(l)
    loss = jnp.where(t != sp.ignore_index, lse - zt, 0.0)
    store(loss_ref.at[pl.ds(r0, k.bn)], loss, rmask)
    store(lse_ref.at[pl.ds(r0, k.bn)], lse, rmask)


def _dz_tile(k: _KCfg, z, lse, t, g, cols, cmask):
    """``(s, dz)``: ``s = softmax - onehot`` (masked) and ``dz = g s cap'`` in the input dtype."""
    s = jnp.exp(z - lse[:, None]) - (cols[None, :] == t[:, None]).astype(jnp.float32)
    if cmask is not None:
        s = jnp.where(cmask[None, :], s, 0.0)
    dz = s * g[:, None]
    if k.spec.softcap is not None:
        dz = dz * (1.0 - jnp.square(z / k.spec.softcap))
    return s, dz.astype(k.cdt)


def _filtered(k: _KCfg, s, fn):
    """Run ``fn()`` (stores only) unless every ``|s|`` is below ``filter_eps``."""
    if k.spec.filter_eps is None:
        fn()
    else:
        pl.when(jnp.max(jnp.abs(s)) >= k.spec.filter_eps)(fn)


def _zero_rows(k: _KCfg, out_ref, r0, rmask):
    """Zero a ``[bn, D]`` float32 output tile (it is accumulated into)."""
    def body(d0, dmask, c):
        m = _and(None if rmask is None else rmask[:, None], None if dmask is None else dmask[None, :])
        store(out_ref.at[pl.ds(r0, k.bn), pl.ds(d0, k.bd)],
                jnp.zeros((k.bn, k.bd), jnp.float32), m)
        return c
    _d_loop(k, body, 0)


def _dh_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, dh_ref, *, k: _KCfg, precision):
    sp = k.spec
    r0 = pl.program_id(0) * k.bn
    _, rmask = _row_setup(k, r0)
    t = load(t_ref.at[pl.ds(r0, k.bn)], rmask, other=sp.ignore_index)
    lse = load(lse_ref.at[pl.ds(r0, k.bn)], rmask)
    g = load(g_ref.at[pl.ds(r0, k.bn)], rmask)        # already 0 on ignored rows
    _zero_rows(k, dh_ref, r0, rmask)

    def vstep(j, masked, carry):
        c0, cols, cmask = _col_setup(k, j, masked)
        z = _tile(k, h_ref, w_ref, r0, rmask, c0, cmask, precision)
        s, dz = _dz_tile(k, z, lse, t, g, cols, cmask)

        def accumulate():
            def body(d0, dmask, c):
                wb = _load_w(k, w_ref, d0, dmask, c0, cmask)
                m = _and(None if rmask is None else rmask[:, None],
                         None if dmask is None else dmask[None, :])
                ref = dh_ref.at[pl.ds(r0, k.bn), pl.ds(d0, k.bd)]
                upd = dot(dz, wb, precision, trans_b=not sp.tied)
                store(ref, load(ref, m) + upd, m)
                return c
            _d_loop(k, body, 0)

        _filtered(k, s, accumulate)
        return carry

    _v_loop(k, 0, sp.v // k.bv, vstep, 0)


def _dw_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, dw_ref, *, k: _KCfg, precision):
    sp = k.spec
    j = pl.program_id(0)
    masked = bool(sp.v % k.bv)
    c0 = j * k.bv
    cols = c0 + jnp.arange(k.bv, dtype=jnp.int32)
    cmask = (cols < sp.v) if masked else None

    def dw_ref_at(d0):
        if sp.tied:
            return dw_ref.at[pl.ds(c0, k.bv), pl.ds(d0, k.bd)]
        return dw_ref.at[pl.ds(d0, k.bd), pl.ds(c0, k.bv)]

    def dw_mask(dmask):
        if sp.tied:
            return _and(None if cmask is None else cmask[:, None],
                        None if dmask is None else dmask[None, :])
        return _and(None if dmask is None else dmask[:, None],
                    None if cmask is None else cmask[None, :])

    def zero(d0, dmask, c):
        shape = (k.bv, k.bd) if sp.tied else (k.bd, k.bv)
        store(dw_ref_at(d0), jnp.zeros(shape, jnp.float32), dw_mask(dmask))
        return c
    _d_loop(k, zero, 0)

    def rstep(i, carry):
        r0 = i * k.bn
        _, rmask = _row_setup(k, r0)
        t = load(t_ref.at[pl.ds(r0, k.bn)], rmask, other=sp.ignore_index)
        lse = load(lse_ref.at[pl.ds(r0, k.bn)], rmask)
        g = load(g_ref.at[pl.ds(r0, k.bn)], rmask)
        z = _tile(k, h_ref, w_ref, r0, rmask, c0, cmask, precision)
        s, dz = _dz_tile(k, z, lse, t, g, cols, cmask)
        if rmask is not None:
            dz = jnp.where(rmask[:, None], dz, jnp.zeros((), dz.dtype))

        def accumulate():
            def body(d0, dmask, c):
                hb = _load_h(k, h_ref, r0, rmask, d0, dmask)
                m = dw_mask(dmask)
                ref = dw_ref_at(d0)
                if sp.tied:
                    upd = dot(dz, hb, precision, trans_a=True)      # [bv, bd]
                else:
                    upd = dot(hb, dz, precision, trans_a=True)      # [bd, bv]
                store(ref, load(ref, m) + upd, m)
                return c
            _d_loop(k, body, 0)

        _filtered(k, s, accumulate)
        return carry

    lax.fori_loop(0, cdiv(sp.n, k.bn), rstep, 0)


def _full_spec(shape):
    return pl.BlockSpec(tuple(shape), lambda i: (0,) * len(shape))


def _cost(k: _KCfg, n_matmuls: int, bytes_accessed: int):
    sp = k.spec
    return pl.CostEstimate(flops=2 * n_matmuls * sp.n * sp.v * sp.d,
                           transcendentals=sp.n * sp.v, bytes_accessed=int(bytes_accessed))


# --------------------------------------------------------------------------
# Mosaic (TPU) kernels
# --------------------------------------------------------------------------
def _plan_mosaic(bs: BlockSizes, n: int, v: int) -> tuple[int, int]:
    out = []
    for name, b, dim, arg in (("block_n", bs.block_n, n, "N"), ("block_v", bs.block_v, v, "V")):
        if dim <= b:
            out.append(dim)
        elif b % LANES:
            raise ValueError(
                f"block_sizes.{name}={b} must be a multiple of {LANES} on mosaic_tpu when it "
                f"is smaller than {arg}={dim} (a lane dimension); use {name}="
                f"{-(-b // LANES) * LANES} (or >= {dim}).")
        else:
            out.append(b)
    return out[0], out[1]


def _mosaic_vmem(bn: int, bv: int, d: int, itemsize: int) -> int:
    """VMEM of the largest Mosaic kernel (dH or dW): double-buffered h / W / output tiles,
    the float32 accumulator and a few ``[bn, bv]`` float32 logit temporaries."""
    tiles = 2 * (bn + bv) * d * itemsize
    return tiles + 2 * max(bn, bv) * d * itemsize + max(bn, bv) * d * 4 + 4 * bn * bv * 4


def _plan_mosaic_vmem(bs: Optional[BlockSizes], n: int, v: int, d: int, itemsize: int,
                      name: str) -> tuple[int, int, int]:
    """Mosaic row / vocabulary blocks and their VMEM: the defaults (256 x 512) are halved,
    vocabulary first, down to 128 while they would exceed the default scoped VMEM; blocks
    the caller chose are kept, and refused if no TPU has the VMEM they need."""
    bn, bv = _plan_mosaic(bs or BlockSizes(block_n=256, block_v=512), n, v)
    if bs is None:
        while _mosaic_vmem(bn, bv, d, itemsize) > MOSAIC_DEFAULT_VMEM_BYTES * 3 // 4:
            if bv >= 256 and bv % 256 == 0 and bv >= bn:
                bv //= 2
            elif bn >= 256 and bn % 256 == 0:
                bn //= 2
            else:
                break
    need = _mosaic_vmem(bn, bv, d, itemsize)
    check_on_chip(name, need, MOSAIC_MAX_VMEM_BYTES, "VMEM",
                  f"lower block_sizes.block_v (now {bv}) or block_n (now {bn}) towards 128")
    return bn, bv, need


def _m_tile(k: _KCfg, h, w, precision):
    z = dot(h.astype(k.cdt), w.astype(k.cdt), precision, trans_b=k.spec.tied)
    return _cap(z, k.spec.softcap)


def _m_zero_cols(k: _KCfg, w, j):
    """Zero the classifier columns past V in a ragged edge block (they hold garbage)."""
    if not k.spec.v % k.bv:
        return w
    ax = 0 if k.spec.tied else 1
    cols = j * k.bv + lax.broadcasted_iota(jnp.int32, w.shape, ax)
    return jnp.where(cols < k.spec.v, w, jnp.zeros((), w.dtype))


def _m_zero_rows(k: _KCfg, x, i):
    if not k.spec.n % k.bn:
        return x
    rows = i * k.bn + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows < k.spec.n, x, jnp.zeros((), x.dtype))


def _m_cols(k: _KCfg, j):
    return j * k.bv + lax.broadcasted_iota(jnp.int32, (k.bn, k.bv), 1)


def _mosaic_fwd_kernel(h_ref, w_ref, t_ref, loss_ref, lse_ref, m_sc, l_sc, zt_sc, *,
                       k: _KCfg, nvb: int, precision):
    sp = k.spec
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        zt_sc[...] = jnp.zeros(zt_sc.shape, jnp.float32)

    z = _m_tile(k, h_ref[...], w_ref[...], precision)
    cols = _m_cols(k, j)
    hit = cols == col_vec(t_ref, z.shape)
    if sp.v % k.bv:
        z = jnp.where(cols < sp.v, z, _NEG_INF)
    zt_sc[...] += jnp.sum(jnp.where(hit, z, 0.0), axis=1, keepdims=True)
    m_prev = m_sc[...]                                              # [bn, 128]
    m_next = jnp.maximum(m_prev, jnp.max(z, axis=1, keepdims=True))
    l_sc[...] = jnp.exp(m_prev - m_next) * l_sc[...] + jnp.sum(
        jnp.exp(z - m_next[:, :1]), axis=1, keepdims=True)
    m_sc[...] = m_next

    @pl.when(j == nvb - 1)
    def _finish():
        lse = m_sc[...] + jnp.log(l_sc[...])
        t = col_vec(t_ref, lse.shape)
        lse_ref[...] = lse
        loss_ref[...] = jnp.where(t != sp.ignore_index, lse - zt_sc[...], 0.0)


def _m_dz(k: _KCfg, z, cols, t_ref, lse_ref, g_ref):
    sp = k.spec
    s = jnp.exp(z - col_vec(lse_ref, z.shape)) - (cols == col_vec(t_ref, z.shape)).astype(
        jnp.float32)
    if sp.v % k.bv:
        s = jnp.where(cols < sp.v, s, 0.0)
    dz = s * col_vec(g_ref, z.shape)
    if sp.softcap is not None:
        dz = dz * (1.0 - jnp.square(z / sp.softcap))
    return s, dz


def _mosaic_dh_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, dh_ref, dh_sc, *, k: _KCfg,
                      nvb: int, precision):
    j = pl.program_id(1)

    @pl.when(j == 0)
    def _init():
        dh_sc[...] = jnp.zeros(dh_sc.shape, jnp.float32)

    w = _m_zero_cols(k, w_ref[...], j)
    z = _m_tile(k, h_ref[...], w, precision)
    s, dz = _m_dz(k, z, _m_cols(k, j), t_ref, lse_ref, g_ref)

    def accumulate():
        dh_sc[...] += dot(dz.astype(k.cdt), w.astype(k.cdt), precision, trans_b=not k.spec.tied)

    _filtered(k, s, accumulate)

    @pl.when(j == nvb - 1)
    def _finish():
        dh_ref[...] = dh_sc[...].astype(dh_ref.dtype)


def _mosaic_dw_kernel(h_ref, w_ref, t_ref, lse_ref, g_ref, dw_ref, dw_sc, *, k: _KCfg,
                      nb: int, precision):
    j, i = pl.program_id(0), pl.program_id(1)

    @pl.when(i == 0)
    def _init():
        dw_sc[...] = jnp.zeros(dw_sc.shape, jnp.float32)

    h = _m_zero_rows(k, h_ref[...], i)
    z = _m_tile(k, h, w_ref[...], precision)
    s, dz = _m_dz(k, z, _m_cols(k, j), t_ref, lse_ref, g_ref)
    dz = _m_zero_rows(k, dz, i).astype(k.cdt)       # garbage rows of an edge block
    if k.spec.n % k.bn:
        s = _m_zero_rows(k, s, i)

    def accumulate():
        hc = h.astype(k.cdt)
        if k.spec.tied:
            dw_sc[...] += dot(dz, hc, precision, trans_a=True)       # [bv, D]
        else:
            dw_sc[...] += dot(hc, dz, precision, trans_a=True)       # [D, bv]

    _filtered(k, s, accumulate)

    @pl.when(i == nb - 1)
    def _finish():
        dw_ref[...] = dw_sc[...].astype(dw_ref.dtype)


def _m_specs(k: _KCfg, order: str):
    """BlockSpecs of ``h, W, t, lse, g`` for a grid ``(rows, vocab)`` or ``(vocab, rows)``."""
    sp = k.spec
    if order == "nv":
        ij = lambda f: lambda a, b: f(a, b)        # noqa: E731
    else:
        ij = lambda f: lambda a, b: f(b, a)        # noqa: E731
    h = pl.BlockSpec((k.bn, sp.d), ij(lambda i, j: (i, 0)))
    w = pl.BlockSpec((k.bv, sp.d), ij(lambda i, j: (j, 0))) if sp.tied else \
        pl.BlockSpec((sp.d, k.bv), ij(lambda i, j: (0, j)))
    row = pl.BlockSpec((1, k.bn), ij(lambda i, j: (0, i)))
    return h, w, row


def _mosaic_forward(k: _KCfg, h, w, t):
    sp = k.spec
    nb, nvb = cdiv(sp.n, k.bn), cdiv(sp.v, k.bv)
    precision = precision_for(k.cdt)
    h_spec, w_spec, row = _m_specs(k, "nv")
    out_spec = pl.BlockSpec((k.bn, LANES), lambda i, j: (i, 0))
    out = jax.ShapeDtypeStruct((sp.n, LANES), jnp.float32)
    loss, lse = pl.pallas_call(
        functools.partial(_mosaic_fwd_kernel, k=k, nvb=nvb, precision=precision),
        out_shape=[out, out], grid=(nb, nvb), in_specs=[h_spec, w_spec, row],
        out_specs=[out_spec, out_spec],
        scratch_shapes=[pltpu.VMEM((k.bn, LANES), jnp.float32)] * 3,
        compiler_params=mosaic_compiler_params(("parallel", "arbitrary"), k.vmem),
        interpret=k.interpret, name="cut_cross_entropy_fwd",
        cost_estimate=_cost(k, 1, nbytes(h, w, t) + 8 * sp.n),
    )(h, w, t[None, :])
    return loss[:, 0], lse[:, 0]


def _mosaic_backward(k: _KCfg, h, w, t, lse, g):
    sp = k.spec
    nb, nvb = cdiv(sp.n, k.bn), cdiv(sp.v, k.bv)
    precision = precision_for(k.cdt)
    rows = (t[None, :], lse[None, :], g[None, :])
    h_spec, w_spec, row = _m_specs(k, "nv")
    dh = pl.pallas_call(
        functools.partial(_mosaic_dh_kernel, k=k, nvb=nvb, precision=precision),
        out_shape=jax.ShapeDtypeStruct(h.shape, h.dtype), grid=(nb, nvb),
        in_specs=[h_spec, w_spec, row, row, row], out_specs=h_spec,
        scratch_shapes=[pltpu.VMEM((k.bn, sp.d), jnp.float32)],
        compiler_params=mosaic_compiler_params(("parallel", "arbitrary"), k.vmem),
        interpret=k.interpret, name="cut_cross_entropy_bwd_dh",
        cost_estimate=_cost(k, 2, nbytes(h, w, *rows) + h.size * h.dtype.itemsize),
    )(h, w, *rows)
    h_spec, w_spec, row = _m_specs(k, "vn")
    dw = pl.pallas_call(
        functools.partial(_mosaic_dw_kernel, k=k, nb=nb, precision=precision),
        out_shape=jax.ShapeDtypeStruct(w.shape, w.dtype), grid=(nvb, nb),
        in_specs=[h_spec, w_spec, row, row, row], out_specs=w_spec,
        scratch_shapes=[pltpu.VMEM((k.bv, sp.d) if sp.tied else (sp.d, k.bv), jnp.float32)],
        compiler_params=mosaic_compiler_params(("parallel", "arbitrary"), k.vmem),
        interpret=k.interpret, name="cut_cross_entropy_bwd_dw",
        cost_estimate=_cost(k, 2, nbytes(h, w, *rows) + w.size * w.dtype.itemsize),
    )(h, w, *rows)
    return dh, dw


@functools.partial(jax.jit, static_argnums=0)
def _kernel_forward(k: _KCfg, h, w, t):
    sp = k.spec
    if k.kernel == "mosaic":
        return _mosaic_forward(k, h, w, t)
    precision = precision_for(k.cdt)
    out = jax.ShapeDtypeStruct((sp.n,), jnp.float32)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, k=k, precision=precision),
        out_shape=[out, out], grid=(cdiv(sp.n, k.bn),),
        in_specs=[_full_spec(h.shape), _full_spec(w.shape), _full_spec(t.shape)],
        out_specs=[_full_spec((sp.n,)), _full_spec((sp.n,))],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=k.interpret, name="cut_cross_entropy_fwd",
        cost_estimate=_cost(k, 1, nbytes(h, w, t) + 8 * sp.n),
    )(h, w, t)


@functools.partial(jax.jit, static_argnums=0)
def _kernel_backward(k: _KCfg, h, w, t, lse, g):
    sp = k.spec
    precision = precision_for(k.cdt)
    g = jnp.where(t != sp.ignore_index, g.astype(jnp.float32), 0.0)
    if k.kernel == "mosaic":
        return _mosaic_backward(k, h, w, t, lse, g)
    ins = (h, w, t, lse, g)
    in_specs = [_full_spec(a.shape) for a in ins]
    common = dict(in_specs=in_specs, interpret=k.interpret,
                  compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))
    dh = pl.pallas_call(
        functools.partial(_dh_kernel, k=k, precision=precision),
        out_shape=jax.ShapeDtypeStruct(h.shape, jnp.float32), grid=(cdiv(sp.n, k.bn),),
        out_specs=_full_spec(h.shape), name="cut_cross_entropy_bwd_dh",
        cost_estimate=_cost(k, 2, nbytes(*ins) + 4 * h.size), **common)(*ins)
    dw = pl.pallas_call(
        functools.partial(_dw_kernel, k=k, precision=precision),
        out_shape=jax.ShapeDtypeStruct(w.shape, jnp.float32), grid=(cdiv(sp.v, k.bv),),
        out_specs=_full_spec(w.shape), name="cut_cross_entropy_bwd_dw",
        cost_estimate=_cost(k, 2, nbytes(*ins) + 4 * w.size), **common)(*ins)
    return dh.astype(h.dtype), dw.astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cce(k: _KCfg, h, w, t):
    return _kernel_forward(k, h, w, t)[0]


def _cce_fwd(k, h, w, t):
    loss, lse = _kernel_forward(k, h, w, t)
    return loss, (h, w, t, lse)


def _cce_bwd(k, res, g):
    h, w, t, lse = res
    dh, dw = _kernel_backward(k, h, w, t, lse, g)
    return dh, dw, np.zeros(t.shape, jax.dtypes.float0)


_cce.defvjp(_cce_fwd, _cce_bwd)


def cut_cross_entropy(hidden, classifier, targets, *, tied: bool = False,
                      ignore_index: int = -100, softcap: Optional[float] = None,
                      block_sizes: Optional[BlockSizes] = None, backend: str = "auto",
                      interpret: Optional[bool] = None,
                      filter_eps: Optional[float] = None) -> jax.Array:
    """Per-row loss ``[N]`` float32 through the Pallas CCE kernels (see the module doc).

    Args:
      hidden: ``[N, D]`` float32/bfloat16/float16.
      classifier: ``[D, V]``, or ``[V, D]`` with ``tied=True`` (an embedding table).
      targets: int ``[N]``; rows equal to ``ignore_index`` give loss 0 and no gradient.
      softcap: optional logit soft-cap ``softcap * tanh(z / softcap)``.
      block_sizes: a :class:`BlockSizes` (powers of two >= 16; on mosaic_tpu
        ``block_n``/``block_v`` below their dimension must be multiples of 128,
        ``block_d`` is unused) or None.
      backend: "auto" (triton on GPU, mosaic_tpu on TPU, xla elsewhere),
        "triton", "mosaic_tpu", "interpret" or "xla" (:func:`cross_entropy_reference`).
      interpret: with "triton", True runs the kernels in the HLO interpreter;
        with "mosaic_tpu", True (or a ``pltpu.InterpretParams``) in TPU interpret mode.
      filter_eps: skip backward blocks with every ``|softmax - onehot| < filter_eps``.
    """
    name = "cut_cross_entropy"
    if block_sizes is not None and not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"{name}: block_sizes must be a BlockSizes or None, got "
                        f"{type(block_sizes).__name__}; pass BlockSizes(block_n=..., "
                        "block_v=..., block_d=...).")
    backend = resolve_backend(backend)
    n, d, v = check_args(hidden, classifier, targets, tied=tied, name=name)
    spec = _Spec(n, d, v, bool(tied), _check_ignore(name, ignore_index),
                 _check_softcap(name, softcap), _check_eps(name, filter_eps))
    if backend == "xla":
        return cross_entropy_reference(hidden, classifier, targets, tied=tied,
                                       ignore_index=spec.ignore_index, softcap=spec.softcap)
    for arg, x in (("hidden", hidden), ("classifier", classifier)):
        if jnp.dtype(x.dtype) not in KERNEL_FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg} dtype {x.dtype} is not supported by backend="
                            f"{backend!r}; use float32, bfloat16 or float16, or backend='xla'.")
    if n == 0:
        return _empty_vjp_safe(n, hidden, classifier)
    cdt = jnp.dtype(_compute_dtype(hidden, classifier)).name
    kernel, interp = pallas_lowering(backend, interpret)
    if kernel == "mosaic":
        itemsize = max(jnp.dtype(hidden.dtype).itemsize, jnp.dtype(classifier.dtype).itemsize)
        bn, bv, vmem = _plan_mosaic_vmem(block_sizes, n, v, d, itemsize, name)
        k = _KCfg(spec, bn=bn, bv=bv, bd=d, interpret=interp, cdt=cdt, kernel="mosaic",
                  vmem=vmem)
    else:
        bs = block_sizes or BlockSizes()
        k = _KCfg(spec, bn=_fit(bs.block_n, n), bv=_fit(bs.block_v, v), bd=_fit(bs.block_d, d),
                  interpret=interp, cdt=cdt)
    return _cce(k, hidden, classifier, targets.astype(jnp.int32))
