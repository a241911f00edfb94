"""The uncompressed cache as a policy: the baseline every other policy is measured against."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from memlab.kv import POLICIES
from memlab.kv.base import MAX_POS, Dims, KVPolicy, attend, prompt_positions, write_tokens


@POLICIES.register("dense")
@dataclasses.dataclass(frozen=True)
class Dense(KVPolicy):
    """Every token's K and V in the cache dtype; slot index = position."""

    name = "dense"
    dtype: str | None = None      # storage dtype; None = the model's compute dtype

    def _dtype(self, dims):
        return jnp.dtype(self.dtype or dims.dtype)

    def init(self, dims: Dims):
        shape = (dims.batch, dims.max_len, dims.n_kv_heads, dims.head_dim)
        return {"k": jnp.zeros(shape, self._dtype(dims)), "v": jnp.zeros(shape, self._dtype(dims))}

    def nbytes(self, dims: Dims) -> int:
        return 2 * dims.batch * dims.max_len * dims.n_kv_heads * dims.head_dim * self._dtype(dims).itemsize

    def prefill(self, state, q, k, v, ctx):
        slots = prompt_positions(ctx)                  # padding -> MAX_POS -> dropped
        state = {"k": write_tokens(state["k"], k, slots), "v": write_tokens(state["v"], v, slots)}
        return attend(q, k, v, ctx.positions, slots), state

    def decode(self, state, q, k, v, ctx):
        state = {"k": write_tokens(state["k"], k, ctx.positions),
                 "v": write_tokens(state["v"], v, ctx.positions)}
        s = state["k"].shape[1]
        slot = jnp.arange(s, dtype=jnp.int32)[None, :]
        kv_pos = jnp.where(slot <= ctx.positions[:, -1:], slot, MAX_POS)
        return attend(q, state["k"], state["v"], ctx.positions, kv_pos), state
