"""``qmatmul(x, w)``: x @ w for a float or quantized kernel, dispatched by backend.

Weight-only formats with a fused Pallas dequant-matmul kernel (``memlab_kernels.
dequant_matmul``: int8, packed int4, NF4) use it on GPU (Triton) and TPU
(Mosaic), so the float weight never reaches HBM.  On CPU, or for formats
without a kernel, the XLA path dequantizes one layer's weight inside the jitted
step (the scan body), so only that layer's float copy is ever live.

``kernel_mode("interpret")`` forces the Pallas kernels in interpret mode on any
backend (tests); ``kernel_mode("xla")`` disables them.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

from memlab import dispatch
from memlab.quant.qarray import QArray

_MODES = ("auto", "xla", "interpret")
_mode = contextvars.ContextVar("memlab_kernel_mode", default="auto")


@contextlib.contextmanager
def kernel_mode(mode: str):
    """Choose how quantized matmuls run inside this context: auto | xla | interpret."""
    if mode not in _MODES:
        raise ValueError(f"kernel_mode: {mode!r} is not one of {_MODES}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


def kernel_backend() -> str | None:
    """The Pallas backend quantized matmuls use now, or None for the XLA path."""
    mode = _mode.get()
    if mode == "xla":
        return None
    if mode == "interpret":
        return "interpret"
    return {"gpu": "triton", "tpu": "mosaic_tpu"}.get(dispatch.platform())


def qmatmul(x: jax.Array, w, dtype=None) -> jax.Array:
    """``x[..., K] @ w[K, N]`` with f32 accumulation; ``w`` an array or a QArray."""
    dtype = jnp.dtype(dtype or x.dtype)
    if not isinstance(w, QArray):
        return jnp.dot(x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32
                       ).astype(dtype)
    if w.ndim != 2:
        raise ValueError(f"qmatmul: expects a 2-D quantized kernel, got shape {w.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"qmatmul: x has {x.shape[-1]} features but the kernel expects "
                         f"{w.shape[0]} (kernel shape {w.shape})")
    backend = kernel_backend()
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
