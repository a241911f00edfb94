"""Ring attention: exact attention over a sequence split across a mesh axis.

Liu, Zaharia & Abbeel, "Ring Attention with Blockwise Transformers for
Near-Infinite Context" (2023); Li et al., "Sequence Parallelism: Long Sequence
Training from System Perspective" (2021).

Each device of the ``axis`` ring holds one block of queries and one block of
keys/values.  For ``n`` steps it attends its queries to the KV block it holds,
folds the result into an online-softmax accumulator (running max, sum and
weighted values, as in FlashAttention) and passes the KV block, with its global
positions, to the next device (``lax.ppermute``).  After ``n`` steps every query
has seen every key; causality is decided by global positions, so the result
equals full attention while no device ever holds more than two KV blocks.
Sequence lengths that the axis does not divide are padded: padded keys carry
the position ``INT32_MAX`` and are always masked, padded queries are sliced off.

    out = ring_attention(q, k, v, mesh=mesh, axis="context", causal=True)

Inside a sharded model (``ml.passes.shard(mesh, ml.shard.sp("context"))``) the
layers' training forward attends through it: the pass sets the model's static
``Dispatch.attention_hook`` to a :class:`RingAttention` (a hashable hook, so part
of the jit cache key).  :func:`use_ring_attention` is the trace-time form for
direct calls of :func:`memlab.nn.attention`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

__all__ = ["ring_attention", "RingAttention", "use_ring_attention", "PAD_POSITION"]

PAD_POSITION = int(np.iinfo(np.int32).max)  # keys here are never attended


def _check(q, k, v, mesh, axis, window, segment_ids):
    if not isinstance(mesh, Mesh):
        raise TypeError(f"ring_attention: mesh must be a jax.sharding.Mesh, got "
                        f"{type(mesh).__name__}")
    if axis not in mesh.axis_names:
        raise ValueError(f"ring_attention: axis={axis!r} is not a mesh axis; the mesh has "
                         f"{tuple(mesh.axis_names)}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"ring_attention: q, k, v must be [batch, seq, heads, head_dim]; got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"ring_attention: shapes do not agree: q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"ring_attention: {q.shape[2]} query heads are not a multiple of "
                         f"{k.shape[2]} KV heads (grouped-query attention)")
    if window is not None or segment_ids is not None:
        raise ValueError("ring_attention supports causal masks and explicit positions; sliding "
                         "windows and segment ids are not implemented (use impl='chunked' "
                         "without sequence parallelism)")


def _pad_to(x, n, axis, value):
    size = x.shape[axis]
    extra = (-size) % n
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _ring_local(q, k, v, qp, kp, *, axis, n, causal, scale):
    """One device: its query block against every KV block passed around the ring."""
    b, t, h, d = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    g = h // hkv
    qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d) * scale
    perm = [(j, (j + 1) % n) for j in range(n)]

    def body(carry, _):
        kb, vb, kpb, m, l, acc = carry
        s = jnp.einsum("btkgd,bskd->bkgts", qf, kb.astype(jnp.float32))
        valid = (kpb != PAD_POSITION)[:, None, None, None, :]
        if causal:
            valid = valid & (qp[:, None, None, :, None] >= kpb[:, None, None, None, :])
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m - m_safe)
        l = l * corr + jnp.sum(p, axis=-1)
        corr_t = jnp.transpose(corr, (0, 3, 1, 2))[..., None]  # [b, t, k, g, 1]
        acc = acc * corr_t + jnp.einsum("bkgts,bskd->btkgd", p, vb.astype(jnp.float32))
        kb, vb, kpb = (jax.lax.ppermute(a, axis, perm) for a in (kb, vb, kpb))
        return (kb, vb, kpb, m_new, l, acc), None

    init = (k, v, kp, jnp.full((b, hkv, g, t), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, g, t), jnp.float32), jnp.zeros((b, t, hkv, g, dv), jnp.float32))
    (_, _, _, _, l, acc), _ = jax.lax.scan(body, init, None, length=n)
    l_t = jnp.transpose(l, (0, 3, 1, 2))[..., None]
    out = jnp.where(l_t > 0, acc / jnp.where(l_t > 0, l_t, 1.0), 0.0)
    return out.reshape(b, t, h, dv).astype(q.dtype)


def ring_attention(q, k, v, *, mesh: Mesh, axis: str, causal: bool = False,
                   q_positions=None, kv_positions=None, scale: Optional[float] = None,
                   batch_axes: Sequence[str] = (), window=None, segment_ids=None) -> jax.Array:
    """Attention ``[B, T, H, Dv]`` with the sequence split over mesh axis ``axis``.

    Mask semantics as :func:`memlab.nn.attention`: default positions are
    bottom-right aligned (query ``i`` sits at ``S - T + i``); explicit
    ``q_positions [B, T]`` / ``kv_positions [B, S]`` are global positions, and
    keys at ``INT32_MAX`` are never attended.  ``batch_axes`` split the batch too
    (when they divide it).  Lengths the axis does not divide are padded.
    """
    _check(q, k, v, mesh, axis, window, segment_ids)
    b, t, h, d = q.shape
    s = k.shape[1]
    n = mesh.shape[axis]
    scale = float(d) ** -0.5 if scale is None else float(scale)
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + (s - t), (b, t))
    if kv_positions is None:
        kv_positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_positions = jnp.broadcast_to(jnp.asarray(q_positions, jnp.int32), (b, t))
    kv_positions = jnp.broadcast_to(jnp.asarray(kv_positions, jnp.int32), (b, s))
    qp_, kp_ = _pad_to(q_positions, n, 1, 0), _pad_to(kv_positions, n, 1, PAD_POSITION)
    qq, kk, vv = _pad_to(q, n, 1, 0), _pad_to(k, n, 1, 0), _pad_to(v, n, 1, 0)
    batch_axes = tuple(batch_axes)
    nb = int(np.prod([mesh.shape[a] for a in batch_axes])) if batch_axes else 1
    bax = None if not batch_axes or b % nb else (
        batch_axes[0] if len(batch_axes) == 1 else batch_axes)
    xs, ps = P(bax, axis), P(bax, axis)
    fn = jax.shard_map(functools.partial(_ring_local, axis=axis, n=n, causal=causal, scale=scale),
                       mesh=mesh, in_specs=(xs, xs, xs, ps, ps), out_specs=xs, check_vma=False)
    out = fn(qq, kk, vv, qp_, kp_)
    return out[:, :t]


@dataclasses.dataclass(frozen=True)
class RingAttention:
    """The attention hook ``hook(q, k, v, scale=, **mask)`` running :func:`ring_attention`
    over ``mesh`` axis ``axis`` (batch split over ``batch_axes``).  Frozen and hashable:
    a ``memlab.dispatch.Dispatch.attention_hook``, so part of the jit cache key."""

    mesh: Mesh
    axis: str
    batch_axes: tuple = ()

    def __post_init__(self):
        if not isinstance(self.mesh, Mesh):
            raise TypeError(f"RingAttention: mesh must be a jax.sharding.Mesh, got "
                            f"{type(self.mesh).__name__}")
        if self.axis not in self.mesh.axis_names:
            raise ValueError(f"RingAttention: axis={self.axis!r} is not a mesh axis; the mesh "
                             f"has {tuple(self.mesh.axis_names)}")
        object.__setattr__(self, "batch_axes", tuple(self.batch_axes or ()))

    def __call__(self, q, k, v, *, scale=None, **mask):
        return ring_attention(q, k, v, mesh=self.mesh, axis=self.axis,
                              batch_axes=self.batch_axes, scale=scale, **mask)


@contextlib.contextmanager
def use_ring_attention(mesh: Mesh, axis: str, batch_axes: Sequence[str] = ()):
    """Inside, every :func:`memlab.nn.attention` call runs as :func:`ring_attention`.

    A trace-time override (not part of any jit cache key); a sharded model carries
    its :class:`RingAttention` as static data (``model.dispatch.attention_hook``)."""
    from memlab.nn.attention import attention_hook

    with attention_hook(RingAttention(mesh, axis, tuple(batch_axes))):
        yield
