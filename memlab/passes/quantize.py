"""The quantize pass: store chosen kernels as QArrays and dispatch their matmuls.

    ml.passes.quantize(ml.quant.nf4(block=64), rules={r"embed": None, r"lm_head": None})

``method`` is a format (round-to-nearest) or a registered method name / callable
``(path, w, calib_stats) -> QArray``.  By default every ``.../kernel`` leaf with
at least two dimensions is quantized; ``rules`` (regex -> format/method or None,
first match wins) override that per path.  Works on memlab models and on plain
Flax Linen models: the wrapper intercepts ``nn.Dense`` calls whose kernel is a
QArray (``flax.linen.intercept_methods``), so user code is untouched.

With ``donate=True`` each float leaf is deleted as soon as its quantized
version exists, so quantizing holds the quantized model plus one tensor, not
two whole copies.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlab.model import Model, Pass, Rules, path_str
from memlab.passes import PASSES
from memlab.quant.formats import Format
from memlab.quant.matmul import qmatmul
from memlab.quant.qarray import QArray


def _dense_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense):
        kernel = module.get_variable("params", "kernel")
        if isinstance(kernel, QArray):
            x = args[0]
            dtype = module.dtype or jnp.result_type(x.dtype, kernel.dtype)
            y = qmatmul(x, kernel, dtype)
            if module.use_bias:
                y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
            return y
    return next_fun(*args, **kwargs)


def dispatch_quantized(apply):
    """Wrapper: run ``apply`` with nn.Dense calls on QArray kernels sent to qmatmul."""
    def wrapped(params, *args, **kwargs):
        with nn.intercept_methods(_dense_interceptor):
            return apply(params, *args, **kwargs)
    wrapped.__name__ = "dispatch_quantized"
    return wrapped


def _is_target(path: str, leaf) -> bool:
    return path.endswith("kernel") and getattr(leaf, "ndim", 0) >= 2


def _quantizer(method):
    if isinstance(method, Format):
        return lambda path, w: method.quantize(w)
    if callable(method):
        return lambda path, w: method(w)
    raise ValueError(f"quantize: {method!r} is not a format (e.g. ml.quant.nf4()) or a callable")


@PASSES.register("quantize")
def quantize(method: Any, rules: Optional[Mapping[str, Any]] = None, donate: bool = False) -> Pass:
    _quantizer(method)  # validate now
    for cfg in (rules or {}).values():
        if cfg is not None:
            _quantizer(cfg)

    def select():
        return Rules(rules, argname="quantize rules")

    select()

    def quantize_leaf(path, leaf, cfg):
        if isinstance(leaf, QArray):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):  # abstract model: shapes of the result
            zeros = lambda: jnp.zeros(leaf.shape, leaf.dtype)  # noqa: E731
            return jax.eval_shape(lambda: _quantizer(cfg)(path, zeros()))
        out = _quantizer(cfg)(path, leaf)
        if donate and isinstance(leaf, jax.Array):
            jax.block_until_ready(out)
            leaf.delete()
        return out

    def transform(model: Model, calib) -> Model:
        rules_ = select()
        flat, treedef = jax.tree_util.tree_flatten_with_path(
            model.params, is_leaf=lambda x: isinstance(x, QArray))
        new_leaves = []
        for p, leaf in flat:  # one tensor at a time (stacked layers: one layer at a time)
            path = path_str(p)
            cfg = rules_.lookup(path)  # explicit rules first, then kernels get `method`
            if cfg is Rules.NO_MATCH:
                cfg = method if _is_target(path, leaf) else None
            new_leaves.append(leaf if cfg is None else quantize_leaf(path, leaf, cfg))
        rules_.warn_unmatched("quantize")
        params = jax.tree_util.tree_unflatten(treedef, new_leaves)
        out = model.replace(params=params)
        if dispatch_quantized not in model.wrappers:
            out = out.wrap(dispatch_quantized)
        return out

    def estimate(current, spec, workload):
        shapes = getattr(spec, "param_shapes", None)
        if shapes is None:
            return current
        from memlab.memory.bytes import tree_bytes
        before = tree_bytes(shapes())
        after = tree_bytes(transform(Model(params=shapes(), fn=lambda p: p), None).params)
        out = dict(current)
        out["params"] = out.get("params", before) - before + after
        return out

    name = getattr(method, "name", getattr(method, "__name__", str(method)))
    return Pass(f"quantize({name})", transform, estimate)

