"""Block-causal attention in plain XLA: the CPU path for causal self-attention.

Causal attention over a sequence with its own keys (``T == S``, default positions)
needs only the scores on and below the diagonal.  The queries are cut into blocks of
``block`` rows; block ``i`` (rows ``r0 .. r1-1``) attends keys ``lo .. r1-1`` only,
where ``lo`` is 0, or ``r0 - window + 1`` with a sliding window.  Per block:

* the ``G = H / Hkv`` query heads of a KV head are stacked along the rows, so the
  scores are one ``[G * rows, keys]`` matrix product per KV head (no repeated K/V);
* the mask is an ``iota`` comparison, the softmax keeps its row max and sum, and the
  division is applied to the ``[rows, Dv]`` output rather than to the scores.

This computes about half of the ``T x T`` scores and exponentials of a masked full
softmax (less with a window), with matmul-shaped operands that XLA:CPU runs as GEMMs.
The blocks are a static Python loop, so each has static shapes.

The gradient is a ``custom_vjp`` in the FlashAttention-2 manner (Dao 2023): the forward
keeps only the output and each row's log-sum-exp; the backward recomputes each block's
probabilities from them.  XLA's scheduler may still overlap several blocks of the
backward, so above :data:`BACKWARD_MAX_SCORE_BYTES` of full scores the gradient is
taken through :func:`memlab_kernels.chunked_attention.chunked_attention` instead
(O(T) memory).

Semantics are those of :func:`memlab_kernels.attention_reference.attention_reference`
with ``causal=True`` (and ``window``), ``q_positions = kv_positions = arange(T)``.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from memlab_kernels.attention_reference import check_attention_args
from memlab_kernels.chunked_attention import chunked_attention

DEFAULT_BLOCK = 128
#: Above this many bytes of ``[B, H, T, T]`` float32 scores the gradient is the chunked
#: attention's (O(T) memory); below, the blocked backward (faster, it keeps less than
#: the whole score matrix alive at once, but more than one block).
BACKWARD_MAX_SCORE_BYTES = 64 * 2**20


def blocked_attention(q, k, v, *, window: Optional[int] = None, scale: Optional[float] = None,
                      block: int = DEFAULT_BLOCK) -> jax.Array:
    """Causal self-attention ``[B, T, H, Dv]`` of ``q [B, T, H, D]`` over ``k [B, T, Hkv, D]``,
    ``v [B, T, Hkv, Dv]``; ``window``: a query at ``p`` sees keys in ``(p - window, p]``."""
    b, t, h, d, s, hkv, dv = check_attention_args(q, k, v, causal=True, window=window,
                                                  name="blocked_attention")
    if s != t:
        raise ValueError(f"blocked_attention: keys must be the queries' own sequence (T == S); "
                         f"got T={t}, S={s}. Use memlab.nn.attention for a cache.")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"blocked_attention: block must be a positive int, got {block!r}")
    scale = d ** -0.5 if scale is None else float(scale)
    return _blocked(q, k, v, None if window is None else int(window), scale, int(block))


def _blocks(t, window, block):
    """``(r0, r1, lo)``: query rows ``r0..r1-1`` and their first visible key ``lo``, the
    last rows first: each block's scores are no larger than the previous block's, so a
    freed block's space fits the next one in XLA's buffer assignment."""
    for r0 in reversed(range(0, t, block)):
        r1 = min(r0 + block, t)
        yield r0, r1, (0 if window is None else max(0, r0 - window + 1))


def _visible(r0, r1, lo, window):
    qpos = jnp.arange(r0, r1, dtype=jnp.int32)[:, None]
    kpos = jnp.arange(lo, r1, dtype=jnp.int32)[None, :]
    vis = kpos <= qpos                                   # the diagonal key is always visible
    if window is not None:
        vis &= kpos > qpos - window
    return vis


def _heads(q, k, v, scale):
    """``q * scale`` as ``[B, Hkv, G, T, D]``, ``k``/``v`` as ``[B, Hkv, S, D]``."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    qh = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, hkv, h // hkv, d).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _scores(qh, kh, r0, r1, lo, window):
    b, hkv, g, _, d = qh.shape
    rows, keys = r1 - r0, r1 - lo
    qb = qh[:, :, :, r0:r1].reshape(b, hkv, g * rows, d)
    sc = jnp.einsum("bkmd,bksd->bkms", qb, kh[:, :, lo:r1], preferred_element_type=jnp.float32)
    sc = sc.reshape(b, hkv, g, rows, keys)
    return jnp.where(_visible(r0, r1, lo, window), sc, -jnp.inf)


def _forward(q, k, v, window, scale, block):
    """``(out [B, Hkv, G, T, Dv] float32, lse [B, Hkv, G, T])``."""
    b, t = q.shape[:2]
    qh, kh, vh = _heads(q, k, v, scale)
    hkv, g, dv = kh.shape[1], qh.shape[2], v.shape[-1]
    outs, lses = [], []
    for r0, r1, lo in _blocks(t, window, block):
        sc = _scores(qh, kh, r0, r1, lo, window)
        top = jnp.max(sc, axis=-1, keepdims=True)
        p = jnp.exp(sc - top)
        total = jnp.sum(p, axis=-1, keepdims=True)
        rows, keys = r1 - r0, r1 - lo
        o = jnp.einsum("bkms,bksd->bkmd", p.reshape(b, hkv, g * rows, keys).astype(v.dtype),
                       vh[:, :, lo:r1], preferred_element_type=jnp.float32)
        outs.append(o.reshape(b, hkv, g, rows, dv) / total)
        lses.append((top + jnp.log(total))[..., 0])
    cat = lambda xs: jnp.concatenate(xs[::-1], axis=3) if len(xs) > 1 else xs[0]  # noqa: E731
    return cat(outs), cat(lses)


def _to_bthd(o, dtype):
    b, hkv, g, t, dv = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, hkv * g, dv).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _blocked(q, k, v, window, scale, block):
    return _to_bthd(_forward(q, k, v, window, scale, block)[0], q.dtype)


def _blocked_fwd(q, k, v, window, scale, block):
    out, lse = _forward(q, k, v, window, scale, block)
    return _to_bthd(out, q.dtype), (q, k, v, out, lse)


def _blocked_bwd(window, scale, block, res, dout):
    q, k, v, out, lse = res
    b, t, h, d = q.shape
    if b * h * t * t * 4 > BACKWARD_MAX_SCORE_BYTES:
        # long sequences: the chunked attention's O(T) gradient (memlab_kernels.chunked_attention)
        _, vjp = jax.vjp(lambda *a: chunked_attention(*a, causal=True, window=window,
                                                       scale=scale), q, k, v)
        return vjp(dout)
    hkv, dv = k.shape[2], v.shape[-1]
    g = h // hkv
    qh, kh, vh = _heads(q, k, v, scale)
    do = dout.astype(jnp.float32).reshape(b, t, hkv, g, dv).transpose(0, 2, 3, 1, 4)
    delta = jnp.sum(do * out, axis=-1)                    # [B, Hkv, G, T]
    dqs, dk, dvv = [], jnp.zeros(kh.shape, jnp.float32), jnp.zeros(vh.shape, jnp.float32)
    for r0, r1, lo in _blocks(t, window, block):
        rows, keys = r1 - r0, r1 - lo
        p = jnp.exp(_scores(qh, kh, r0, r1, lo, window) - lse[:, :, :, r0:r1, None])
        dob = do[:, :, :, r0:r1]
        pm = p.reshape(b, hkv, g * rows, keys)
        dvv = dvv.at[:, :, lo:r1].add(jnp.einsum("bkms,bkmd->bksd", pm,
                                                 dob.reshape(b, hkv, g * rows, dv)))
        dp = jnp.einsum("bkgrd,bksd->bkgrs", dob, vh[:, :, lo:r1].astype(jnp.float32))
        ds = (p * (dp - delta[:, :, :, r0:r1, None])).reshape(b, hkv, g * rows, keys)
        dqs.append(jnp.einsum("bkms,bksd->bkmd", ds, kh[:, :, lo:r1].astype(jnp.float32))
                   .reshape(b, hkv, g, rows, d))
        qb = qh[:, :, :, r0:r1].reshape(b, hkv, g * rows, d).astype(jnp.float32)
        dk = dk.at[:, :, lo:r1].add(jnp.einsum("bkms,bkmd->bksd", ds, qb))
    dq = (jnp.concatenate(dqs[::-1], axis=3) if len(dqs) > 1 else dqs[0]) * scale
    return (_to_bthd(dq, q.dtype), dk.transpose(0, 2, 1, 3).astype(k.dtype),
            dvv.transpose(0, 2, 1, 3).astype(v.dtype))


_blocked.defvjp(_blocked_fwd, _blocked_bwd)
