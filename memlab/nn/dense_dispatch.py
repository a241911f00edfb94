"""One ``nn.Dense`` interceptor: a quantized kernel, then a LoRA delta, in one place.

The quantize pass stores chosen kernels as QArrays and the LoRA pass puts
adapters ``lora_a [in, r]`` / ``lora_b [r, out]`` beside kernels; both need every
``flax.linen.Dense`` call to compute something else than ``x @ kernel + bias``.
:class:`DenseDispatch` is the one model wrapper that does it, whatever order the
passes ran in: for each ``nn.Dense.__call__`` (``flax.linen.intercept_methods``,
public Flax API) it computes

    y = x @ W + bias                       W a float kernel (Flax's own call), or
    y = qmatmul(x, W) + bias               W a QArray (memlab.quant.matmul: a fused
                                           dequant-matmul kernel or the XLA path)
    y = y + scale * (x @ A) @ B            when the layer holds LoRA adapters
                                           (Hu et al. 2021; QLoRA, Dettmers et al. 2023)

with ``scale`` and QA-LoRA's input pooling from the LoRA pass's static config
(``DenseDispatch(lora=LoraConfig(...))``).  A model carries at most one
DenseDispatch; each pass adds it or updates it in place (:func:`install`).
Adapters that no ``nn.Dense`` call used are an error after the call.

:func:`keep_dispatch` wraps a function traced later, outside the model's call
(a ``custom_vjp`` backward, memlab.offload), so it runs under the interceptor and
the model's :class:`memlab.dispatch.Dispatch` that were active when it was
wrapped; it reads memlab's own state only, never Flax internals.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memlab import dispatch
from memlab.quant.matmul import qmatmul
from memlab.quant.qarray import QArray

__all__ = ["DenseDispatch", "install", "keep_dispatch", "lora_delta", "adapted_modules"]


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, dtype: Any,
               qa_group: Optional[int] = None) -> jax.Array:
    """``scale * (x @ A) @ B`` in ``dtype`` with float32 accumulation; x [..., in].

    With ``qa_group=g`` (QA-LoRA) x is first averaged over groups of g features."""
    dtype = jnp.dtype(dtype)
    if qa_group is not None:
        x = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // qa_group, qa_group))
        x = x.mean(-1)
    h = jnp.dot(x.astype(dtype), a.astype(dtype), preferred_element_type=jnp.float32)
    d = jnp.dot(h.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
    return (d * scale).astype(dtype)


def adapted_modules(params) -> set:
    """Module paths (tuples of names) whose params hold LoRA adapters (``lora_a``)."""
    found = set()

    def walk(tree, prefix):
        if isinstance(tree, Mapping):
            if "lora_a" in tree:
                found.add(prefix)
            for k, v in tree.items():
                walk(v, prefix + (str(k),))
    walk(params, ())
    return found


@dataclasses.dataclass
class _CallState:
    """One call of a DenseDispatch-wrapped apply: its static config and what it saw."""

    lora: Any
    seen: set = dataclasses.field(default_factory=set)


_STATE = contextvars.ContextVar("memlab_dense_dispatch", default=None)


def _intercept(state: _CallState, next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Dense):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel") if module.has_variable("params", "kernel") \
        else None
    quantized = isinstance(kernel, QArray)
    adapted = state.lora is not None and module.has_variable("params", "lora_a")
    if not quantized and not adapted:
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    if quantized:  # 1. the base layer on the quantized kernel
        dtype = module.dtype or jnp.result_type(x.dtype, kernel.dtype)
        y = qmatmul(x, kernel, dtype)
        if module.use_bias:
            y = y + jnp.asarray(module.get_variable("params", "bias"), dtype)
    else:
        y = next_fun(*args, **kwargs)
    if adapted:  # 2. the LoRA delta on top, whatever the base was
        a = module.get_variable("params", "lora_a")
        b = module.get_variable("params", "lora_b")
        state.seen.add(tuple(module.path))
        y = y + lora_delta(x, a, b, state.lora.scale(a.shape[-1]), y.dtype, state.lora.qa_group)
    return y


@contextlib.contextmanager
def _intercepting(state: _CallState):
    token = _STATE.set(state)
    try:
        with nn.intercept_methods(functools.partial(_intercept, state)):
            yield
    finally:
        _STATE.reset(token)


@dataclasses.dataclass(frozen=True)
class DenseDispatch:
    """Model wrapper ``apply -> apply`` running every ``nn.Dense`` call through the one
    interceptor (see the module doc).  ``lora``: the LoRA pass's static config (an object
    with ``scale(rank)`` and ``qa_group``, :class:`memlab.passes.lora.LoraConfig`), or None
    when the model has no adapters.  Frozen and hashable: part of the jit cache key."""

    lora: Any = None

    def __call__(self, apply):
        config = self.lora

        def wrapped(params, *args, **kwargs):
            state = _CallState(config)
            with _intercepting(state):
                out = apply(params, *args, **kwargs)
            if config is not None:
                missing = {m for m in adapted_modules(params) if not _used(m, state.seen)}
                if missing:
                    names = sorted("/".join(m) for m in missing)
                    raise ValueError(
                        f"lora: the adapters of {names} were never applied: no nn.Dense call "
                        "used them. LoRA adapts nn.Dense kernels only; exclude other kernels "
                        "with a None rule (a loss that reads the head weight itself, as cut "
                        "cross-entropy does, never calls lm_head: exclude it with "
                        "{r'lm_head': None} or use model.with_dispatch(cross_entropy='naive')).")
            return out
        wrapped.__name__ = "dense_dispatch"
        return wrapped


def _used(module: tuple, seen: set) -> bool:
    """Whether a call at one of the ``seen`` module paths used ``module``'s adapters: the
    path itself, or its tail when layers run as their own module tree (memlab.offload's
    streamed layers are applied one by one, so their paths lack the ``layers`` prefix)."""
    return any(s and module[len(module) - len(s):] == s for s in seen)


def install(wrappers: tuple, **changes) -> tuple:
    """``wrappers`` with its DenseDispatch updated by ``changes`` in place, or a new one
    (``DenseDispatch(**changes)``) appended when there is none."""
    out, found = [], False
    for w in wrappers:
        if isinstance(w, DenseDispatch) and not found:
            fields = {f.name: getattr(w, f.name) for f in dataclasses.fields(DenseDispatch)}
            fields.update(changes)
            out.append(DenseDispatch(**fields))
            found = True
        elif not isinstance(w, DenseDispatch):
            out.append(w)
    if not found:
        out.append(DenseDispatch(**changes))
    return tuple(out)


def keep_dispatch(fn):
    """``fn`` run under the DenseDispatch interceptor and the model Dispatch active now,
    also when it is traced after they exited (a ``custom_vjp`` backward)."""
    state, choice = _STATE.get(), dispatch.active()

    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as ctx:
            if choice is not None and dispatch.active() is None:
                ctx.enter_context(dispatch.applying(choice))
            if state is not None and _STATE.get() is None:
                ctx.enter_context(_intercepting(state))
            return fn(*args, **kwargs)
    return wrapped
