"""Exact storage bytes of pytrees, counting sub-byte dtypes packed.

``x.nbytes`` reports one byte per int4/fp4 element; real storage (and what
XLA:CPU allocates) packs them.  :func:`array_bytes` counts bits, rounded up to
whole bytes per array.  Leaves may be arrays or ``jax.ShapeDtypeStruct``.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

_SUB_BYTE_BITS = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2, "float4_e2m1fn": 4}


def dtype_bits(dtype) -> int:
    dt = np.dtype(dtype)
    return _SUB_BYTE_BITS.get(dt.name, dt.itemsize * 8)


def array_bytes(x: Any) -> int:
    shape = getattr(x, "shape", ())
    dtype = getattr(x, "dtype", None)
    if dtype is None:  # python scalars are not device storage
        return 0
    return math.ceil(math.prod(shape) * dtype_bits(dtype) / 8)


def tree_bytes(tree: Any) -> int:
    """Sum of :func:`array_bytes` over the leaves (None and non-arrays count 0)."""
    return sum(array_bytes(x) for x in jax.tree_util.tree_leaves(tree))


def abstractify(tree: Any) -> Any:
    """Arrays -> ``jax.ShapeDtypeStruct`` (keeping shardings); others unchanged."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return x
    return jax.tree_util.tree_map(one, tree)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"
