"""The uncompressed cache, registered as the ``dense`` policy.

The class lives in :mod:`memlab.cache` beside the protocol, because it is the
default every model generates with when no ``kv_compress`` pass is applied.
"""
from __future__ import annotations

from memlab.cache import Dense
from memlab.kv.base import POLICIES

def _plan(seq: int) -> list:
    return ["dense"]


# planner facts (memlab.facts): the reference every loss is measured against, stored in the
# compute dtype
POLICIES.register("dense", plan=_plan, quality_loss=0.0, compute_dtype_store=True)(Dense)

__all__ = ["Dense"]
