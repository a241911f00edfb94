"""``qmatmul(x, w)``: x @ w for a float or quantized kernel, dispatched by backend.

Weight-only formats with a fused Pallas dequant-matmul kernel (``memlab_kernels.
dequant_matmul``: int8, packed int4, NF4) use it on GPU (Triton) and TPU
(Mosaic), so the float weight never reaches HBM.  On CPU, or for formats
without a kernel, the XLA path dequantizes one layer's weight inside the jitted
step (the scan body), so only that layer's float copy is ever live.

``kernel_mode`` speaks the kernels' backend vocabulary
(:data:`memlab_kernels._common.BACKENDS` and its aliases such as ``"pallas_triton"``):
``kernel_mode("interpret")`` forces the Pallas kernels in interpret mode on any
backend (tests); ``kernel_mode("xla")`` disables them; ``"triton"`` / ``"mosaic_tpu"``
pick a Pallas backend explicitly; ``"auto"`` picks the dispatch platform's.

A model's choice is static data: ``model.with_dispatch(qmatmul="interpret")``
(:class:`memlab.dispatch.Dispatch`, part of the jit cache key) wins over
``kernel_mode``, which stays a trace-time override for direct calls (see
:func:`memlab.dispatch.resolve`).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from memlab import dispatch
from memlab.quant.qarray import QArray
from memlab_kernels._common import BACKEND_ALIASES, BACKENDS, canonical_backend, resolve_backend

_MODES = BACKENDS
_mode = contextvars.ContextVar("memlab_kernel_mode", default="auto")


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Choose how quantized matmuls run inside this context: a kernel backend
    (auto | xla | interpret | triton | mosaic_tpu, or an alias such as "pallas_triton").

    A trace-time override, not part of any jit cache key; a model whose
    ``Dispatch.qmatmul`` is not "auto" ignores it (``model.with_dispatch(qmatmul=mode)``)."""
    if mode not in _MODES and mode not in BACKEND_ALIASES:
        raise ValueError(f"kernel_mode: {mode!r} is not one of {_MODES} (or an alias: "
                         f"{sorted(BACKEND_ALIASES)}); use 'xla' to disable the Pallas kernels.")
    token = _mode.set(canonical_backend(mode, "kernel_mode"))
    try:
        yield
    finally:
        _mode.reset(token)


def kernel_backend(mode: str | None = None) -> str | None:
    """The Pallas backend quantized matmuls use now, or None for the XLA path.

    ``mode`` (a kernel backend) if given, else the traced model's static
    ``Dispatch.qmatmul`` unless "auto", else :func:`kernel_mode`'s, for the dispatch
    platform."""
    if mode is not None:
        mode = canonical_backend(mode, "mode")
    chosen = dispatch.resolve("qmatmul", mode, _mode.get())
    backend = resolve_backend(chosen, platform=dispatch.platform())
    return None if backend == "xla" else backend


def qmatmul(x: jax.Array, w, dtype=None, backend: str | None = None) -> jax.Array:
    """``x[..., K] @ w[K, N]`` with f32 accumulation; ``w`` an array or a QArray.

    ``backend``: a kernel backend for this call (None: :func:`kernel_backend`)."""
    dtype = jnp.dtype(dtype or x.dtype)
    if not isinstance(w, QArray):
        return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
                       ).astype(dtype)
    if w.ndim != 2:
        raise ValueError(f"qmatmul: expects a 2-D quantized kernel, got shape {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} features but the kernel expects "
                         f"{w.shape[0]} (kernel shape {w.shape})")
    backend = kernel_backend(backend)
    fused = getattr(w.format, "kernel_matmul", None)
    if backend is not None and fused is not None:
        x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
        y = fused(x2, w, backend)
        if y is not None:
            return y.reshape(x.shape[:-1] + (y.shape[-1],)).astype(dtype)
    return w.format.matmul(x, w, dtype)


def pallas_kernels():
    """The ``memlab_kernels.dequant_matmul`` module, or None if it is not installed."""
    try:
        from memlab_kernels import dequant_matmul
    except ImportError:
        return None
    return dequant_matmul
