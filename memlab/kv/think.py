"""ThinK: prune the key cache's least important channels, chosen by the prompt's last queries.

Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning"
(arXiv:2407.21018).  Key channels differ widely in how much they contribute
to ``q . k``; ThinK scores each channel ``c`` of each KV head with the
observation window's queries, ``score_c = || Q_win[:, c] K[:, c]^T ||_F =
|| Q_win[:, c] || * || K[:, c] ||`` (the Frobenius norm of the rank-one outer
product), keeps the ``round(keep_ratio * D)`` highest-scoring channels and
drops the others from the cache: the attention logits become
``q[kept] . k[kept]`` (scaled by the *full* ``1 / sqrt(D)``).

This policy, per layer, row and KV head:

* at prefill, ``Q_win`` is the last ``window`` valid prompt queries of the query
  heads that read this KV head (grouped-query attention: the group's heads
  stacked), ``K`` the valid prompt keys, both after RoPE;
* the kept channel indices ``idx [B, Hkv, m]`` (ascending) are stored with the
  pruned keys ``[B, S, Hkv, m]``; values stay whole;
* decode tokens' keys are pruned to the same channels, and each query head
  gathers its KV head's kept channels before the dot product.

The prompt attends to itself unpruned (ThinK prunes after the prefill
forward).  ``keep_ratio=1`` keeps every channel (a reordering of the dense
cache).  Not done: ThinK's value-channel pruning and its variant that keeps the
most recent tokens' keys whole.

Layout (one layer; ``S = max_len`` slots, slot = position; ``m = max(1,
round(keep_ratio * D))``)::

    k    cache dtype [B, S, Hkv, m]
    v    cache dtype [B, S, Hkv, D]
    idx  int32       [B, Hkv, m]

``nbytes = B * S * Hkv * (m + D) * t + 4 * B * Hkv * m`` (``t`` the cache dtype's
itemsize): keys shrink by ``keep_ratio``, the cache by about ``(1 - keep_ratio) / 2``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from memlab.kv.base import POLICIES
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions, write_tokens


@POLICIES.register("think")
@dataclasses.dataclass(frozen=True)
class ThinK(KVPolicy):
    """Query-driven key-channel pruning (see the module docstring).

    Args:
      keep_ratio: share of each KV head's key channels kept, in (0, 1].
      window: observation window, the last ``window`` prompt queries scoring the channels.
    """

    name = "think"
    keep_ratio: float = 0.5
    window: int = 32

    def __post_init__(self):
        r = self.keep_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise ValueError(f"ThinK: keep_ratio={r!r} must be in (0, 1] (share of key channels "
                             "kept, e.g. 0.5).")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"ThinK: window={self.window!r} must be a positive int (queries "
                             "that score the channels, e.g. 32).")

    def kept(self, head_dim: int) -> int:
        """Key channels kept per KV head: ``max(1, round(keep_ratio * head_dim))``."""
        return max(1, min(head_dim, round(self.keep_ratio * head_dim)))

    def init(self, dims: Dims):
        self.validate(dims)
        b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
        m = self.kept(d)
        return {"k": jnp.zeros((b, s, h, m), dims.dtype), "v": jnp.zeros((b, s, h, d), dims.dtype),
                "idx": jnp.zeros((b, h, m), jnp.int32)}

    def nbytes(self, dims: Dims) -> int:
        b, s, h, d = dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim
        m, t = self.kept(d), jnp.dtype(dims.dtype).itemsize
        return b * s * h * (m + d) * t + 4 * b * h * m

    def channel_scores(self, q, k, n_new):
        """``||Q_win[:, c]|| * ||K[:, c]||`` per row, KV head and channel, ``[B, Hkv, D]`` float32."""
        b, t, h, d = q.shape
        hkv = k.shape[2]
        pos = jnp.arange(t)[None, :]
        valid = pos < n_new[:, None]
        win = valid & (pos >= n_new[:, None] - self.window)
        q32 = jnp.where(win[:, :, None, None], q.astype(jnp.float32), 0.0)
        k32 = jnp.where(valid[:, :, None, None], k.astype(jnp.float32), 0.0)
        qn = jnp.sum(q32.reshape(b, t, hkv, h // hkv, d) ** 2, axis=(1, 3))
        kn = jnp.sum(k32 ** 2, axis=1)
        return jnp.sqrt(qn) * jnp.sqrt(kn)

    def _prune(self, k, idx):
        return jnp.take_along_axis(k, idx[:, None], axis=-1)

    def prefill(self, state, q, k, v, ctx):
        m = state["idx"].shape[-1]
        _, idx = jax.lax.top_k(self.channel_scores(q, k, ctx.n_new), m)
        idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
        slots = prompt_positions(ctx)
        new = {"k": write_tokens(state["k"], self._prune(k, idx), slots),
               "v": write_tokens(state["v"], v, slots), "idx": idx}
        return attend(q, k, v, ctx.positions, slots), new

    def decode(self, state, q, k, v, ctx):
        from memlab.nn.attention import attention
        idx = state["idx"]
        new = {"k": write_tokens(state["k"], self._prune(k, idx), ctx.positions),
               "v": write_tokens(state["v"], v, ctx.positions), "idx": idx}
        b, s = new["k"].shape[:2]
        h, d = q.shape[2], q.shape[3]
        q_idx = jnp.repeat(idx, h // idx.shape[1], axis=1)                 # [B, H, m]
        q_kept = jnp.take_along_axis(q, q_idx[:, None], axis=-1)
        slot = jnp.arange(s, dtype=jnp.int32)[None, :]
        kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
        out = attention(q_kept, new["k"].astype(q.dtype), new["v"].astype(q.dtype), causal=True,
                        q_positions=ctx.positions, kv_positions=jnp.broadcast_to(kv_pos, (b, s)),
                        scale=1.0 / math.sqrt(d))
        return out, new
