"""SnapKV: select the prompt's KV by what the last queries attend to (Li et al. 2024, "SnapKV:
LLM Knows What You are Looking for Before Generation", arXiv:2404.14469).

``SnapKV(budget, window=32, kernel=7, pooling="max")``.  After full causal
attention over the (uncompressed) prompt, the last ``window`` real queries of
each row (the "observation window") vote: their attention probabilities to
every earlier prompt key are summed over the window's queries and averaged
over the query heads of each KV group (the reference code selects per query
head of an MHA model; with GQA one selection per *KV* head is what actually
shrinks the cache, as GQA ports of SnapKV do), then smoothed along the key axis by a
1-D ``max`` (or ``avg``) pool of size ``kernel`` (stride 1, ``kernel // 2``
padding, keys outside the prefix count as padding: PyTorch's ``max_pool1d`` /
``avg_pool1d`` as in the reference code).  Per KV head the top
``budget - window`` prefix tokens are kept, plus the window itself.  A row with
at most ``budget`` real tokens keeps them all.

State (per-head selection, see :mod:`memlab.kv._budget`)::

    k, v   [B, budget, Hkv, D]   storage dtype (keys after RoPE, original positions)
    pos    [B, Hkv, budget]      int32, MAX_POS = empty
    pin    [B]                   int32 = max(n_new - window, 0)

Decode (SnapKV itself only compresses the prompt): new tokens fill free slots;
once full, the oldest token that was not chosen from the prefix by the
prefill selection (position ``>= pin``: the observation window and the
generated tokens) is evicted, so the generated tail behaves as a sliding window
of at least ``window`` tokens next to the fixed selected prefix.  With a
prompt of at most ``budget`` tokens the prefix tokens ``< n_new - window``
count as selected (all of them fit).

Bytes per layer: ``2 * B * budget * Hkv * D * itemsize + 4 * B * Hkv * budget + 4 * B``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from memlab import facts
from memlab.kv.base import POLICIES
from memlab.kv._budget import SnapKVBase


def _plan(seq: int) -> list:
    """Budgets of 1/8 and 1/32 of the cache, where they keep at least 256 tokens."""
    return [f"snapkv:budget={seq // frac}" for frac in (8, 32) if seq // frac >= 256]


def _quality_loss(policy, seq: int) -> float:
    """The measured loss at its kept fraction (memlab/measured.json), scaled linearly in
    the fraction evicted: none lost keeping everything."""
    loss = facts.value("kv policy", "snapkv", "quality_loss", __name__)
    kept_at = facts.value("kv policy", "snapkv", "kept_fraction", __name__)
    kept = min(1.0, policy.budget / seq)
    return float(loss * max(0.0, 1.0 - kept) / (1.0 - kept_at))


# planner facts (memlab.facts); the kept tokens are stored in the compute dtype
@POLICIES.register("snapkv", plan=_plan, quality_loss=_quality_loss, compute_dtype_store=True)
@dataclasses.dataclass(frozen=True)
class SnapKV(SnapKVBase):
    """Prefill keeps the observation window + the top pooled-score prefix tokens, per KV head."""

    name = "snapkv"
    budget: int
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    dtype: Optional[str] = None   # storage dtype; None = the model's compute dtype

    def __post_init__(self):
        self._check_snap("SnapKV")
