"""The uncompressed cache, registered as the ``dense`` policy.

The class lives in :mod:`memlab.cache` beside the protocol, because it is the
default every model generates with when no ``kv_compress`` pass is applied.
"""
from __future__ import annotations

from memlab.cache import Dense
from memlab.kv.base import POLICIES

POLICIES.register("dense")(Dense)

__all__ = ["Dense"]
