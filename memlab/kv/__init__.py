"""Compressed KV caches: one policy per module, registered by name.

    policy = ml.kv.get("kivi")(bits=2)              # or ml.kv.KIVI(bits=2)
    model = ml.passes.kv_compress(policy)(model)     # generation and profiles use it

See :mod:`memlab.kv.base` for the protocol a policy implements.
"""
from memlab.kv.base import (
    MAX_POS, POLICIES, Dense, Dims, KVPolicy, PolicyCache, StepCtx, attend, cache_bytes, init_cache,
    make_cache, write_tokens,
)
from memlab.registry import discover

discover(__name__, __path__)

from memlab.kv.compose import compose, parse  # noqa: E402  (ml.kv.compose: the function)


def get(name: str):
    """The policy class (or factory) registered as ``name``."""
    return POLICIES.get(name)


def names() -> list[str]:
    return POLICIES.names()


__all__ = ["MAX_POS", "Dense", "Dims", "KVPolicy", "POLICIES", "PolicyCache", "StepCtx", "attend",
           "cache_bytes", "compose", "get", "init_cache", "make_cache", "names", "parse", "write_tokens"]
