"""Calibration statistics of the inputs to every dense layer.

``collect(model, batches)`` runs the float model on calibration batches and
returns, per kernel path (``layers/attn/q_proj/kernel``), sums over all tokens:

* ``xtx``    [..., K, K]  X^T X (GPTQ's Hessian, AWQ's output-error metric)
* ``absmax`` [..., K]     max |x| per input channel (SmoothQuant, outliers)
* ``abssum`` [..., K]     sum |x| per input channel (AWQ's activation salience)
* ``count``  [...]        tokens seen

Stacked (scanned) layers give a leading layer axis.  The statistics are sown
from an ``nn.Dense`` interceptor, so plain Flax models work too.
"""
from __future__ import annotations

from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlab.model import Model, path_str

_STAT_NAMES = ("xtx", "absmax", "abssum", "count")


def _sow_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense):
        x = args[0].astype(jnp.float32)
        x2 = x.reshape(-1, x.shape[-1])
        stats = {"xtx": x2.T @ x2, "absmax": jnp.max(jnp.abs(x2), 0),
                 "abssum": jnp.sum(jnp.abs(x2), 0), "count": jnp.float32(x2.shape[0])}
        for name, value in stats.items():
            reduce = jnp.maximum if name == "absmax" else jnp.add
            module.sow("intermediates", f"calib_{name}", value,
                       init_fn=lambda v=value: jnp.zeros_like(v),
                       reduce_fn=lambda a, b, r=reduce: r(a, b))
    return next_fun(*args, **kwargs)


def collect(model: Model, batches: Iterable, max_batches: int | None = None) -> dict:
    """Per-kernel-path input statistics over ``batches``.

    Each batch is the model's input array, or a tuple of its positional inputs
    (e.g. ``(ids, mask)`` for an encoder).
    """
    if model.module is None:
        raise ValueError("calibration needs a Flax Linen model (Model(module=..., params=...))")
    apply = model.apply

    @jax.jit
    def one(params, args):
        with nn.intercept_methods(_sow_interceptor):
            _, state = apply(params, *args, mutable=["intermediates"])
        return state["intermediates"]

    total = None
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        inter = one(model.params, tuple(jnp.asarray(a) for a in args))
        if total is None:
            total = inter
        else:
            total = jax.tree_util.tree_map_with_path(
                lambda p, a, b: jnp.maximum(a, b) if "absmax" in path_str(p) else a + b,
                total, inter)
        n += 1
    if total is None:
        raise ValueError("calibration: `calib` yielded no batches; pass e.g. "
                         "list(memlab.data.train_batches(tokens, 4, 256, seed=0))[:8]")
    out: dict = {}
    for p, value in jax.tree_util.tree_flatten_with_path(total)[0]:
        path = path_str(p)
        module_path, stat = path.rsplit("/", 1) if "/" in path else ("", path)
        # sown values may be wrapped in a tuple level: strip trailing numeric parts
        while module_path.rsplit("/", 1)[-1].isdigit():
            module_path = module_path.rsplit("/", 1)[0]
        if stat.isdigit():
            module_path, stat = module_path.rsplit("/", 1)
        name = stat.removeprefix("calib_")
        out.setdefault(f"{module_path}/kernel", {})[name] = value
    return out
