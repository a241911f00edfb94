"""Quantization methods: how codes are chosen, one module each, registered by name.

A method is a frozen dataclass with ``format``, ``needs_calibration`` and
``quantize(w, stats) -> QArray`` where ``w`` is a ``[..., K, N]`` kernel and
``stats`` its calibration statistics (``memlab.quant.calibrate``) or None.
``memlab.quant.methods.get("gptq")(format=..., ...)`` builds one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memlab.quant.qarray import QArray
from memlab.registry import Registry, discover

METHODS = Registry("quantization method")


def per_matrix(fn, w, stats):
    """Run ``fn(w2d, stats2d) -> QArray`` over leading (layer) axes, one matrix at a time."""
    if stats is not None:
        k = w.shape[-2]
        for name, v in stats.items():
            want = {"xtx": w.shape[:-2] + (k, k), "absmax": w.shape[:-2] + (k,),
                    "abssum": w.shape[:-2] + (k,), "count": w.shape[:-2]}.get(name)
            if want is not None and tuple(v.shape) != want:
                raise ValueError(f"calibration statistic {name!r} has shape {tuple(v.shape)} but "
                                 f"the kernel {tuple(w.shape)} needs {want}: the statistics were "
                                 "collected on a different model or layer")
    if w.ndim == 2:
        return fn(w, stats)
    lead = w.shape[:-2]
    flat_w = w.reshape((-1,) + w.shape[-2:])
    flat_s = None if stats is None else {k: v.reshape((-1,) + v.shape[len(lead):])
                                         for k, v in stats.items()}
    outs = [fn(flat_w[i], None if flat_s is None else {k: v[i] for k, v in flat_s.items()})
            for i in range(flat_w.shape[0])]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outs)
    return jax.tree_util.tree_map(lambda a: a.reshape(lead + a.shape[1:]), stacked)


def require_stats(method_name: str, stats) -> None:
    """Calibrated methods called without statistics: one clear error for all of them."""
    if stats is None:
        raise ValueError(f"{method_name} needs calibration statistics: pass calib= batches to "
                         "the pass, or memlab.quant.calibrate.collect(model, batches)")


def get(name: str):
    return METHODS.get(name)


def names() -> list[str]:
    return METHODS.names()


def hessian(stats) -> jax.Array:
    """Mean X^T X over calibration tokens."""
    return stats["xtx"] / jnp.maximum(stats["count"], 1.0)


def output_error(w, w_hat, h) -> jax.Array:
    """Mean squared output error  tr((W - Ŵ)^T H (W - Ŵ)) / N  for inputs with E[xx^T] = H."""
    d = (w - w_hat).astype(jnp.float32)
    return jnp.sum(d * (h @ d)) / d.shape[-1]


discover(__name__, __path__)
__all__ = ["METHODS", "QArray", "get", "names", "per_matrix", "require_stats", "hessian",
           "output_error"]
