"""Analytic bytes by category, from a model spec alone (no compile, no allocation).

These closed forms are what the profiler checks XLA and the real pytrees
against, and what passes adjust through ``Pass.estimate``.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from memlab import optim

TASKS = ("train", "prefill", "decode")


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    return task


def bytes_by_category(spec, task: str, batch: int, seq: int,
                      optimizer: Optional[str] = "adamw", state_dtype="float32",
                      cache_dtype=None) -> dict:
    """Exact bytes of params, gradients, optimizer state and KV cache for ``task``.

    ``spec`` needs ``param_count()``, ``param_dtype`` and (for inference)
    ``kv_cache_bytes(batch, seq, dtype)``.
    """
    check_task(task)
    n = spec.param_count()
    out = {"params": n * jnp.dtype(spec.param_dtype).itemsize}
    if task == "train":
        out["gradients"] = out["params"]
        if optimizer is not None:
            shapes = spec.param_shapes() if hasattr(spec, "param_shapes") else n
            out["optimizer_state"] = optim.state_bytes(optimizer, shapes, state_dtype=state_dtype)
        out["inputs"] = batch * (seq + 1) * 4
    else:
        # dense cache + int32 per-row lengths
        out["kv_cache"] = spec.kv_cache_bytes(batch, seq, cache_dtype) + batch * 4
        out["inputs"] = batch * (seq if task == "prefill" else 1) * 4
    return out


def replay_on_shapes(current: dict, spec, transform_params, categories=("params",)) -> dict:
    """Exact estimate of a pass that changes params: run it on the spec's abstract
    params (``spec.param_shapes()``) and move the byte difference into ``categories``."""
    from memlab.memory.bytes import tree_bytes

    out = dict(current)
    shapes = getattr(spec, "param_shapes", None)
    if shapes is None:
        return out
    delta = tree_bytes(transform_params(shapes())) - tree_bytes(shapes())
    for cat in categories:
        if cat in out:
            out[cat] += delta
    return out


def base_spec(model):
    """The spec the model had before any pass (what the base estimate starts from)."""
    history = getattr(model, "history", ())
    return history[0][1] if history else model.spec


def apply_passes(estimate: dict, model, workload) -> dict:
    """Replay every pass recorded on ``model.history`` over an estimate, in order."""
    for p, spec in getattr(model, "history", ()):
        estimate = p.estimate_bytes(estimate, spec, workload)
    return estimate


# A pass that narrows what trains (LoRA) puts the trainable params' shapes under this
# key of the estimate; the profiler then counts gradients and optimizer state over them.
TRAINABLE_SHAPES = "trainable_shapes"


def over_trainable(estimate: dict, optimizer: Optional[str] = "adamw",
                   state_dtype="float32") -> dict:
    """Gradients and optimizer state over the trainable params a pass recorded.

    Without a :data:`TRAINABLE_SHAPES` entry everything trains and ``estimate``
    is returned as is (without the entry in either case)."""
    from memlab.memory.bytes import tree_bytes

    out = dict(estimate)
    shapes = out.pop(TRAINABLE_SHAPES, None)
    if shapes is None:
        return out
    if "gradients" in out:
        out["gradients"] = tree_bytes(shapes)
    if "optimizer_state" in out and optimizer is not None:
        out["optimizer_state"] = optim.state_bytes(optimizer, shapes, state_dtype=state_dtype)
    return out
