"""H2O: heavy hitters plus a recent window (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models", arXiv:2306.14048; the same
accumulated-attention criterion as Scissorhands, Liu et al. 2023, arXiv:2305.17118).

``H2O(budget, recent=budget // 2)`` keeps, per row, layer **and KV head**, at
most ``budget`` tokens: the ``recent`` most recent ones and the
``budget - recent`` "heavy hitters" with the largest accumulated attention
score.  The score of a token is the sum, over every query that has attended to
it so far, of its attention probability, averaged over the query heads of the
KV group (GQA: query head ``h`` reads KV head ``h // (H // Hkv)``).  Selection
is per KV head, as in the reference implementation (which evicts per head), so
the state is (see :mod:`memlab.kv._budget`)::

    k, v   [B, budget, Hkv, D]   storage dtype (keys after RoPE, original positions)
    pos    [B, Hkv, budget]      int32, MAX_POS = empty
    score  [B, Hkv, budget]      float32 accumulated attention

Prefill: full causal attention over the prompt for the output; the scores
accumulate over all real prompt queries, computed in query chunks of
``chunk`` under ``lax.scan`` (a ``[B, H, chunk, T]`` block at a time, never
``T x T``; this is a second QK^T pass next to the output's attention).  Kept:
the last ``recent`` prompt tokens plus the top ``budget - recent`` of the others
by score (ties: lower position).  A row with at most ``budget`` real tokens
keeps them all.

Decode: a free slot takes the new token; otherwise, per KV head, the slot with
the lowest score among tokens outside the recent window is evicted (the window
being the ``recent`` most recent tokens *including* the new one, so positions
``> p - recent`` are protected for a new token at ``p``; ties: lowest slot),
the new token takes its place with score 0, the query attends over the kept
tokens, and every kept token's score grows by the query's attention to it.
Unlike the reference code (which attends with ``budget + 1`` tokens and then
evicts using that step's scores) the eviction here uses the scores up to the
previous token, so shapes stay static.

Bytes per layer: ``2 * B * budget * Hkv * D * itemsize + 8 * B * Hkv * budget``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from memlab.kv.base import POLICIES
from memlab.kv._budget import (
    BudgetPolicy, accumulated_scores, check_dtype, check_int, last_tokens, valid_prompt,
)


@POLICIES.register("h2o")
@dataclasses.dataclass(frozen=True)
class H2O(BudgetPolicy):
    """Heavy hitters by accumulated attention + the ``recent`` most recent tokens, per KV head."""

    name = "h2o"
    per_head = True
    keeps_score = True
    budget: int
    recent: Optional[int] = None   # None = budget // 2 (resolved at construction:
    #                                dataclasses.replace(p, budget=...) keeps the resolved value)
    chunk: int = 256               # prefill query chunk for the score pass
    dtype: Optional[str] = None    # storage dtype; None = the model's compute dtype

    def __post_init__(self):
        check_int("H2O", "budget", self.budget, 1)
        if self.recent is None:
            object.__setattr__(self, "recent", self.budget // 2)
        check_int("H2O", "recent", self.recent, 0)
        if self.recent > self.budget:
            raise ValueError(f"H2O: recent={self.recent} must be <= budget={self.budget} (the recent "
                             f"window is part of the budget); use recent <= {self.budget}.")
        check_int("H2O", "chunk", self.chunk, 1)
        check_dtype("H2O", self.dtype)

    def prefill_priority(self, q, k, ctx, limit):
        score = accumulated_scores(q, k, ctx, self.chunk)                    # [B, Hkv, T]
        recent = last_tokens(ctx, self.recent)[:, None, :]
        valid = valid_prompt(ctx)[:, None, :]
        prio = jnp.where(recent, jnp.inf, jnp.where(valid, score, -jnp.inf))
        return prio.astype(jnp.float32), score, None

    def evict_slot(self, state, pos, occupied, p, limit):
        cand = occupied & (pos <= (p - self.recent)[:, None, None])
        return jnp.argmin(jnp.where(cand, state["score"], jnp.inf), axis=-1)
