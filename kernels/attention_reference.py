"""Naive (T x S materializing) attention: the mask semantics every attention kernel follows.

Layout is ``[batch, seq, heads, head_dim]`` throughout (as in
``jax.nn.dot_product_attention`` and memlab's models):

* ``q``: ``[B, T, H, D]``; ``k``: ``[B, S, Hkv, D]``; ``v``: ``[B, S, Hkv, Dv]``.
  Grouped-query attention: ``H % Hkv == 0`` and query head ``h`` reads KV head
  ``h // (H // Hkv)`` (MQA is ``Hkv == 1``).
* ``scale`` defaults to ``1 / sqrt(D)``.
* Positions: ``q_positions`` ``[B, T]`` and ``kv_positions`` ``[B, S]`` (int32).
  By default keys sit at ``0..S-1`` and queries are aligned to the *end* of the
  keys, ``S-T..S-1`` (FlashAttention-2's bottom-right convention, so a single
  decode query sees the whole cache).  Explicit positions express anything
  else: e.g. a KV cache whose empty slots carry position ``INT32_MAX`` is
  masked by ``causal=True``.
* ``causal``: key ``j`` is visible to query ``i`` iff ``kv_pos[j] <= q_pos[i]``.
* ``window=w`` (sliding window, Mistral/Longformer style): additionally
  ``q_pos[i] - kv_pos[j] < w``, and when not causal also
  ``kv_pos[j] - q_pos[i] < w``.  ``1 <= w <= S``.
* ``segment_ids``: ``[B, T]`` when ``T == S`` (packed sequences, one id per
  token), or a pair ``(q_segment_ids [B, T], kv_segment_ids [B, S])``; key
  ``j`` is visible to query ``i`` iff their segment ids are equal.
* A query that sees no key at all gets output ``0`` and log-sum-exp ``-inf``
  (and zero gradients); it never produces NaN.

``lse`` is ``log(sum_j exp(scale * q.k_j))`` over visible keys, float32 ``[B, H, T]``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ._common import acc_dtype

__all__ = ["AttentionMask", "attention_reference", "check_attention_args", "make_mask"]

SegmentIds = Union[jax.Array, Sequence[jax.Array], None]
_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
           jnp.dtype(jnp.float64))


class AttentionMask:
    """Resolved mask arguments: positions always explicit, segment ids a pair or None."""

    def __init__(self, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                 causal: bool, window: Optional[int]):
        self.q_positions = q_positions
        self.kv_positions = kv_positions
        self.q_segment_ids = q_segment_ids
        self.kv_segment_ids = kv_segment_ids
        self.causal = causal
        self.window = window

    def block(self, q_pos, kv_pos, q_seg=None, kv_seg=None):
        """Boolean visibility ``[..., Tq, Sk]`` for position (and segment) slices ``[..., Tq]``, ``[..., Sk]``."""
        qp, kp = q_pos[..., :, None], kv_pos[..., None, :]
        vis = jnp.ones(jnp.broadcast_shapes(qp.shape, kp.shape), bool)
        if self.causal:
            vis &= kp <= qp
        if self.window is not None:
            vis &= (qp - kp) < self.window
            if not self.causal:
                vis &= (kp - qp) < self.window
        if q_seg is not None:
            vis &= q_seg[..., :, None] == kv_seg[..., None, :]
        return vis


def check_attention_args(q, k, v, *, causal=False, window=None, segment_ids: SegmentIds = None,
                         q_positions=None, kv_positions=None, same_dtype: bool = True,
                         name: str = "attention"):
    """Validate shapes/dtypes/masks and return ``(B, T, H, D, S, Hkv, Dv)``.

    Raises ``ValueError``/``TypeError`` naming the argument and the fix.
    """
    for arg, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 4:
            raise ValueError(f"{name}: {arg} must be [batch, seq, heads, head_dim], got shape {a.shape}.")
        if jnp.dtype(a.dtype) not in _FLOATS:
            raise TypeError(f"{name}: {arg} has dtype {a.dtype}; use float32, bfloat16 or float16.")
    b, t, h, d = q.shape
    bk, s, hkv, dk = k.shape
    if v.shape[:3] != (bk, s, hkv):
        raise ValueError(f"{name}: v shape {v.shape} must match k {k.shape} in batch, seq and heads.")
    if bk != b:
        raise ValueError(f"{name}: q batch {b} != k batch {bk}.")
    if dk != d:
        raise ValueError(f"{name}: q head_dim {d} != k head_dim {dk}.")
    if h % hkv:
        raise ValueError(
            f"{name}: query heads H={h} must be a multiple of KV heads Hkv={hkv} (grouped-query "
            f"attention); use Hkv in {[x for x in range(1, h + 1) if h % x == 0]}.")
    if same_dtype and not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); "
                        "cast them to one dtype first.")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"{name}: window={window!r} must be a positive int or None.")
        if window > s:
            raise ValueError(f"{name}: window={window} is larger than the key sequence S={s}; "
                             f"use window <= {s} or window=None.")
    if segment_ids is not None:
        qs, ks = _split_segments(segment_ids, t, s, name)
        if qs.shape != (b, t) or ks.shape != (b, s):
            raise ValueError(f"{name}: segment ids shapes {qs.shape}, {ks.shape} must be "
                             f"[B, T]={(b, t)} and [B, S]={(b, s)}.")
    for arg, p, shape in (("q_positions", q_positions, (b, t)), ("kv_positions", kv_positions, (b, s))):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"{name}: {arg} shape {tuple(p.shape)} must be {shape}.")
    return b, t, h, d, s, hkv, v.shape[-1]


def _split_segments(segment_ids, t, s, name):
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(f"{name}: segment_ids must be one [B, T] array or a pair (q_ids, kv_ids).")
        return segment_ids[0], segment_ids[1]
    if t != s:
        raise ValueError(f"{name}: a single segment_ids array needs T == S (got T={t}, S={s}); "
                         "pass (q_segment_ids, kv_segment_ids).")
    return segment_ids, segment_ids


def make_mask(b, t, s, *, causal=False, window=None, segment_ids: SegmentIds = None,
              q_positions=None, kv_positions=None) -> AttentionMask:
    """Resolve defaults (bottom-right aligned positions) into an :class:`AttentionMask`."""
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    qs = ks = None
    if segment_ids is not None:
        qs, ks = _split_segments(segment_ids, t, s, "attention")
        qs, ks = jnp.asarray(qs, jnp.int32), jnp.asarray(ks, jnp.int32)
    return AttentionMask(jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32),
                         qs, ks, causal, window)


def attention_reference(q, k, v, *, causal: bool = False, window: Optional[int] = None,
                        segment_ids: SegmentIds = None, q_positions=None, kv_positions=None,
                        scale: Optional[float] = None, return_lse: bool = False,
                        precision: Any = jax.lax.Precision.HIGHEST):
    """Attention that materializes the ``[B, H, T, S]`` scores (the spec, not a kernel).

    Computes in float32 (or float64 when given float64) and returns
    ``q.dtype``; with ``return_lse`` also the float32 ``[B, H, T]`` log-sum-exp.
    """
    b, t, h, d, s, hkv, dv = check_attention_args(
        q, k, v, causal=causal, window=window, segment_ids=segment_ids,
        q_positions=q_positions, kv_positions=kv_positions, same_dtype=False)
    m = make_mask(b, t, s, causal=causal, window=window, segment_ids=segment_ids,
                  q_positions=q_positions, kv_positions=kv_positions)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = acc_dtype(q.dtype)
    g = h // hkv
    qg = q.astype(acc).reshape(b, t, hkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(acc), precision=precision) * scale
    vis = m.block(m.q_positions, m.kv_positions, m.q_segment_ids, m.kv_segment_ids)  # [B,T,S]
    vis = vis[:, None, None]
    scores = jnp.where(vis, scores, -jnp.inf)
    mx = jnp.max(scores, axis=-1, keepdims=True)
    mx_safe = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(vis, jnp.exp(scores - mx_safe), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(l > 0, l, 1.0)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(acc), precision=precision)
    out = out.reshape(b, t, h, dv).astype(q.dtype)
    if not return_lse:
        return out
    lse = jnp.where(l[..., 0] > 0, jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)) + mx_safe[..., 0],
                    -jnp.inf)
    return out, lse.reshape(b, h, t).astype(jnp.float32)
