"""StreamingLLM: attention sinks plus a recent window (Xiao et al. 2023, "Efficient
Streaming Language Models with Attention Sinks", arXiv:2309.17453).

``StreamingLLM(budget, sinks=4)`` keeps, per row and layer, the first ``sinks``
tokens of the sequence (the "attention sinks" that soak up the softmax mass)
and the most recent ``budget - sinks`` tokens; everything in between is
dropped.  The selection is by position only, so it is the same for every KV
head: the state is ``k, v [B, budget, Hkv, D]`` plus one ``pos [B, budget]``
int32 per row (see :mod:`memlab.kv._budget`).

Prefill attends to the whole prompt (uncompressed), then keeps positions
``< sinks`` and ``>= n_new - (budget - sinks)``.  Decode writes the new token
into a free slot, or else over the oldest non-sink token, then attends over the
``budget`` kept tokens with :func:`memlab.kv.base.attend`.

Positions: the paper re-assigns positions *within the cache* (the sinks at
0..sinks-1 and the window right after them, keys cached before RoPE and
rotated at attention time) so that relative distances never exceed the
cache size.  This variant keeps the **original** positions (keys cached after
RoPE, the query at its true position), as the H2O/SnapKV family does; it
matches the paper while the sequence stays within the model's trained
context, and beyond it behaves like plain sliding-window attention with
sinks at large relative distances (follow-up work on attention sinks discusses
both choices).

Bytes per layer: ``2 * B * budget * Hkv * D * itemsize + 4 * B * budget``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from memlab.kv.base import POLICIES
from memlab.kv._budget import BudgetPolicy, check_dtype, check_int, valid_prompt
from memlab.kv.base import MAX_POS


@POLICIES.register("streaming")
@dataclasses.dataclass(frozen=True)
class StreamingLLM(BudgetPolicy):
    """Keep the first ``sinks`` and the last ``budget - sinks`` tokens (original positions)."""

    name = "streaming"
    per_head = False
    budget: int
    sinks: int = 4
    dtype: Optional[str] = None   # storage dtype; None = the model's compute dtype

    def __post_init__(self):
        check_int("StreamingLLM", "budget", self.budget, 1)
        check_int("StreamingLLM", "sinks", self.sinks, 0)
        if self.budget <= self.sinks:
            raise ValueError(
                f"StreamingLLM: budget={self.budget} must be larger than sinks={self.sinks} (the "
                f"recent window has budget - sinks tokens); use budget >= {self.sinks + 1} or "
                "fewer sinks.")
        check_dtype("StreamingLLM", self.dtype)

    def prefill_priority(self, q, k, ctx, limit):
        j = jnp.arange(q.shape[1])[None, :]
        recent = j >= ctx.n_new[:, None] - (self.budget - self.sinks)
        keep = valid_prompt(ctx) & ((ctx.positions < self.sinks) | recent)
        return jnp.where(keep, 0.0, -jnp.inf)[:, None, :].astype(jnp.float32), None, None

    def evict_slot(self, state, pos, occupied, p, limit):
        cand = occupied & (pos >= self.sinks)
        return jnp.argmin(jnp.where(cand, pos, MAX_POS), axis=-1)
