"""The kv_compress pass: generate and profile through a compressed KV cache.

    model = ml.passes.kv_compress(ml.kv.parse("kivi2"))(model)
    model = ml.passes.kv_compress("snapkv:budget=512")(model)      # the same, from a string

The pass stores the policy on the model (``model.extra("kv_policy")``); the
weights are untouched.  ``memlab.generate``, ``memlab.memory.profile`` and the
teacher-forced evaluation then build a :class:`memlab.kv.PolicyCache` for it.
Its estimate replaces the dense cache bytes by the policy's exact formula
(``n_layers * policy.nbytes(dims)`` + 4 bytes of length per row).
"""
from __future__ import annotations

from memlab.kv.base import KVPolicy
from memlab.kv.compose import parse
from memlab.model import Model, Pass
from memlab.passes import PASSES


def policy_bytes(policy: KVPolicy, spec, batch: int, max_len: int, dtype=None) -> int:
    """Exact bytes of a whole PolicyCache for a Llama-family ``spec``."""
    from memlab.cache import cache_dims
    return policy.stacked_nbytes(cache_dims(spec, batch, max_len, dtype)) + batch * 4


@PASSES.register("kv_compress")
def kv_compress(policy: KVPolicy | str) -> Pass:
    if isinstance(policy, str):
        policy = parse(policy)
    if not isinstance(policy, KVPolicy):
        raise TypeError(f"kv_compress: policy must be a memlab.kv policy or a string like 'kivi2', "
                        f"got {type(policy).__name__}; see ml.kv.names().")

    def transform(model: Model, calib) -> Model:
        spec = model.spec
        if spec is None or not hasattr(spec, "n_kv_heads"):
            raise ValueError("kv_compress needs a memlab decoder model (a LlamaConfig spec)")
        return model.with_extras(kv_policy=policy)

    def estimate(current, spec, workload):
        out = dict(current)
        if "kv_cache" in out and workload.task in ("prefill", "decode"):
            out["kv_cache"] = policy_bytes(policy, spec, workload.batch, workload.seq)
        return out

    return Pass(f"kv_compress({policy!r})", transform, estimate)
