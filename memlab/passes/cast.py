"""The cast pass: store chosen floating-point weights in another dtype (e.g. bf16).

``cast("bfloat16")`` casts every floating leaf; ``rules={r"embed": None}`` keeps
matching paths as they are (first match wins).  With ``compute=True`` a memlab
model also computes in that dtype (norms and softmax stay float32).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from memlab.memory.estimate import replay_on_shapes
from memlab.model import Model, Pass, Rules, map_params
from memlab.passes import PASSES

_SUPPORTED = ("float32", "bfloat16", "float16", "float64")


def _cast_leaf(dtype):
    def fn(path, leaf, _config):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=getattr(leaf, "sharding", None))
        return leaf.astype(dtype)
    return fn


@PASSES.register("cast")
def cast(dtype: Any = "bfloat16", rules: Optional[Mapping[str, Any]] = None,
         compute: bool = False) -> Pass:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"cast: dtype {dtype!r} is not a dtype; use one of {_SUPPORTED}") from None
    if dt.name not in _SUPPORTED:
        raise ValueError(f"cast: dtype {dt.name!r} is not supported for weight storage; use one "
                         f"of {_SUPPORTED} (integer and sub-byte formats belong to quantize)")

    def select():  # fresh hit counts per application
        return Rules(rules, default=True, argname="cast rules")

    select()  # validate the regexes now, not at first use

    def transform(model: Model, calib) -> Model:
        params = map_params(_cast_leaf(dt), model.params, select(), "cast")
        out = model.replace(params=params)
        if compute:
            spec = model.spec
            if spec is None or not hasattr(spec, "dtype") or model.module is None:
                raise ValueError("cast(compute=True) needs a memlab model with a spec.dtype; "
                                 "for other models cast the weights only (compute=False)")
            spec = dataclasses.replace(spec, dtype=dt.name)
            out = out.replace(spec=spec, module=model.module.clone(config=spec))
        return out

    def estimate(current, spec, workload):
        out = replay_on_shapes(current, spec,
                               lambda p: map_params(_cast_leaf(dt), p, select(), "cast estimate"),
                               categories=("params", "gradients"))
        if compute and "kv_cache" in out:
            new_spec = dataclasses.replace(spec, dtype=dt.name)
            b, s = workload.batch, workload.seq
            out["kv_cache"] += new_spec.kv_cache_bytes(b, s) - spec.kv_cache_bytes(b, s)
        return out

    return Pass(f"cast({dt.name})", transform, estimate)

