"""The quantize pass: store chosen kernels as QArrays and dispatch their matmuls.

    ml.passes.quantize(ml.quant.nf4(block=64), rules={r"embed": None, r"lm_head": None})

``method`` is a format (round-to-nearest) or a method from
``memlab.quant.methods`` (AWQ, GPTQ, ...); methods that calibrate get input
statistics of every dense layer from ``plan(model, calib=batches)``.  By default every ``.../kernel`` leaf with
at least two dimensions is quantized; ``rules`` (regex -> format/method or None,
first match wins) override that per path.  Works on memlab models and on plain
Flax Linen models: the model's one ``nn.Dense`` interceptor
(:class:`memlab.nn.dense_dispatch.DenseDispatch`, shared with the LoRA pass, so
the two passes compose in either order) sends calls whose kernel is a QArray to
:func:`memlab.quant.matmul.qmatmul`, so user code is untouched.  Which kernel
backend runs is the model's static ``Dispatch.qmatmul``
(``model.with_dispatch(qmatmul="interpret")``).

With ``donate=True`` each float leaf is deleted as soon as its quantized
version exists, so quantizing holds the quantized model plus one tensor, not
two whole copies.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from memlab.model import Model, Pass, Rules, path_str
from memlab.nn.dense_dispatch import DenseDispatch, install
from memlab.passes import PASSES
from memlab.quant.formats import Format
from memlab.quant.qarray import QArray

#: The wrapper that sends nn.Dense calls on QArray kernels to qmatmul: the model's one
#: Dense interceptor without adapters (``DenseDispatch()``; ``dispatch_quantized(apply)``).
dispatch_quantized = DenseDispatch()


def _is_target(path: str, leaf) -> bool:
    return path.endswith("kernel") and getattr(leaf, "ndim", 0) >= 2


def _as_method(method):
    """A format means round-to-nearest; methods have quantize(w, stats)."""
    if isinstance(method, Format):
        from memlab.quant.methods.rtn import RTN
        return RTN(method)
    if hasattr(method, "quantize") and hasattr(method, "needs_calibration"):
        return method
    raise ValueError(f"quantize: {method!r} is not a format (e.g. ml.quant.nf4()) or a method "
                     "(e.g. ml.quant.methods.get('gptq')(ml.quant.int4(128)))")


def _fake_stats(shape):
    *lead, k, _ = shape
    lead = tuple(lead)
    return {"xtx": jnp.eye(k, dtype=jnp.float32) * jnp.ones(lead + (1, 1)),
            "absmax": jnp.ones(lead + (k,)), "abssum": jnp.ones(lead + (k,)),
            "count": jnp.ones(lead)}


@PASSES.register("quantize")
def quantize(method: Any, rules: Optional[Mapping[str, Any]] = None, donate: bool = False) -> Pass:
    method = _as_method(method)  # validate now
    rules = {k: (None if v is None else _as_method(v)) for k, v in (rules or {}).items()}

    def select():
        return Rules(rules, argname="quantize rules")

    select()

    def quantize_leaf(path, leaf, cfg, stats):
        if isinstance(leaf, QArray):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):  # abstract model: shapes of the result
            return jax.eval_shape(lambda: cfg.quantize(jnp.zeros(leaf.shape, leaf.dtype),
                                                       _fake_stats(leaf.shape)))
        if cfg.needs_calibration and path not in stats:
            raise ValueError(f"quantize: no calibration statistics for {path!r}; calibration "
                             "records inputs of nn.Dense layers only")
        out = cfg.quantize(leaf, stats.get(path))
        if donate and isinstance(leaf, jax.Array):
            jax.block_until_ready(out)
            leaf.delete()
        return out

    def transform(model: Model, calib) -> Model:
        rules_ = select()
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            model.params, is_leaf=lambda x: isinstance(x, QArray))
        plan = []
        for p, leaf in flat:
            path = path_str(p)
            cfg = rules_.lookup(path)  # explicit rules first, then kernels get `method`
            if cfg is Rules.NO_MATCH:
                cfg = method if _is_target(path, leaf) else None
            plan.append((path, leaf, cfg))
        rules_.warn_unmatched("quantize")
        stats = {}
        if not model.abstract and any(c is not None and c.needs_calibration for _, _, c in plan):
            if calib is None:
                raise ValueError(f"quantize: {method.name} needs calibration data; call the "
                                 "pass as plan(model, calib=batches) with a few token batches")
            from memlab.quant import calibrate
            # calib: batches, or statistics already collected with calibrate.collect
            stats = calib if isinstance(calib, dict) else calibrate.collect(model, calib)
        # one tensor at a time (stacked layers: one layer at a time inside the method)
        new_leaves = [leaf if cfg is None else quantize_leaf(path, leaf, cfg, stats)
                      for path, leaf, cfg in plan]
        params = jax.tree_util.tree_unflatten(treedef, new_leaves)
        # the one Dense interceptor: kept as it is when LoRA (or a load) installed it
        return model.replace(params=params, wrappers=install(model.wrappers))

    def estimate(current, spec, workload):
        # abstract params: methods are traced with placeholder statistics, shapes only
        from memlab.memory.estimate import replay_on_shapes
        return replay_on_shapes(current, spec,
                                lambda p: transform(Model(params=p, fn=lambda q: q), None).params)

    p = Pass(f"quantize({method.name})", transform, estimate)
    return _QuantizePass(*p, method=method)


class _QuantizePass(Pass):
    """The quantize Pass, also exposing its method (e.g. for streaming loaders)."""

    def __new__(cls, *fields, method=None):
        self = super().__new__(cls, *fields)
        self.method = method
        return self

