"""``QArray``: a quantized weight as a pytree of its real storage.

A QArray holds named arrays (packed codes, scales, zero points, ...) and a static
``format`` that knows how to dequantize them.  Its leaves are exactly what is
stored, so ``memlab.memory.tree_bytes`` of a quantized model is its true size,
orbax saves and restores it bit-exactly, and ``jax.lax.scan`` over stacked layers
slices every array along the leading layer axis like any other parameter.

Formats quantize along the input dimension K of a Flax kernel ``[..., K, N]``;
leading axes (stacked layers) are batch axes.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp


@jax.tree_util.register_pytree_node_class
class QArray:
    """Quantized array: ``arrays`` (name -> jax array) + static ``format`` and ``dtype``."""

    def __init__(self, arrays: Mapping[str, Any], format: Any, dtype: Any):
        self.arrays = dict(arrays)
        self.format = format
        self.dtype = jnp.dtype(dtype)

    # -- pytree -------------------------------------------------------------
    def tree_flatten(self):
        keys = tuple(sorted(self.arrays))
        return tuple(self.arrays[k] for k in keys), (keys, self.format, self.dtype.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        keys, fmt, dtype = aux
        return cls(dict(zip(keys, children)), fmt, dtype)

    # -- array-like ---------------------------------------------------------
    def __getitem__(self, name: str):
        return self.arrays[name]

    @property
    def shape(self) -> tuple:
        """The logical (dequantized) shape."""
        return self.format.logical_shape(self)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        return self.format.dequantize(self).astype(dtype or self.dtype)

    @property
    def nbytes(self) -> int:
        from memlab.memory.bytes import tree_bytes
        return tree_bytes(self.arrays)

    def bits_per_param(self) -> float:
        n = 1
        for s in self.shape:
            n *= s
        return 8 * self.nbytes / n

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {getattr(v, 'dtype', '?')}{list(getattr(v, 'shape', ()))}"
                          for k, v in sorted(self.arrays.items()))
        return f"QArray({self.format.name}, shape={list(self.shape)}, {parts})"


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)
