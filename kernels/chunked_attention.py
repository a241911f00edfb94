"""Memory-efficient attention in plain JAX: chunked queries and keys under ``lax.scan``.

Rabe & Staats, "Self-attention Does Not Need O(n^2) Memory" (2021): split the
queries into chunks of ``q_chunk`` and the keys/values into chunks of
``kv_chunk``; for each query chunk scan over the key chunks keeping a running
maximum ``m``, normaliser ``l`` and un-normalised output ``acc`` (the online
softmax that FlashAttention later fused into one kernel).  Only one
``[B, H, q_chunk, kv_chunk]`` block of scores exists at a time, so the
attention's temporary memory is ``O(T * D + q_chunk * kv_chunk)`` instead of
``O(T * S)``.

This is the path used where Pallas cannot lower (CPU), so a whole model runs in
O(T) attention memory on every backend.  It accepts exactly the arguments and
mask semantics of :mod:`memlab_kernels.attention_reference` (GQA, causal,
sliding window, segment ids, explicit positions, bottom-right default
positions, fully masked rows -> 0).

Gradient (``jax.custom_vjp``): autodiff of the scans would save every score
block for the backward pass -- the O(T * S) memory again.  Instead the forward
saves only ``out`` and the float32 log-sum-exp ``lse``; the backward recomputes
each score block from ``q``, ``k`` and ``lse`` (``p = exp(s - lse)``) and uses
``delta = rowsum(dO * O)`` (FlashAttention-2's form of the softmax Jacobian):
``dv += p^T dO``, ``ds = p * (dO v^T - delta)``, ``dq += scale * ds k``,
``dk += scale * ds^T q``.  One pass: an outer scan over key chunks carries
``dq`` (float32, ``[B, T, H, D]``), an inner scan over query chunks carries the
chunk's ``dk``/``dv``.  Memory of the backward is O(T * D) as well.

Blocks that the mask hides entirely (above the causal diagonal, outside the
window, between different segments) are skipped with ``lax.cond``: causal
attention does about half the work of the full square.

Ragged sizes: T and S are padded up to multiples of the chunks; padded keys are
masked and padded query rows sliced off.  Chunks larger than the sequence are
shrunk to it.

Numerics: scores and the softmax statistics are float32; ``p`` is cast to the
value dtype before ``p @ v`` (bf16 inputs run bf16 x bf16 -> f32 products), the
accumulators are float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._common import acc_dtype, cdiv
from .attention_reference import check_attention_args, make_mask

__all__ = ["chunked_attention", "chunked_attention_with_lse"]

_NEG = -jnp.inf


def _check_chunk(name, c):
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
        raise ValueError(f"chunked_attention: {name}={c!r} must be a positive int (e.g. 512).")


def _layout(q, k, v, mask, q_chunk, kv_chunk):
    """Pad to the chunk grid and reshape to chunk-major arrays."""
    b, t, h, d = q.shape
    s, hkv, dv = k.shape[1], k.shape[2], v.shape[-1]
    qc, kc = min(q_chunk, t), min(kv_chunk, s)
    tp, sp = cdiv(t, qc) * qc, cdiv(s, kc) * kc
    nq, nk = tp // qc, sp // kc

    def pad(a, n, axis=1, value=0):
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, n - a.shape[axis])
        return jnp.pad(a, widths, constant_values=value)

    g = h // hkv
    qs = pad(q, tp).reshape(b, nq, qc, hkv, g, d).transpose(1, 0, 2, 3, 4, 5)
    ks = pad(k, sp).reshape(b, nk, kc, hkv, d).transpose(1, 0, 2, 3, 4)
    vs = pad(v, sp).reshape(b, nk, kc, hkv, dv).transpose(1, 0, 2, 3, 4)
    qpos = pad(mask.q_positions, tp).reshape(b, nq, qc).transpose(1, 0, 2)
    kpos = pad(mask.kv_positions, sp).reshape(b, nk, kc).transpose(1, 0, 2)
    kvalid = pad(jnp.ones((b, s), bool), sp, value=False).reshape(b, nk, kc).transpose(1, 0, 2)
    if mask.q_segment_ids is not None:
        qseg = pad(mask.q_segment_ids, tp).reshape(b, nq, qc).transpose(1, 0, 2)
        kseg = pad(mask.kv_segment_ids, sp).reshape(b, nk, kc).transpose(1, 0, 2)
    else:
        qseg = kseg = None
    return dict(q=qs, k=ks, v=vs, qpos=qpos, kpos=kpos, kvalid=kvalid, qseg=qseg, kseg=kseg,
                dims=(b, t, h, d, s, hkv, dv, g, qc, kc, nq, nk))


def _visible(mask, qpos, kpos, kvalid, qseg, kseg):
    vis = mask.block(qpos, kpos, qseg, kseg)            # [B, qc, kc]
    return vis & kvalid[:, None, :]


def _opaque(step):
    """Keep the forward scan out of any enclosing linearization.

    A custom_vjp forward that runs inside another differentiated ``lax.scan``
    (a model's scan over layers) is partially evaluated with that scan, and JAX
    then stacks the inner scans' intermediates (every score block) as
    residuals although the custom backward never reads them.  Checkpointing
    the step with nothing saveable stops that: nothing inside it is saved.
    """
    return jax.checkpoint(step, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)


def _scores(qb, kb, scale, precision):
    # qb [B, qc, Hkv, G, D], kb [B, kc, Hkv, D] -> [B, Hkv, G, qc, kc] float32
    return jnp.einsum("bqkgd,bskd->bkgqs", qb, kb, precision=precision,
                      preferred_element_type=acc_dtype(qb.dtype)) * scale


def _forward(q, k, v, mask, scale, q_chunk, kv_chunk, precision):
    L = _layout(q, k, v, mask, q_chunk, kv_chunk)
    b, t, h, d, s, hkv, dv, g, qc, kc, nq, nk = L["dims"]
    has_seg = L["qseg"] is not None
    adt = acc_dtype(q.dtype)

    def q_step(_, qi):
        qb, qpos = qi[0], qi[1]
        qseg = qi[2] if has_seg else None

        def kv_step(carry, ki):
            acc, m, l = carry
            kb, vb, kpos, kvalid = ki[:4]
            kseg = ki[4] if has_seg else None
            vis = _visible(mask, qpos, kpos, kvalid, qseg, kseg)[:, None, None]  # [B,1,1,qc,kc]

            def compute(carry):
                acc, m, l = carry
                sc = jnp.where(vis, _scores(qb, kb, scale, precision), _NEG)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(vis, jnp.exp(sc - m_safe[..., None]), 0.0)
                alpha = jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe)
                l = l * alpha + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb, precision=precision,
                                preferred_element_type=adt)
                return acc * alpha[..., None] + pv, m_new, l

            return lax.cond(jnp.any(vis), compute, lambda c: c, (acc, m, l)), None

        init = (jnp.zeros((b, hkv, g, qc, dv), adt),
                jnp.full((b, hkv, g, qc), _NEG, adt),
                jnp.zeros((b, hkv, g, qc), adt))
        xs = (L["k"], L["v"], L["kpos"], L["kvalid"]) + ((L["kseg"],) if has_seg else ())
        (acc, m, l), _ = lax.scan(kv_step, init, xs)
        ok = l > 0
        out = acc / jnp.where(ok, l, 1.0)[..., None]
        lse = jnp.where(ok, jnp.log(jnp.where(ok, l, 1.0)) + jnp.where(ok, m, 0.0), _NEG)
        return None, (out, lse)

    xs = (L["q"], L["qpos"]) + ((L["qseg"],) if has_seg else ())
    _, (out, lse) = lax.scan(_opaque(q_step), None, xs)
    # out [nq, B, Hkv, G, qc, Dv] -> [B, T, H, Dv];  lse [nq, B, Hkv, G, qc] -> [B, H, T]
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, nq * qc, h, dv)[:, :t].astype(q.dtype)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, h, nq * qc)[:, :, :t]
    return out, lse


def _backward(q, k, v, mask, scale, q_chunk, kv_chunk, precision, out, lse, dout):
    L = _layout(q, k, v, mask, q_chunk, kv_chunk)
    b, t, h, d, s, hkv, dv, g, qc, kc, nq, nk = L["dims"]
    has_seg = L["qseg"] is not None
    adt = acc_dtype(q.dtype)
    tp = nq * qc
    pad_t = lambda a: jnp.pad(a, [(0, 0), (0, tp - t)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    # delta = rowsum(dO * O) in float32, chunked like q: [nq, B, Hkv, G, qc]
    delta = jnp.sum(dout.astype(adt) * out.astype(adt), axis=-1)       # [B, T, H]
    delta = pad_t(delta).reshape(b, nq, qc, hkv, g).transpose(1, 0, 3, 4, 2)
    lse_c = jnp.pad(lse, [(0, 0), (0, 0), (0, tp - t)]).reshape(b, hkv, g, nq, qc).transpose(3, 0, 1, 2, 4)
    lse_c = jnp.where(jnp.isfinite(lse_c), lse_c, jnp.inf)     # exp(s - inf) = 0 for empty rows
    do_c = pad_t(dout).reshape(b, nq, qc, hkv, g, dv).transpose(1, 0, 2, 3, 4, 5)

    def kv_step(dq, ki):
        kb, vb, kpos, kvalid = ki[:4]
        kseg = ki[4] if has_seg else None

        def q_step(carry, qi):
            dk, dv_, dq = carry
            qb, qpos, dob, lseb, deltab, idx = qi[:6]
            qseg = qi[6] if has_seg else None
            vis = _visible(mask, qpos, kpos, kvalid, qseg, kseg)[:, None, None]

            def compute(carry):
                dk, dv_, dq = carry
                sc = _scores(qb, kb, scale, precision)
                p = jnp.where(vis, jnp.exp(sc - lseb[..., None]), 0.0)           # [B,Hkv,G,qc,kc]
                dv_ = dv_ + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dob.dtype), dob,
                                       precision=precision, preferred_element_type=adt)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", dob, vb, precision=precision,
                                preferred_element_type=adt)
                ds = p * (dp - deltab[..., None]) * scale
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(qb.dtype), qb,
                                     precision=precision, preferred_element_type=adt)
                dq_blk = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(kb.dtype), kb,
                                    precision=precision, preferred_element_type=adt)
                cur = lax.dynamic_index_in_dim(dq, idx, 0, keepdims=False)
                dq = lax.dynamic_update_index_in_dim(dq, cur + dq_blk, idx, 0)
                return dk, dv_, dq

            return lax.cond(jnp.any(vis), compute, lambda c: c, (dk, dv_, dq)), None

        init = (jnp.zeros((b, kc, hkv, d), adt), jnp.zeros((b, kc, hkv, dv), adt), dq)
        xs = (L["q"], L["qpos"], do_c, lse_c, delta, jnp.arange(nq)) + ((L["qseg"],) if has_seg else ())
        (dk, dv_, dq), _ = lax.scan(q_step, init, xs)
        return dq, (dk, dv_)

    dq0 = jnp.zeros((nq, b, qc, hkv, g, d), adt)
    xs = (L["k"], L["v"], L["kpos"], L["kvalid"]) + ((L["kseg"],) if has_seg else ())
    dq, (dk, dvv) = lax.scan(kv_step, dq0, xs)
    dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(b, tp, h, d)[:, :t].astype(q.dtype)
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(b, nk * kc, hkv, d)[:, :s].astype(k.dtype)
    dvv = dvv.transpose(1, 0, 2, 3, 4).reshape(b, nk * kc, hkv, dv)[:, :s].astype(v.dtype)
    return dq, dk, dvv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _attend(q, k, v, mask_arrays, causal, window, scale, q_chunk, kv_chunk, precision):
    mask = _mask_from(mask_arrays, causal, window)
    return _forward(q, k, v, mask, scale, q_chunk, kv_chunk, precision)[0]


def _attend_fwd(q, k, v, mask_arrays, causal, window, scale, q_chunk, kv_chunk, precision):
    mask = _mask_from(mask_arrays, causal, window)
    out, lse = _forward(q, k, v, mask, scale, q_chunk, kv_chunk, precision)
    return out, (q, k, v, mask_arrays, out, lse)


def _attend_bwd(causal, window, scale, q_chunk, kv_chunk, precision, res, dout):
    q, k, v, mask_arrays, out, lse = res
    mask = _mask_from(mask_arrays, causal, window)
    dq, dk, dv = _backward(q, k, v, mask, scale, q_chunk, kv_chunk, precision, out, lse, dout)
    zeros = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), mask_arrays)
    return dq, dk, dv, zeros


_attend.defvjp(_attend_fwd, _attend_bwd)


def _mask_from(arrays, causal, window):
    from .attention_reference import AttentionMask
    qpos, kpos, qseg, kseg = arrays
    return AttentionMask(qpos, kpos, qseg, kseg, causal, window)


def _prepare(q, k, v, causal, window, segment_ids, q_positions, kv_positions, scale,
             q_chunk, kv_chunk):
    b, t, h, d, s, hkv, dv = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, name="chunked_attention")
    _check_chunk("q_chunk", q_chunk)
    _check_chunk("kv_chunk", kv_chunk)
    m = make_mask(b, t, s, causal=causal, window=window, segment_ids=segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return (m.q_positions, m.kv_positions, m.q_segment_ids, m.kv_segment_ids), scale


def chunked_attention(q, k, v, *, causal: bool = False, window: Optional[int] = None,
                      segment_ids=None, q_positions=None, kv_positions=None,
                      scale: Optional[float] = None, q_chunk: int = 512, kv_chunk: int = 1024,
                      precision: Any = None) -> jax.Array:
    """O(T)-memory attention (forward and gradient); arguments as in ``attention_reference``.

    ``q_chunk`` x ``kv_chunk`` is the largest score block ever materialized
    (per batch row and head).
    """
    arrays, scale = _prepare(q, k, v, causal, window, segment_ids, q_positions, kv_positions,
                             scale, q_chunk, kv_chunk)
    return _attend(q, k, v, arrays, bool(causal), window, scale, int(q_chunk), int(kv_chunk),
                   precision)


def chunked_attention_with_lse(q, k, v, *, causal: bool = False, window: Optional[int] = None,
                               segment_ids=None, q_positions=None, kv_positions=None,
                               scale: Optional[float] = None, q_chunk: int = 512,
                               kv_chunk: int = 1024, precision: Any = None):
    """Forward only: ``(out, lse [B, H, T] float32)``."""
    arrays, scale = _prepare(q, k, v, causal, window, segment_ids, q_positions, kv_positions,
                             scale, q_chunk, kv_chunk)
    return _forward(q, k, v, _mask_from(arrays, bool(causal), window), scale, int(q_chunk),
                    int(kv_chunk), precision)
