"""``qmatmul(x, w)``: x @ w for a float or quantized kernel.

On CPU the XLA path dequantizes one layer's weight inside the jitted step (the
scan body), so only that layer's float copy is ever live.  Fused Pallas
dequant-matmul kernels (``memlab_kernels``) take over on GPU/TPU where one exists
for the format.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memlab.quant.qarray import QArray


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
    return w.format.matmul(x, w, dtype)
