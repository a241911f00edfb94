"""KV-cache policies: the registry, the text form, and the protocol re-exported from
:mod:`memlab.cache` (where the protocol, ``PolicyCache`` and the default ``Dense``
policy live, so that models and policies share it without importing each other)."""
from __future__ import annotations

import warnings

import jax.numpy as jnp

from memlab.cache import (  # noqa: F401  (the protocol, re-exported)
    MAX_POS, Dense, Dims, KVPolicy, PolicyCache, StepCtx, attend, attend_decode, attend_prompt,
    cache_bytes, init_cache, prompt_positions, write_tokens,
)
from memlab.registry import Registry

#: Every KV policy by name (``memlab.kv.get``); a policy module registers itself here.
POLICIES = Registry("kv policy")

__all__ = ["Dims", "KVPolicy", "POLICIES", "PolicyCache", "StepCtx", "attend", "init_cache",
           "cache_bytes", "write_tokens", "prompt_positions", "MAX_POS"]


def make_cache(model, batch: int, max_len: int, lengths: int = 0):
    """Deprecated: use :func:`memlab.generate.make_cache` (cache construction lives with
    generation)."""
    warnings.warn("memlab.kv.make_cache moved to memlab.generate.make_cache",
                  DeprecationWarning, stacklevel=2)
    policy = model.extra("kv_policy") if hasattr(model, "extra") else None
    cache = init_cache(policy or Dense(), model.spec, batch, max_len)
    return cache._replace(lengths=jnp.full((batch,), lengths, jnp.int32), fresh=not lengths)
